"""The non-finite monitor: loss sums and the first bad step kept on the device, read only when logging.

Each step adds the loss to an on-device running sum and records, still on the
device, the first step whose loss was not finite. Both are read once per
``log_every`` steps (the read that logging needs anyway) and before every
checkpoint, so a NaN stops the run at the next log or checkpoint point, names
the step where it began, and never reaches a checkpoint file. Parameters are
also checked for finiteness before each save.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

__all__ = ["NonFiniteLossError", "LossMonitor", "Throughput", "all_finite", "failure_message"]


class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) stopped being finite; training was stopped before any bad checkpoint."""


class LossMonitor:
    """Running loss sum and first non-finite step, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self.first_bad = torch.full((), -1.0, device=device)  # float32: exact to 16M steps, and MPS has no float64

    def reset(self) -> None:
        """Start a new logging window (the first-bad record persists)."""
        self.total = torch.zeros((), device=self.device)
        self.count = 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Account one micro-batch loss belonging to optimiser step ``step`` (1-based)."""
        value = loss.detach().float()
        self.total += value
        self.count += 1
        bad = ~torch.isfinite(value) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def read(self, accelerator: Accelerator) -> tuple[float, int | None]:
        """(mean loss of the window over all processes, first non-finite step or None). Collective."""
        count = torch.full_like(self.total, float(self.count))
        local = torch.stack([self.total, count, self.first_bad]).view(1, 3)
        stats = (accelerator.gather(local) if accelerator.num_processes > 1 else local).view(-1, 3).cpu()
        bad = [int(b) for b in stats[:, 2].tolist() if b >= 0]
        total, n = stats[:, 0].sum().item(), stats[:, 1].sum().item()
        return total / max(n, 1.0), (min(bad) if bad else None)


class Throughput:
    """Images per second over the optimiser steps since the last restart."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.restart()

    def restart(self) -> None:
        """Start timing again (after an evaluation or a checkpoint, which are not training)."""
        self.start, self.steps = time.perf_counter(), 0

    def rate(self) -> float:
        """Images per second since the restart."""
        return self.steps * self.images_per_step / max(time.perf_counter() - self.start, 1e-9)


def all_finite(module: nn.Module) -> bool:
    """True if every floating-point parameter and buffer of ``module`` is finite (one host sync)."""
    tensors = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def failure_message(what: str, step: int, total_steps: int, last_checkpoint: Path | None, lr: float,
                    mixed_precision: str, max_grad_norm: float | None) -> str:
    """What went wrong, what was kept, and what to try, in one message."""
    kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else \
        "no checkpoint was written before it"
    hints = [f"a lower learning rate (now {lr:g}; try {lr / 10:g})"]
    if mixed_precision != "no":
        hints.append(f"full precision instead of {mixed_precision} (mixed_precision='no')")
    if max_grad_norm is None:
        hints.append("gradient clipping (max_grad_norm=1.0)")
    hints.append("a longer warmup (warmup_steps)")
    return (f"the {what} became NaN or infinite at step {step} (of {total_steps}); training stopped and "
            f"{kept}. Try {', '.join(hints)}, then resume with resume='auto' or start again.")
