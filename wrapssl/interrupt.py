"""Ctrl-C and SIGTERM while a run trains: finish the current step, write a checkpoint, then stop.

The first SIGINT (Ctrl-C) or SIGTERM (what clusters send before preempting a job) only
asks the loop to stop; the loop checks between optimiser steps, so the checkpoint holds a
complete step. A second Ctrl-C stops at once, without a checkpoint. Handlers are installed
only from the main thread and restored when the run ends.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

import torch

__all__ = ["Interrupted", "TrainingInterrupted", "StopRequest", "sigterm_interrupts", "ignore_stop_signals",
           "SIGNALS"]

SIGNALS = ("SIGINT", "SIGTERM")


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal (``signal_name``: "SIGINT" or "SIGTERM")."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(getattr(signal, self.signal_name))


class TrainingInterrupted(Interrupted):
    """The run stopped on a signal after writing ``checkpoint`` at ``step``."""

    def __init__(self, message: str, signal_name: str, step: int, checkpoint: Path | None):
        super().__init__(message, signal_name)
        self.step, self.checkpoint = step, checkpoint


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: Ctrl-C reaches the terminal's whole process group and clusters signal
    every process, but only the main process may decide when to stop; a worker killed by the signal would end
    the run before its checkpoint. Workers still exit with the main process."""
    for name in SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``Interrupted`` inside (as Ctrl-C raises KeyboardInterrupt), so a program can end it
    cleanly; a training loop inside installs its own, gentler handling (``StopRequest``)."""
    def handle(signum: int, frame: FrameType | None) -> None:
        raise Interrupted("terminated by SIGTERM", "SIGTERM")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, handle) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """A context that turns SIGINT/SIGTERM into a request the training loop reads (``requested``)."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the first signal received
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait
                raise KeyboardInterrupt
            return
        self.requested = name
        print(f"\nwrapssl: {name} received: stopping after this step and writing a checkpoint "
              f"({'Ctrl-C again to stop at once, without one' if signum == signal.SIGINT else 'please wait'})",
              file=sys.stderr, flush=True)

    def agreed(self, accelerator: Any, log_point: bool) -> bool:
        """True when the run should stop now: at once on one process, at the next log point on many (all
        processes must checkpoint the same step; the flag rides on a reduction there)."""
        if accelerator.num_processes == 1:
            return self.requested is not None
        if not log_point:
            return False
        flag = torch.tensor([float(self.requested is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def interrupted(self, step: int, total: int, checkpoint: Path | None) -> TrainingInterrupted:
        """The error that ends a run stopped at ``step`` (of ``total``), saved in ``checkpoint``."""
        name = self.requested or "SIGTERM"  # None: another process received it
        return TrainingInterrupted(f"training stopped by {name} at step {step} of {total}; {checkpoint} holds it. "
                                   "Run again (same settings, or resume='auto') to continue", name, step, checkpoint)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
