"""What a run logs: Accelerate trackers (TensorBoard, a CSV file) and the history kept for checkpoints and plots."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from .files import atomic_open, atomic_write_text

__all__ = ["CSVTracker", "TRACKERS", "make_trackers", "RunLog"]

TRACKERS = ("tensorboard", "csv")


class CSVTracker(GeneralTracker):
    """An Accelerate tracker writing ``step,name,value`` rows to a CSV file (long format).

    On resume (``resume_step``) rows logged after that step by the interrupted
    run are dropped, so the file never holds two values for one step.
    """

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.resume_step = resume_step
        self._file = None
        self._writer = None

    def start(self) -> None:
        """Open the file, keeping the rows up to ``resume_step`` of an earlier run."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[list[str]] = []
        if self.resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= self.resume_step]
        # rewrite through a temp file so a crash here cannot lose the old log
        with atomic_open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["step", "name", "value"], *rows])
        self._open()

    def _open(self) -> None:
        """Append to the file (started already: nothing is rewritten)."""
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        """The run's settings as ``config.json`` beside the CSV."""
        atomic_write_text(self.path.with_name("config.json"), json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        """One row per numeric value, flushed at once (a killed run keeps what it logged)."""
        if self._writer is None:  # logging after finish() appends; it never drops rows
            self.start() if not self.path.is_file() else self._open()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.writerow([step, key, repr(float(value))])
        self._file.flush()

    def finish(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


def tensorboard_available() -> bool:
    """True if torch's TensorBoard writer can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def make_trackers(log_with: Sequence[str], folder: Path) -> tuple[list[Any], CSVTracker | None]:
    """Accelerate's ``log_with`` list for ``log_with`` (names among TRACKERS), and the CSV tracker in it."""
    unknown = set(log_with) - set(TRACKERS)
    if unknown:
        raise ValueError(f"log_with accepts {' and '.join(map(repr, TRACKERS))}, got {sorted(unknown)}")
    trackers: list[Any] = []
    if "tensorboard" in log_with:
        if tensorboard_available():
            trackers.append("tensorboard")
        else:
            print("wrapssl: tensorboard is not installed; logging to CSV only (pip install tensorboard)")
    csv_tracker = CSVTracker(folder / "metrics.csv") if "csv" in log_with else None
    if csv_tracker is not None:
        trackers.append(csv_tracker)
    return trackers, csv_tracker


class RunLog:
    """Values logged by step: kept in ``history`` and sent to the Accelerator's trackers."""

    def __init__(self, accelerator: Accelerator, csv_tracker: CSVTracker | None = None):
        self.accelerator, self.csv_tracker = accelerator, csv_tracker
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.started = False

    def start(self, step: int, config: dict) -> None:
        """Start the trackers once; a run resumed at ``step`` drops what its predecessor logged after it."""
        if self.started:
            return
        if self.csv_tracker is not None:
            self.csv_tracker.resume_step = step if step > 0 else None
        # the checkpoint of ``step`` was written after that step was logged: purge only what came later
        init = {"tensorboard": {"purge_step": step + 1}} if step > 0 else {}
        self.accelerator.init_trackers("wrapssl", config=config, init_kwargs=init)
        self.started = True

    def log(self, values: dict[str, float], step: int) -> None:
        """Record ``values`` at ``step``."""
        for k, v in values.items():
            self.history.setdefault(k, []).append((step, float(v)))
        self.accelerator.log(values, step=step)

    def state_dict(self) -> dict[str, list[list[float]]]:
        """The history as plain lists (for a ``weights_only`` checkpoint)."""
        return {k: [[s, v] for s, v in pts] for k, pts in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``."""
        self.history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state.items()}
