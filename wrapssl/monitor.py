"""What a run measures as it trains: non-finite losses and blown-up weights, time, images/s, the progress bar.

The non-finite monitor keeps loss sums and the first bad step on the device, read only when logging.

Each step adds the loss to an on-device running sum and records, still on the
device, the first step whose loss was not finite. Both are read once per
``log_every`` steps (the read that logging needs anyway) and before every
checkpoint, evaluation and health check, so a NaN stops the run at the next such
point, names the step where it began, and never reaches a checkpoint file. At the
same points the weights are checked: not finite, or a norm grown more than
MAX_WEIGHT_GROWTH-fold since the run (re)started (a finite blow-up), stops the run too.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

__all__ = ["NonFiniteLossError", "LossMonitor", "Throughput", "TrainClock", "RunEstimate", "Progress",
           "stop_if_unsound", "WeightWatch", "all_finite", "non_finite", "weight_norm", "failure_message",
           "MAX_WEIGHT_GROWTH"]

ESTIMATE_AFTER = 10  # steps after which the run's remaining time is printed
MAX_WEIGHT_GROWTH = 1000.0  # weight norm growth that marks a diverged run (normal runs stay within a few x)


class NonFiniteLossError(FloatingPointError):
    """The run diverged: the loss or the weights stopped being finite, or the weights' norm blew up (grew more
    than MAX_WEIGHT_GROWTH-fold). Training was stopped before any checkpoint held those weights."""


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


class TrainClock:
    """Seconds spent training, the time of evaluations and other checks left out (``pause``, then ``start``)."""

    def __init__(self) -> None:
        self.seconds, self.started = 0.0, None

    def resume(self, history: Mapping[str, Any], step: int) -> None:
        """Count from now on; a run resumed at ``step`` > 0 goes on from the "train_minutes" its log ends with."""
        minutes = history.get("train_minutes")
        if minutes and step > 0:
            self.seconds = 60 * minutes[-1][1]
        self.start()

    def start(self) -> None:
        """Count from now on (a no-op while counting)."""
        if self.started is None:
            self.started = time.perf_counter()

    def pause(self) -> None:
        """Stop counting until the next ``start``."""
        if self.started is not None:
            self.seconds += time.perf_counter() - self.started
            self.started = None

    @property
    def minutes(self) -> float:
        """Minutes counted so far."""
        running = time.perf_counter() - self.started if self.started is not None else 0.0
        return (self.seconds + running) / 60


def duration(seconds: float) -> str:
    """A duration as a person reads it: 40 s, 25 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunEstimate:
    """How long the rest of a run takes at the speed of its first steps, said once after ``after`` steps.

    The first step is left out of the speed (it allocates, warms caches, compiles).
    """

    def __init__(self, after: int = 10):
        self.after, self.steps, self.first = after, 0, 0.0

    def update(self, step: int, total: int, seconds: float) -> str | None:
        """Count a step (``seconds``: training time so far); the estimate at the ``after``-th, while steps are
        left."""
        self.steps += 1
        if self.steps == 1:
            self.first = seconds
        if self.steps != self.after or step >= total:
            return None
        per_step = (seconds - self.first) / (self.after - 1)
        return (f"wrapssl: {per_step:.3g} s per step: about {duration(per_step * (total - step))} for the "
                f"{total - step} step{'s' * (total - step != 1)} left at this speed (evaluations and checkpoints "
                "not counted)")


class Progress:
    """What one fit() shows and measures as it goes: the progress bar, the loss window (``loss``), images/s and
    the remaining-time note said once after ``ESTIMATE_AFTER`` steps."""

    def __init__(self, accelerator: Accelerator, images_per_step: int, step: int, total: int, show: bool):
        self.loss, self.meter, self.estimate = LossMonitor(accelerator.device), Throughput(images_per_step), \
            RunEstimate(ESTIMATE_AFTER)
        self.show, self.total = show and accelerator.is_main_process, total
        self.bar = tqdm(total=total, initial=step, desc="pretraining", dynamic_ncols=True, disable=not self.show)

    def stepped(self, step: int, seconds: float) -> None:
        """Count optimiser step ``step`` (``seconds``: training time so far); print the estimate when due."""
        self.bar.update(1)
        self.meter.steps += 1
        note = self.estimate.update(step, self.total, seconds)
        if note and self.show:
            self.bar.write(note)  # above the progress bar, not into its line

    def values(self, loss: float, lr: float, momentum: float | None, minutes: float) -> dict[str, float]:
        """The values a log point records (no momentum without one); starts the next loss window."""
        values = {"loss": loss, "lr": lr, "momentum": momentum, "images_per_s": self.meter.rate(),
                  "train_minutes": minutes}
        values = {k: v for k, v in values.items() if v is not None}
        self.loss.reset()
        self.bar.set_postfix({k[:5]: f"{v:.4g}" for k, v in values.items() if k != "train_minutes"})
        return values


def non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an inf (one host sync)."""
    names = [k for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not names:
        return []
    checks = [torch.isfinite(tensors[k]).all() for k in names]
    # FSDP's shards answer for the whole tensor (a collective: every process calls this)
    finite = torch.stack([c.full_tensor() if hasattr(c, "full_tensor") else c for c in checks]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def all_finite(module: nn.Module) -> bool:
    """True if every floating-point parameter and buffer of ``module`` is finite (one host sync)."""
    return not non_finite(module.state_dict())


def weight_norm(module: nn.Module) -> float:
    """The L2 norm over every floating-point parameter of ``module`` (inf when huge but finite weights overflow it;
    NaN or inf when a weight is)."""
    params = [p.detach() for p in module.parameters() if p.is_floating_point()]
    if not params:
        return 0.0
    return float(torch.stack([n.float() for n in torch._foreach_norm(params)]).norm())


class WeightWatch:
    """Finite blow-ups: the weight norm against its value when the run (re)started.

    Normal runs change the norm by a small factor; a diverged one (e.g. LARS at a huge
    learning rate) multiplies it by orders of magnitude while every value stays finite.
    One pass over the weights: a finite norm also proves every weight finite.
    """

    def __init__(self, module: nn.Module, limit: float = MAX_WEIGHT_GROWTH):
        self.limit, self.start = limit, weight_norm(module)

    def problem(self, module: nn.Module) -> str | None:
        """What is wrong with the weights now (not finite, or grown past the limit), or None."""
        now = weight_norm(module)
        if not math.isfinite(now):
            bad = non_finite(dict(module.named_parameters()))
            if bad:
                return f"the weights became NaN or infinite ({', '.join(bad[:2])})"
        if not now <= self.limit * max(self.start, 1e-12):  # an overflowed (inf) norm of finite weights too
            return f"the weights' norm grew from {self.start:.4g} to {now:.4g} (more than {self.limit:g}x)"
        return None


def stop_if_unsound(trainer: Any, watch: WeightWatch | None, losses: LossMonitor | None = None) -> float | None:
    """The mean loss of ``losses``' window over all processes (None without it); if a loss was not finite or
    ``trainer``'s weights are not sound (not finite, or grown past ``watch``'s limit), the trainer is ended and
    NonFiniteLossError says the step and what to try."""
    loss, step = losses.read(trainer.accelerator) if losses is not None else (None, None)
    problem = "the loss became NaN or infinite" if step is not None else None
    if problem is None:
        step = trainer.step
        bad = non_finite(trainer.learner.state_dict()) if watch is None else None
        problem = watch.problem(trainer.learner) if watch is not None else \
            (f"the weights became NaN or infinite ({', '.join(bad[:2])})" if bad else None)
    if problem:
        message = failure_message(problem, step, trainer.num_train_steps, trainer.last_checkpoint, trainer.lr,
                                  str(trainer.accelerator.mixed_precision), trainer.config.max_grad_norm)
        trainer.end()
        raise NonFiniteLossError(message)
    return loss


def failure_message(problem: str, step: int, total_steps: int, last_checkpoint: Path | None, lr: float,
                    mixed_precision: str, max_grad_norm: float | None) -> str:
    """What went wrong (``problem``, e.g. "the loss became NaN or infinite"), what was kept, and what to try."""
    kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else \
        "no checkpoint was written before it"
    hints = [f"a lower learning rate (now {lr:g}; try {lr / 10:g})"]
    if mixed_precision != "no":
        hints.append(f"full precision instead of {mixed_precision} (mixed_precision='no')")
    if max_grad_norm is None:
        hints.append("gradient clipping (max_grad_norm=1.0)")
    hints.append("a longer warmup (warmup_steps)")
    return (f"{problem} at step {step} (of {total_steps}); training stopped and {kept}. "
            f"Try {', '.join(hints)}, then resume with resume='auto' or start again.")
