"""The Method interface and the registry of methods by name."""
from __future__ import annotations

import difflib
from itertools import combinations
from typing import Callable

import torch
from torch import nn

from ..augment import Views

_REGISTRY: dict[str, type["Method"]] = {}


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
