"""The Method interface and the registry of methods by name."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable

import torch
from torch import nn

from ..augment import RandomResizedCrop, Views, sequence
from ..vit import ViTTokens, vit_tokens

_REGISTRY: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class EncoderSpec:
    """What a method may know of the Learner's encoder when it builds its heads."""

    dim: int          # width of the pooled representation
    image_size: int   # side of the views
    channels: int     # channels of the views the net gets
    net: nn.Module = field(repr=False)

    def tokens(self, method: str) -> ViTTokens:
        """Token-level access to the user's ViT; a TypeError naming ``method`` for any other net."""
        return vit_tokens(self.net, self.image_size, method)


class Method(nn.Module):
    """A self-supervised objective: its heads, its loss and its default views.

    The Learner owns the encoder (the user's net up to the hidden layer), the
    EMA target and the augmentation; a method knows nothing of hooks, devices
    or Accelerate. The contract, in the order the Learner uses it:

    1. ``build(dim)`` creates the heads for an encoder output of width ``dim``.
       ``self.projector`` is the head that the EMA target mirrors; any other
       head (a predictor, prototypes) is online-only.
    2. ``default_views(image_size)`` gives the augmentation recipe. Views are
       ordered: the first ``views.n_global`` are global views (they go through
       the target too), the rest are local crops (online only).
    3. ``loss(online, target, step)`` gets one projection per view from the
       online branch and, when ``uses_target``, one per global view from the
       target branch (``None`` otherwise), and returns a scalar.

    Before the views are encoded, ``begin_step(step)`` tells the method which
    optimiser step the coming forward belongs to (a no-op unless overridden,
    e.g. to freeze part of a head early in training).

    Methods that are not two-branch joint embeddings override up to three more hooks:
    ``setup(spec)`` (instead of ``build``) sees the view size and may ask for the ViT's
    tokens (``spec.tokens(name)``, masked image modeling); ``online(encode, views)`` replaces
    "projector on the pooled representation" for a batch of views; ``targets(views)`` gives
    targets from a frozen teacher the method owns (distillation), and ``close()`` lets go of it.

    Class attributes a subclass sets:
        uses_target: keep an EMA copy of encoder + projector.
        momentum: the EMA decay at step 0 (cosine to 1.0 when total steps are known).
    """

    uses_target: bool = False
    momentum: float = 0.99

    projector: nn.Module

    def build(self, dim: int) -> None:
        """Create the heads for an encoder output of width ``dim``."""
        raise NotImplementedError

    def setup(self, spec: EncoderSpec) -> None:
        """Called once by the Learner to create the heads; by default ``build(spec.dim)``."""
        self.build(spec.dim)

    def online(self, encode: Callable[[torch.Tensor], torch.Tensor],
               views: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The online branch for a batch of same-sized normalised views: one row per view image (a tuple of such
        tensors reaches ``loss`` as one tuple per view). By default the projector on ``encode(views)``, the
        pooled representation."""
        return self.projector(encode(views))

    def targets(self, views: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Targets for the global views (float in [0, 1], not normalised) from a teacher the method owns, called
        without gradients; None (the default): the Learner's EMA target when ``uses_target``, else none."""
        return None

    def close(self) -> None:
        """Let go of what the method holds on nets other than the user's (a teacher's hooks)."""

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        """The default augmentation recipe of this method."""
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        """Called by the Learner before a training forward of optimiser step ``step``."""

    def loss(self, online: list[torch.Tensor], target: list[torch.Tensor] | None,
             step: int = 0) -> torch.Tensor:
        """The scalar loss from per-view online (and target) projections."""
        raise NotImplementedError

    def forward(self, online: list[torch.Tensor], target: list[torch.Tensor] | None,
                step: int = 0) -> torch.Tensor:
        return self.loss(online, target, step)


def mean_over_pairs(views: list[torch.Tensor], loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    method: str) -> torch.Tensor:
    """The average of a symmetric two-view loss over every pair of views."""
    if len(views) < 2:
        raise ValueError(f"{method} needs at least two views, got {len(views)}")
    pairs = list(combinations(range(len(views)), 2))
    return sum(loss(views[i], views[j]) for i, j in pairs) / len(pairs)


class OneView(Views):
    """A recipe of one view per image, for methods that compare no two views (masked modeling, distillation)."""

    def __init__(self, transform: nn.Module):
        nn.Module.__init__(self)  # not Views.__init__: it asks for the two views that joint embeddings need
        self.transforms = nn.ModuleList([transform])
        self.n_global = 1


def crop_and_flip(image_size: int, scale: tuple[float, float] = (0.2, 1.0)) -> OneView:
    """One weakly augmented view: a random resized crop of ``scale`` of the area and a horizontal flip."""
    return OneView(sequence(RandomResizedCrop(image_size, scale=scale, flip_p=0.5)))


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a Method constructible by ``name``."""
    def add(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return add


def available_methods() -> list[str]:
    """Names accepted by ``Learner(method=...)``."""
    return sorted(_REGISTRY)


def get_method(method: str | Method, **kwargs) -> Method:
    """A Method instance from a registered name (with its keyword arguments) or an instance."""
    if isinstance(method, Method):
        if kwargs:
            raise TypeError(f"method keyword arguments {sorted(kwargs)} were given with a Method "
                            "instance; pass them to its constructor instead")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a registered name or a wrapssl Method instance, "
                        f"got {type(method).__name__}")
    key = method.lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {method!r}{hint} Available: {', '.join(available_methods())}")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as e:
        raise TypeError(f"method {key!r}: {e}") from None
