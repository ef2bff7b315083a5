"""The EMA target network and its momentum schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from .nnutil import copy_module


def cosine_momentum(base: float, step: int, total_steps: int | None) -> float:
    """Momentum at ``step``: ``base`` rising to 1.0 on a cosine over ``total_steps`` (constant if None)."""
    if not total_steps:
        return base
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def make_target(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online``: no gradients, same mode, same values."""
    target = copy_module(online)
    target.requires_grad_(False)
    return target


class EMA:
    """Moves a target module towards an online module with one fused update per call.

    Parameters follow ``t ← m·t + (1−m)·o``; buffers (BN running statistics,
    counters) are copied from the online module so the target's normalisation
    matches the network it averages.
    """

    def __init__(self, online: nn.Module, target: nn.Module):
        self.online, self.target = online, target
        self.refresh()

    def refresh(self) -> None:
        """Cache the tensor lists, so a step does no Python loop over parameters; call it after the modules'
        parameters were replaced (sharding), so the cache holds no old tensors."""
        op, tp = list(self.online.parameters()), list(self.target.parameters())
        ob, tb = list(self.online.buffers()), list(self.target.buffers())
        if len(op) != len(tp) or len(ob) != len(tb):
            raise ValueError("online and target modules differ in structure; build the target with make_target")
        self._params, self._buffers = (op, tp), (ob, tb)

    def _stale(self) -> bool:
        # .to()/.cuda() replace buffer (and sometimes parameter) objects wholesale
        current = (self.online.parameters(), self.target.parameters(), self.online.buffers(), self.target.buffers())
        for cached, now in zip((*self._params, *self._buffers), current):
            if next(now, None) is not (cached[0] if cached else None):
                return True
        return False

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One EMA step with the given momentum."""
        if self._stale():
            self.refresh()
        online, target = self._params
        if target:
            torch._foreach_lerp_(target, online, 1.0 - momentum)
        online_b, target_b = self._buffers
        if target_b:
            torch._foreach_copy_(target_b, online_b)
