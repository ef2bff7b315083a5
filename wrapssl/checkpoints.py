"""Trainer checkpoints and exports: names, atomic writes, pruning, ``weights_only`` loading, RNG states."""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed

from .files import atomic_save
from .fsdp import checkpoint_entries, is_sharded, restore_entries
from .monitor import non_finite

__all__ = ["CHECKPOINT_FORMAT", "list_checkpoints", "latest_checkpoint", "load_checkpoint", "write_checkpoint",
           "trainer_state", "save_trainer", "restore_trainer", "rng_state", "set_rng_state"]

CHECKPOINT_FORMAT = "wrapssl.trainer"
CHECKPOINT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
_REQUIRED = ("step", "learner", "optimizer", "data")
# temp files of atomic writes into a run folder (files.atomic_open: ".<name>.<random>.tmp")
_TEMP_RE = re.compile(r"^\.(checkpoint-\d+\.pt|checkpoint-\d+\.shards|backbone\.pt|backbone\.safetensors|"
                      r"metrics\.csv|metrics\.json|config\.json)\..+\.tmp$")


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (zero-padded, so names sort by step)."""
    return Path(folder) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _others(path: Path) -> str:
    """Advice naming the folder's other checkpoints, for a checkpoint that cannot be used."""
    others = [p.name for _, p in list_checkpoints(path.parent) if p != path]
    return (f"resume from an earlier one ({', '.join(others[-3:])}) or start without resume" if others
            else "start without resume")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Trainer checkpoint as plain data, loaded with ``weights_only=True`` onto the CPU and validated.

    ValueError (naming the folder's other checkpoints) for a file that is not a complete
    wrapssl checkpoint, or whose weights hold NaN or inf (saved from a diverged run).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{os.fspath(path)} is not a readable checkpoint ({type(e).__name__}: {e}); "
                         f"{_others(path)}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a wrapssl Trainer checkpoint (for the bare net weights "
                         "use net.load_state_dict(torch.load(path)) instead)")
    if int(state.get("version", 1)) > CHECKPOINT_VERSION:
        raise ValueError(f"{os.fspath(path)} was written by a newer wrapssl (checkpoint version "
                         f"{state['version']}, this one reads {CHECKPOINT_VERSION}); upgrade wrapssl")
    missing = [k for k in _REQUIRED if not isinstance(state.get(k), (dict, int))]
    if missing:
        raise ValueError(f"{os.fspath(path)} lacks {', '.join(missing)}: it is damaged; {_others(path)}")
    bad = non_finite(state["learner"])
    if bad:
        raise ValueError(f"{os.fspath(path)} holds NaN or infinite weights ({', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}): the run had diverged; {_others(path)}, "
                         "with a lower learning rate")
    return state


def write_checkpoint(state: dict, folder: str | os.PathLike, step: int, keep: int) -> Path:
    """Save ``state`` atomically as the checkpoint of ``step``; keep only the newest ``keep``."""
    path = checkpoint_path(folder, step)
    atomic_save(state, path)
    for _, old in list_checkpoints(folder)[:-keep]:
        if old != path:
            with contextlib.suppress(FileNotFoundError):  # another tool may have removed it already
                old.unlink()
            shutil.rmtree(old.with_suffix(".shards"), ignore_errors=True)  # an FSDP run's shards
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders that killed writes left in a run folder (never complete files);
    returns what was removed."""
    removed = []
    for stale in Path(folder).glob(".*.tmp"):
        if _TEMP_RE.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and moved to the CPU (containers rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def trainer_state(trainer: Any) -> dict:
    """A Trainer's full training state as tensors and primitive containers (``weights_only``-loadable): no
    private field of any torch class; the lr and momentum schedules are rebuilt from the settings on resume."""
    scaler = trainer.accelerator.scaler
    weights = checkpoint_entries(trainer.learner, trainer.optimizer, trainer.fsdp_plugin,
                                 checkpoint_path(trainer.folder, trainer.step)) if is_sharded(trainer.learner) else \
        {"learner": to_cpu(trainer.learner.state_dict()), "optimizer": to_cpu(trainer.optimizer.state_dict())}
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": trainer.step, **weights,
            "scaler": to_cpu(scaler.state_dict()) if scaler is not None else None,
            "data": {"epoch": trainer.epoch, "samples_in_epoch": trainer.samples_in_epoch, "seed": trainer.seed},
            "config": dict(trainer.record), "history": trainer.run_log.state_dict()}


def save_trainer(trainer: Any) -> Path:
    """Write ``trainer_state`` with every process's RNG state (each resumes its own augmentation stream) as the
    checkpoint of its step, atomically, from the main process; prune old ones. Collective."""
    acc = trainer.accelerator
    state = trainer_state(trainer)
    state["rng"] = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
    if acc.is_main_process:
        write_checkpoint(state, trainer.folder, trainer.step, trainer.config.keep_checkpoints)
    acc.wait_for_everyone()
    return checkpoint_path(trainer.folder, trainer.step)


def restore_trainer(trainer: Any, state: dict, rng: bool = True) -> None:
    """Put a Trainer at a ``trainer_state`` (and this process's RNG state when ``rng``): weights, the one step
    counter (the Learner's), the optimiser's moments (its hyperparameters stay this run's), the data position and
    the log. Checkpoints of earlier versions (with a "scheduler" entry) load the same way."""
    optimizer, acc = trainer.optimizer, trainer.accelerator
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        if is_sharded(trainer.learner):
            restore_entries(trainer.learner, optimizer, state, trainer.folder)
        else:
            trainer.learner.load_state_dict(state["learner"])
    except RuntimeError as e:
        raise ValueError(f"the checkpoint does not fit this net/method ({e}); resume with the same "
                         "architecture, hidden_layer and method, or start a new checkpoint_folder") from e
    if not is_sharded(trainer.learner):
        optimizer.load_state_dict(state["optimizer"])
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    if state.get("scaler") is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    trainer.learner.step = int(state["step"])
    trainer.schedules.set_lr(optimizer, trainer.step)  # this run's schedule, at the step reached
    trainer.epoch, trainer.samples_in_epoch = int(state["data"]["epoch"]), int(state["data"]["samples_in_epoch"])
    trainer.run_log.load_state_dict(state.get("history", {}))
    if rng:
        states = state.get("rng") or []
        if len(states) == acc.num_processes:
            set_rng_state(states[acc.process_index])
        else:  # a different process count: fresh but reproducible streams
            set_seed(trainer.seed + 1_000 * trainer.step, device_specific=True)


def rng_state() -> dict:
    """This process's torch, CUDA, NumPy and Python RNG states as tensors and primitives."""
    np_state = np.random.get_state()
    version, mt, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
