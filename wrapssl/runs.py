"""Which run a checkpoint folder holds, and whether a new Trainer continues it, starts fresh or is refused.

A folder holds one run. With ``resume=None`` (the default) the folder decides: empty, a
fresh start; holding a run with the same settings, that run continues (re-running a
command never starts over); holding a run with other settings, a ``RunConflictError``
lists the differences and the choices. ``resume="auto"`` continues the folder's run with
the new settings (more steps, a new learning rate: the schedule is rebuilt from them).
Continuing from a checkpoint that is not the folder's latest is refused, so later
checkpoints of another branch can never be mistaken for this run's.

A folder is trained by one process at a time: ``RunLock`` holds a kernel lock on
``<folder>/.lock`` from the Trainer's construction to its ``end()`` (rank 0 of a multi-process
run holds it), so a second run started into the folder is refused with ``RunLockedError``,
which names the holder. The kernel drops the lock when the holder dies, so a run killed even
with SIGKILL never leaves the folder stuck: the same command then continues it.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

from accelerate.utils import broadcast_object_list
from torch import nn

from .checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, restore_trainer

__all__ = ["SCHEDULE_SETTINGS", "RunConflictError", "RunLockedError", "RunLock", "changed_settings",
           "describe_changes", "choose_checkpoint", "lock_folder", "resume_run", "run_record"]

# Settings a resumed run may change: the learning-rate schedule, the optimiser's hyperparameters and the
# EMA momentum are rebuilt from the new values at the step reached.
SCHEDULE_SETTINGS = ("num_train_steps", "learning_rate", "warmup_steps", "weight_decay", "schedule", "min_lr_ratio",
                     "max_grad_norm", "method.total_steps")


class RunConflictError(ValueError):
    """The checkpoint folder holds a run this Trainer must not write into (see the module docstring)."""

    def __init__(self, message: str, folder: Path, checkpoint: Path, step: int, changed: dict[str, tuple[Any, Any]]):
        super().__init__(message)
        self.folder, self.checkpoint, self.step, self.changed = folder, checkpoint, step, changed


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (old value, new value)} for the settings both configs record and that differ."""
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}


def describe_changes(changed: Mapping[str, tuple[Any, Any]]) -> str:
    """'a 1 -> 2, b x -> y' for a ``changed_settings`` result."""
    def show(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in changed.items())


def _conflict(folder: Path, path: Path, state: dict, changed: dict, why: str, choices: str) -> RunConflictError:
    step, total = int(state["step"]), state.get("config", {}).get("num_train_steps", "?")
    return RunConflictError(f"{os.fspath(folder)} holds a run at step {step} of {total} ({path.name}){why}. {choices}",
                            folder, path, step, changed)


CHOICES = ("Continue it with these settings (resume='auto': a longer run or a new learning rate rebuilds the "
           "schedule), pick another checkpoint_folder, or delete its checkpoints to start over")


def choose_checkpoint(folder: Path, resume: str | os.PathLike | bool | None, config: Mapping[str, Any]
                      ) -> tuple[Path, dict] | None:
    """The checkpoint a Trainer with ``config`` continues from (path, validated state), or None for a fresh start.

    Raises RunConflictError when the folder holds a run that must not be mixed with this one,
    FileNotFoundError for a ``resume`` path that does not exist, ValueError for a bad checkpoint.
    """
    if resume is None or resume is False:
        path = latest_checkpoint(folder)
        if path is None:
            return None
        state = load_checkpoint(path)
        changed = changed_settings(state.get("config", {}), config)
        if resume is False:
            raise _conflict(folder, path, state, changed, "; resume=False would start this one at step 0 among its "
                                                          "checkpoints", CHOICES)
        if changed:
            raise _conflict(folder, path, state, changed, f" with other settings: {describe_changes(changed)}",
                            CHOICES)
        return path, state
    if resume is True or resume == "auto":
        path = latest_checkpoint(folder)
        return None if path is None else (path, load_checkpoint(path))
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {os.fspath(path)!r} does not exist; pass resume='auto' to "
                                f"continue from the latest one in {os.fspath(folder)!r}")
    state = load_checkpoint(path)
    found = list_checkpoints(folder)
    inside = path.resolve().parent == Path(folder).resolve()
    if found and (not inside or found[-1][0] > int(state["step"])):
        latest = found[-1][1]
        where = f"after step {state['step']} of {path.name}, which you resume from" if inside else \
            f"while you resume from {os.fspath(path)}"
        raise _conflict(folder, latest, load_checkpoint(latest), {}, f", {where}; the two would mix",
                        "Move its checkpoints away, or resume into an empty checkpoint_folder")
    return path, state


def resume_run(trainer: Any, resume: str | os.PathLike | bool | None) -> None:
    """Put ``trainer`` at the checkpoint that ``resume`` and its folder point to, if any (``choose_checkpoint``);
    say what it continues and which schedule settings changed."""
    found = choose_checkpoint(trainer.folder, resume, trainer.record)
    print_ = trainer.accelerator.print
    if found is None:
        if resume is True or resume == "auto":
            print_(f"wrapssl: no checkpoint in {trainer.folder}; starting from step 0")
        return
    path, state = found
    step, total = int(state["step"]), trainer.num_train_steps
    if step > total:
        raise ValueError(f"{path} is at step {step}, past this run's num_train_steps={total}; "
                         f"ask for more than {step} steps to continue it")
    changed = changed_settings(state.get("config", {}), trainer.record)
    rebuilt = {k: v for k, v in changed.items() if k in SCHEDULE_SETTINGS and not k.startswith("method.")}
    others = {k: v for k, v in changed.items() if k not in SCHEDULE_SETTINGS}
    if others:
        warnings.warn(f"resuming {path} with changed settings ({describe_changes(others)}); the run will not "
                      "match an uninterrupted one", stacklevel=3)
    restore_trainer(trainer, state)
    trainer.last_checkpoint = trainer.resumed_from = path
    how = "re-run with the same settings: " if resume is None else ""
    print_(f"wrapssl: {how}resumed from {path} at step {step} of {total}")
    if rebuilt and step < total:
        print_(f"wrapssl: schedule rebuilt for the new settings ({describe_changes(rebuilt)}): step {step + 1} "
               f"trains at lr {trainer.optimizer.param_groups[0]['lr']:.4g}, as a run planned with these settings "
               "from the start would")


def run_record(trainer: Any, learner_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings as JSON-able primitives, stored in its checkpoints and trackers: what a resumed run is
    compared with (the keys stay as they are, so runs written by earlier versions still resume)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, nn.Module):  # a teacher net: its class, not its whole repr
            return type(v).__name__
        return getattr(v, "__name__", repr(v))
    cfg, acc = trainer.config, trainer.accelerator
    record = {
        "net": type(trainer.net).__name__, "method": plain(getattr(cfg.method, "name", cfg.method)),
        "hidden_layer": plain(cfg.hidden_layer), "image_size": trainer.image_size, "channels": trainer.channels,
        "dataset_size": len(trainer.dataset), "batch_size": cfg.batch_size, "num_processes": acc.num_processes,
        "global_batch": trainer.global_batch, "gradient_accumulation_steps": trainer.grad_accum,
        "num_train_steps": trainer.num_train_steps, "learning_rate": trainer.lr, "optimizer": plain(cfg.optimizer),
        "weight_decay": plain(cfg.weight_decay), "scale_lr": cfg.scale_lr, "warmup_steps": trainer.warmup_steps,
        "schedule": cfg.schedule, "min_lr_ratio": cfg.min_lr_ratio, "mixed_precision": str(acc.mixed_precision),
        "max_grad_norm": plain(cfg.max_grad_norm), "seed": trainer.seed,
        # with the class name, the parameter count tells resnet18 from resnet50
        "net_params": sum(p.numel() for p in trainer.net.parameters()),
        "init": None if cfg.init is None else os.fspath(cfg.init),
    }
    record.update({f"method.{k}": plain(v) for k, v in learner_kwargs.items()})
    return record


LOCK_NAME = ".lock"


class RunLockedError(OSError):
    """Another live process is training into this checkpoint folder."""


class RunLock:
    """An exclusive lock on ``<folder>/.lock`` held until ``release()`` or this process ends.

    A POSIX record lock (``fcntl.lockf``) rather than ``flock``: the kernel drops it when the
    holder dies, and, unlike a flock, DataLoader workers forked from the holder do not inherit
    it, so a killed run's folder is free at once, not when its orphaned workers notice. Trainers
    of one process share the lock of a folder (a script that builds a second Trainer to resume
    the first one's run is one run); another process is refused with ``RunLockedError``. The file
    records the holder (pid, host, start time) for that message and is emptied on release.
    """

    _held: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()

    def __init__(self, folder: Path, file: Any):
        self.folder, self._file, self.holders = folder, file, 1

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> "RunLock | None":
        """The folder's lock for this process (made with the folder if need be); None where fcntl is missing."""
        try:
            import fcntl
        except ImportError:  # Windows: no POSIX locks; runs are not guarded there
            return None
        folder = Path(folder)
        key = os.path.realpath(folder)
        held = cls._held.get(key)
        if held is not None and held._file is not None:
            held.holders += 1
            return held
        try:
            folder.mkdir(parents=True, exist_ok=True)
            file = open(folder / LOCK_NAME, "a+", encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot write into checkpoint_folder {os.fspath(folder)} ({e.strerror or e}); pick "
                          "another folder") from None
        deadline = time.monotonic() + 2.0  # a new holder writes its name just after it locks
        while True:
            try:
                fcntl.lockf(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:  # EAGAIN or EACCES, as the platform says "held by another process"
                holder = _read_holder(file)
                if holder or time.monotonic() > deadline:
                    file.close()
                    raise RunLockedError(_locked_message(folder, holder)) from None
                time.sleep(0.1)
        file.seek(0)
        file.truncate()
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        file.write(f"pid {os.getpid()}\nhost {socket.gethostname()}\nsince {stamp}\n")
        file.flush()
        lock = cls(folder, file)
        cls._held[key] = lock
        return lock

    def release(self) -> None:
        """Drop this holder; the last one empties the lock file and unlocks it."""
        self.holders -= 1
        if self.holders <= 0 and self._file is not None:
            try:
                self._file.seek(0)
                self._file.truncate()
            except OSError:  # the folder went away: unlocking is all that matters
                pass
            self._file.close()  # closing the descriptor drops the lock
            self._file = None

    def __del__(self) -> None:
        if self._file is not None:
            self._file.close()


def lock_folder(accelerator: Any, folder: Path) -> RunLock | None:
    """The folder's run lock, taken by the main process; every process raises if the folder cannot be locked
    (``RunLockedError``: another live run trains into it)."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock.acquire(folder)
        except OSError as e:
            refused = (isinstance(e, RunLockedError), str(e))
    if accelerator.num_processes > 1:
        refused = broadcast_object_list([refused])[0]
    if refused is not None:
        raise (RunLockedError if refused[0] else OSError)(refused[1])
    return lock


def _read_holder(file: Any) -> dict[str, str]:
    """The holder the lock file records ({'pid', 'host', 'since'}); empty if it says nothing."""
    try:
        file.seek(0)
        lines = file.read().splitlines()
    except OSError:
        return {}
    return dict(line.split(" ", 1) for line in lines if " " in line)


def _locked_message(folder: Path, holder: Mapping[str, str]) -> str:
    """The one line that refuses a second run into ``folder``."""
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    return f"{os.fspath(folder)} is being trained by {who}; wait for it, stop it, or pick another checkpoint_folder"
