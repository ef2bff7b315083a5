"""Optimisers for pretraining and their learning-rate factor: LARS, weight-decay groups, warmup + cosine."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["LARS", "WarmupCosine", "param_groups", "build_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("adamw", "sgd", "lars")


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017, arXiv:1708.03888).

    For each parameter ``p`` with gradient ``g`` that is adapted:
    ``u = g + wd·p``; ``u ← u · η‖p‖/‖u‖`` (when both norms are > 0); ``m ← μ·m + u``;
    ``p ← p − lr·m``, with trust coefficient η = 0.001 as in BYOL and Barlow Twins.
    1-D parameters (biases, BatchNorm/LayerNorm scales) are left out of both the
    weight decay and the adaptation (``exclude_1d``), as in those papers; a group
    may also set ``lars_exclude=True`` to leave all its parameters out.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, exclude_1d: bool = True, eps: float = 0.0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}; 0.001 is usual")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        exclude_1d=exclude_1d, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One LARS update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adapted, plain = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients; use dense embeddings or AdamW")
                skip = group["lars_exclude"] or (group["exclude_1d"] and p.ndim <= 1)
                (plain if skip else adapted).append(p)
            updates = [p.grad for p in plain] + (self._adapt(group, adapted) if adapted else [])
            self._momentum_step(group, plain + adapted, updates)
        return loss

    def _adapt(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Weight-decayed, trust-scaled updates for ``params``."""
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        p_norms = torch._foreach_norm(params)
        u_norms = torch._foreach_norm(grads)
        updates = []
        for g, pn, un in zip(grads, p_norms, u_norms):
            # a zero norm (fresh zero-init weight, zero gradient) keeps the plain update
            trust = torch.where((pn > 0) & (un > 0), group["trust_coefficient"] * pn / (un + group["eps"]),
                                torch.ones_like(pn))
            updates.append(g * trust)
        return updates

    def _momentum_step(self, group: dict, params: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
        """Heavy-ball momentum on the (adapted) updates, then ``p -= lr · m``."""
        if not params:
            return
        if group["momentum"]:
            bufs = []
            for p, u in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = u.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(u)
                bufs.append(state["momentum_buffer"])
            updates = bufs
        torch._foreach_add_(params, updates, alpha=-group["lr"])


class WarmupCosine:
    """LR factor for optimiser step ``s`` (0-based): linear warmup to 1, then cosine to ``min_ratio``.

    ``factor(s) = (s+1)/warmup`` for ``s < warmup``, then
    ``min_ratio + (1-min_ratio)·½(1+cos(π·(s−warmup)/(total−warmup)))``. The Trainer
    precomputes it per step (``schedules.Schedules``).
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, cosine: bool = True):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.min_ratio, self.cosine = float(min_ratio), bool(cosine)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights with ``weight_decay``, 1-D ones (biases, norms) without."""
    decay, no_decay, seen = [], [], set()
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
    return [g for g in groups if g["params"]]


def build_optimizer(name: str | type[Optimizer], module: nn.Module, lr: float, weight_decay: float | None = None,
                    **kwargs: Any) -> Optimizer:
    """An optimiser over ``module``'s trainable parameters by name ("adamw", "sgd", "lars") or class.

    Named optimisers exclude 1-D parameters from weight decay (and LARS from
    adaptation). A class gets every trainable parameter in one group, as in
    byol-pytorch, with ``lr`` and ``kwargs`` (and ``weight_decay`` if given).
    """
    if not isinstance(name, str):
        if not (isinstance(name, type) and issubclass(name, Optimizer)):
            raise TypeError(f"optimizer must be one of {OPTIMIZERS} or a torch.optim.Optimizer class, got {name!r}")
        extra = {} if weight_decay is None else {"weight_decay": weight_decay}
        return name([p for p in module.parameters() if p.requires_grad], lr=lr, **extra, **kwargs)
    key = name.lower()
    if key == "adamw":
        wd = 0.05 if weight_decay is None else weight_decay
        groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in param_groups(module, wd)]
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    if key == "sgd":
        wd = 1e-4 if weight_decay is None else weight_decay
        groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in param_groups(module, wd)]
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(groups, lr=lr, **kwargs)
    if key == "lars":
        wd = 1.5e-6 if weight_decay is None else weight_decay
        return LARS(param_groups(module, wd), lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS} or pass a torch.optim.Optimizer class")
