"""Fine-tuning run folders: the settings a run records, its checkpoints and resume, and the saved classifier.

``finetune.finetune`` trains; this room decides what a folder holds and reads and writes it:
``finetune-<step>.pt`` checkpoints (atomic, the newest two), ``classifier.safetensors`` (the net and the
head, with the backbone's metadata) and ``finetune.json`` (the test accuracy and the settings).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .backbone import Backbone, BackboneInfo, Classifier

__all__ = ["FinetuneConflictError", "load_classifier", "CLASSIFIER", "RESULT"]

CHECKPOINT_FORMAT = "wrapssl.finetune"
CLASSIFIER = "classifier.safetensors"
RESULT = "finetune.json"


class FinetuneConflictError(ValueError):
    """The output folder holds a fine-tuning run with other settings."""


def run_config(settings: Any, bb: Backbone, num_classes: int, side: int, global_batch: int,
            keep: Sequence[int], labels: torch.Tensor) -> dict[str, Any]:
    """The run's settings as plain data: what a continued run must share with the one it continues."""
    import hashlib

    digest = hashlib.sha256(torch.tensor(list(keep), dtype=torch.int64).numpy().tobytes()
                            + labels.numpy().astype("int64").tobytes()).hexdigest()[:16]
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
           if k not in ("checkpoint_every", "num_workers")}
    cfg.update(arch=bb.info.arch, net=type(bb.net).__name__, num_classes=num_classes, image_size=side,
               global_batch=global_batch, labelled=len(keep), labelled_sha=digest)
    return cfg


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The fine-tuning checkpoints in ``folder`` as (step, path), oldest first."""
    found = []
    for path in folder.glob("finetune-*.pt"):
        stem = path.stem.partition("-")[2]
        if stem.isdigit():
            found.append((int(stem), path))
    return sorted(found)


def resume_point(folder: Path | None, config: dict, resume: bool | None) -> tuple[int, dict | None]:
    """(step to start at, checkpoint state or None) for the run in ``folder``; refuses another run's folder."""
    if folder is None:
        return 0, None
    found = _checkpoints(folder) if folder.is_dir() else []
    if not found:
        if folder.is_dir() and any(folder.glob("checkpoint-*.pt")):
            raise FinetuneConflictError(f"{folder} holds a pretraining run; fine-tune into another folder "
                                        "(--out)")
        return 0, None
    step, path = found[-1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable fine-tuning checkpoint ({type(e).__name__}: {e}); delete it "
                         "to start over") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a wrapssl fine-tuning checkpoint; pick another --out")
    if resume is False:
        raise FinetuneConflictError(f"{folder} already holds a fine-tuning run (step {step}); pick another --out "
                                    "or delete it to start over")
    old = state.get("config", {})
    changed = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v and k != "steps"}
    if changed and not resume:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise FinetuneConflictError(f"{folder} holds a fine-tuning run with other settings ({shown}); pick another "
                                    "--out, delete it to start over, or --resume to continue with the new settings")
    if step > config["steps"]:
        raise FinetuneConflictError(f"{path} is at step {step}, past steps={config['steps']}; ask for more steps "
                                    "or pick another --out")
    return step, state


def save_checkpoint(acc: Any, model: Classifier, optimizer: torch.optim.Optimizer, step: int, config: dict,
                     folder: Path) -> None:
    """Write ``finetune-<step>.pt`` atomically on the main process; keep the newest two."""
    from .checkpoints import to_cpu
    from .files import atomic_save

    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "model": to_cpu(model.state_dict()),
                 "optimizer": to_cpu(optimizer.state_dict()), "config": config}
        path = folder / f"finetune-{step}.pt"
        atomic_save(state, path)
        for _, old in _checkpoints(folder)[:-2]:  # the newest two: a damaged last one leaves the one before
            if old != path:
                old.unlink(missing_ok=True)
    acc.wait_for_everyone()


def save_classifier(model: Classifier, info: BackboneInfo, num_classes: int, classes: list[str], folder: Path,
                     score: float | None, config: dict, seconds: float) -> None:
    """``classifier.safetensors`` (the net and the head, with their metadata) and ``finetune.json``."""
    from safetensors.torch import save

    from .version import __version__
    from .backbone import _plain_state, layer_to_json
    from .files import atomic_open, atomic_write_text

    meta = replace(info, num_classes=info.num_classes, classes=classes, version=__version__,
                   hidden_layer=layer_to_json(model.encoder.spec)).to_metadata()
    meta.update(head_classes=json.dumps(num_classes), image_size=json.dumps(model.image_size),
                test_accuracy=json.dumps(score))
    state = {f"net.{k}": v for k, v in _plain_state(model.net).items()}
    state.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()})
    with atomic_open(folder / CLASSIFIER, "wb") as f:
        f.write(save(state, metadata=meta))
    record = {"test_accuracy": score, "classes": classes, "num_classes": num_classes, "steps": config["steps"],
              "labelled": config["labelled"], "seconds": round(seconds, 1), "settings": config}
    atomic_write_text(folder / RESULT, json.dumps(record, indent=2))


def load_classifier(source: str | os.PathLike) -> Classifier:
    """The fine-tuned classifier saved in a folder (or its ``classifier.safetensors``), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .archs import build_arch

    path = Path(source).expanduser()
    path = path / CLASSIFIER if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; fine-tune first (wrapssl finetune)")
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "head_classes" not in meta:
        raise ValueError(f"{path} is not a classifier written by wrapssl finetune")
    info = BackboneInfo.from_metadata(meta)
    if not info.arch:
        raise ValueError(f"{path} holds a {info.net_class} that wrapssl cannot build by name; build the net "
                         "yourself and load the 'net.' and 'head.' tensors of the file")
    state = load_file(os.fspath(path))
    net_state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    net, default = build_arch(info.arch, channels=info.channels, num_classes=info.num_classes or 1,
                              image_size=info.image_size)
    net.load_state_dict(net_state)
    layer = info.layer or default
    model = Classifier(net, layer, int(json.loads(meta["head_classes"])), info.normalize, int(info.image_size),
                       info.channels)
    model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    return model.eval()
