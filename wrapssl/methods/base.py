"""The Method interface, what a method may ask the Learner for, and the registry of methods by name."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..augment import RandomResizedCrop, Views, sequence


_REGISTRY: dict[str, type["Method"]] = {}

NEEDS = ("tokens", "teacher")  # what a method may declare in ``Method.needs``


@dataclass(frozen=True)
class TeacherRequest:
    """The frozen teacher a method asks for; the Learner builds it (``wrapssl.teacher.build_teacher``).

    ``source``: a trained ``nn.Module``, or a path to its weights with ``arch`` naming its
    architecture (a ``build_arch`` name). ``layer``: its representation layer as ``hidden_layer``
    takes it (None: its pre-logits), pooled with ``pooling``; ``image_size`` (None: the student's)
    and ``normalize`` ((mean, std), or None for none) are the input it takes.
    """

    source: nn.Module | str | os.PathLike = field(repr=False)
    arch: str | None = None
    layer: Any = None
    image_size: int | None = None
    normalize: tuple[Sequence[float], Sequence[float]] | None = None
    pooling: str = "mean"


@dataclass(frozen=True)
class EncoderSpec:
    """What the Learner tells a method when it builds its heads, and what it serves on the method's request."""

    dim: int          # width of the pooled representation
    image_size: int   # side of the views
    channels: int     # channels of the views the net gets
    tokens: Any = field(default=None, repr=False)     # with "tokens" in needs: the user's ViT (vit.ViTTokens)
    teacher: Any = field(default=None, repr=False)    # with "teacher" in needs: frozen, hooked (teacher.Teacher)


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

    Methods that are not two-branch joint embeddings declare what else they need in ``needs``,
    and the Learner serves it in ``setup(spec)`` (which replaces ``build``): ``"tokens"`` puts
    token-level access to the user's ViT in ``spec.tokens`` (masked image modeling; other nets
    get a clear error); ``"teacher"`` builds the frozen teacher that ``teacher_request`` describes
    and puts it in ``spec.teacher`` (distillation). ``online(encode, views)`` replaces "projector
    on the pooled representation" for a batch of views; ``targets(views)`` gives targets from that
    teacher. A method never touches the user's net, hooks or devices itself.

    Class attributes a subclass sets:
        uses_target: keep an EMA copy of encoder + projector.
        momentum: the EMA decay at step 0 (cosine to 1.0 when total steps are known).
        needs: what the Learner must serve in ``setup`` (a subset of ``NEEDS``).
    """

    uses_target: bool = False
    momentum: float = 0.99
    needs: frozenset[str] = frozenset()
    teacher_request: TeacherRequest | None = None  # with "teacher" in needs: the teacher to build

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
        """Let go of anything the method holds outside itself (the Learner closes what it served)."""

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
