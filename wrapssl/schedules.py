"""Per-step schedules computed up front: the learning-rate factor and the EMA momentum of every optimiser step."""
from __future__ import annotations

from array import array
from typing import Any, Sequence

from .ema import cosine_momentum
from .optim import WarmupCosine

__all__ = ["Schedules"]


class Schedules:
    """The learning-rate factor and the EMA momentum of every optimiser step ``s`` (0-based), as arrays.

    ``lr[s]`` multiplies each parameter group's base learning rate (``base_lrs``) for step ``s``
    (linear warmup, then cosine to ``min_lr_ratio`` or constant: ``optim.WarmupCosine``);
    ``momentum[s]`` is the EMA momentum of step ``s`` (``base_momentum`` rising to 1 on a cosine
    over ``momentum_steps``, constant if None). Both hold ``total_steps + 1`` entries, the last
    being the value after the run. Built from the settings, never saved: a resumed run with
    other settings gets the schedule those settings make, at the step reached (as dinov2 and
    moco-v3 pass precomputed values into the step).
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0, cosine: bool = True,
                 base_momentum: float = 1.0, momentum_steps: int | None = None, base_lrs: Sequence[float] = ()):
        factor = WarmupCosine(total_steps, warmup_steps, min_lr_ratio, cosine=cosine)
        self.total_steps, self.base_lrs = int(total_steps), list(base_lrs)
        # arrays of doubles: 8 bytes a step, and indexing gives plain Python floats (checkpoint-safe)
        self.lr = array("d", (factor(s) for s in range(self.total_steps + 1)))
        self.momentum = array("d", (cosine_momentum(base_momentum, s, momentum_steps)
                                    for s in range(self.total_steps + 1)))

    def set_lr(self, optimizer: Any, step: int) -> None:
        """Give each parameter group of ``optimizer`` its base lr (``base_lrs``) times the factor of step ``step``."""
        factor = self.lr[min(max(step, 0), self.total_steps)]
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
