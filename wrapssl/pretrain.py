"""One run of the training app: its data, its Trainer, the baselines, training, then the report.

app.py parses and checks the command line and calls ``run``; rundata.py assembles the data, report.py scores
and writes, recipes.py holds the defaults. A user mistake found here ends the app with one ``error: ...`` line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from . import recipes
from .argparsing import key_values
from .archs import build_arch
from .config import TrainConfig
from .data import UnreadableDataError, unreadable_files
from .evaluate import format_scores
from .files import atomic_write_text
from .fsdp import gathered, is_sharded, net_state_dict
from .report import (budget_report, final_report, make_plots, report_unreadable, score_baselines, score_learner,
                     weights_sha256)
from .runs import RunConflictError
from .rundata import RunData, data_name, load_data
from .trainer import Trainer

__all__ = ["run", "make_trainer", "UnreadableDataError"]


def trainer_fields() -> set[str]:
    """The names of the Trainer's settings: its typed config's fields."""
    return {f.name for f in fields(TrainConfig)}


def trainer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer's settings out of the parsed command line: each flag named after one of them."""
    names = trainer_fields()
    return {k: v for k, v in vars(args).items() if k in names}


def make_trainer(args: argparse.Namespace, name: str, data: RunData, out: Path) -> tuple[Trainer, Any]:
    """The net from --arch and the Trainer from the flags of its keywords; bad settings exit with one line naming
    the fix."""
    min_crop = args.min_crop if args.min_crop is not None else recipes.min_crop(name)
    crop = {} if min_crop is None else {"crop_scale": (min_crop, 1.0)}  # global views; local crops keep theirs
    knn_sets = (data.memory, data.queries) if data.memory is not None else None
    channels = args.channels or (3 if data.channels in (1, 3) else data.channels)
    if channels != data.channels and not (data.channels == 1 and channels == 3):  # grey repeats to RGB only
        raise SystemExit(f"error: --channels {channels} does not fit the data's {data.channels}-channel images; "
                         f"use --channels {data.channels}")
    torch.manual_seed(args.seed)  # the same initial net on every process
    try:
        net, hidden = build_arch(args.arch, channels=channels, num_classes=max(len(data.classes), 1),
                                 image_size=args.image_size)
        if args.hidden_layer is not None:
            hidden = int(args.hidden_layer) if args.hidden_layer.lstrip("-").isdigit() else args.hidden_layer
        method_settings = {**crop, **recipes.method_defaults(args.method, _planned_steps(args, data))[1],
                           **key_values(args.method_arg, "--method-arg"), **normalize_kwargs(args, data, channels)}
        if args.teacher is not None:
            method_settings.update(teacher=args.teacher, teacher_arch=args.teacher_arch or args.arch)
        config = TrainConfig(**{**trainer_settings(args), "hidden_layer": hidden, "channels": channels,
                                "checkpoint_folder": out, "scale_lr": True,
                                "eval_every": _eval_every(args, data) if knn_sets is not None else None},
                             method_kwargs=method_settings)
        trainer = Trainer(net, dataset=data.train, eval_dataset=knn_sets, config=config)
    except RunConflictError as e:
        raise SystemExit(f"error: {conflict_message(e)}") from None
    except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    trainer.backbone_info.update(arch=args.arch, classes=list(data.classes), num_classes=max(len(data.classes), 1))
    return trainer, hidden


def normalize_kwargs(args: argparse.Namespace, data: RunData, channels: int) -> dict[str, Any]:
    """The Learner's ``normalize=`` from --normalize: given, estimated ('auto', and the default for data that is
    not grey or colour), or nothing (the Learner's ImageNet statistics)."""
    stats = args.normalize
    if stats is None and data.channels in (1, 3):
        return {}
    if isinstance(stats, tuple) and len(stats[0]) != channels:
        raise ValueError(f"--normalize gives {len(stats[0])} means and stds, and the net takes {channels} channels; "
                         f"give {channels} of each, or --normalize auto to estimate them")
    if stats is None or stats == "auto":
        from .augment import estimate_normalization
        mean, std = estimate_normalization(data.train, max_images=1000)
        if len(mean) == 1 and channels > 1:  # grey images repeated for the net
            mean, std = mean * channels, std * channels
        stats = tuple(round(m, 4) for m in mean), tuple(round(max(v, 1e-3), 4) for v in std)
        print(f"normalisation estimated from {min(len(data.train), 1000)} images: --normalize "
              f"{','.join(map(str, stats[0]))} {','.join(map(str, stats[1]))}", flush=True)
    args.normalize = stats  # recorded in metrics.json, beside the backbone's own metadata
    return {"normalize": stats}


def conflict_message(e: RunConflictError) -> str:
    """Why a used --checkpoint-folder is refused, and the choices (deleting the folder is one)."""
    return str(e).replace("delete its checkpoints to start over", f"delete {e.folder} to start over")


def _eval_every(args: argparse.Namespace, data: RunData) -> int:
    """--eval-every, or a third of the run (two points inside the learning curve, and its end)."""
    if args.eval_every is not None:
        return args.eval_every
    return max(1, -(-_planned_steps(args, data) // 3))


def _planned_steps(args: argparse.Namespace, data: RunData) -> int:
    """--num-train-steps, or the steps --epochs makes (the Trainer resolves them the same way)."""
    if args.num_train_steps is not None:
        return args.num_train_steps
    return max(1, round(args.epochs * (len(data.train) // args.batch_size)))


def check_out(out: Path) -> None:
    """Exit with one line if the run's folder cannot be written, before any data is read (nothing is created here:
    the probe goes into the folder or, when it does not exist yet, the folder it would be made in)."""
    where = out.expanduser().absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(f"{where} is a file")
        with tempfile.TemporaryFile(dir=where) as f:
            f.write(b"0")
            f.flush()
    except OSError as e:
        raise SystemExit(f"error: cannot write into --out {out} ({e.strerror or e}); pick another folder") from None


def _bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def check_space(trainer: Trainer, out: Path) -> None:
    """Exit with one line if the disk under the run's folder cannot hold a checkpoint and the exported backbone."""
    # a checkpoint holds the learner and the optimiser's moments (about twice the trainable weights)
    need = 3 * _bytes(trainer.learner.state_dict()) + 2 * _bytes(trainer.net.state_dict())
    free = shutil.disk_usage(out).free
    if free < need:
        raise SystemExit(f"error: --out {out} has {free / 2**20:,.1f} MB free, and this run writes about "
                         f"{need / 2**20:,.1f} MB (a checkpoint and the backbone); free space or pick another --out")


def run(args: argparse.Namespace) -> dict:
    """The app's work: data, Trainer, baselines, training, report; returns the metrics (see ``app.main``)."""
    start = time.perf_counter()
    name = data_name(args.data)
    if args.image_size is None:
        args.image_size = recipes.image_size(name)
    out = Path(args.checkpoint_folder or f"runs/{args.method}-{name}")
    check_out(out)
    data = load_data(args)
    trainer, hidden = make_trainer(args, name, data, out)
    acc = trainer.accelerator
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)  # the run goes ahead: its folder is made now
        check_space(trainer, out)
    acc.print(f"wrapssl: {args.method} on {name} ({len(data.train)} images, {args.image_size} px), {args.arch} "
              f"[{hidden}], {trainer.num_train_steps} steps of {trainer.global_batch * trainer.grad_accum} images, "
              f"lr {trainer.lr:.3g}, {acc.num_processes} process(es) on {acc.device}")
    if trainer.step >= trainer.num_train_steps:
        acc.print(f"wrapssl: the run in {out} is complete (step {trainer.step}); reporting it again")

    metrics_path = out / "metrics.json"
    metrics: dict[str, Any] = {}
    if trainer.step > 0 and metrics_path.is_file():  # resumed: keep the first run's "before"
        metrics = json.loads(metrics_path.read_text())
    with gathered(trainer.learner, trainer.learner.encoder):  # FSDP: whole weights for the main process's scores
        if data.memory is not None and "scores" not in metrics and acc.is_main_process:
            metrics.update(data=name, knn_k=args.eval_k, knn_memory=len(data.memory), knn_queries=len(data.queries))
            metrics["scores"] = score_baselines(trainer, args, data)
            if metrics["scores"]:  # empty with --no-baselines
                metrics["knn_before"], metrics["knn_before_step"] = metrics["scores"]["random_init"]["knn"], \
                    trainer.step
                print(format_scores(metrics["scores"], k=args.eval_k, memory=len(data.memory)), flush=True)
            atomic_write_text(metrics_path, json.dumps(metrics, indent=2))  # so that a resumed run finds it
        elif data.memory is not None and "scores" not in metrics and args.baselines and is_sharded(trainer.learner):
            # FSDP before this process's first training step: every process must run the same forwards (the main
            # one alone would leave FSDP's state out of step between them); only the main one reports
            score_learner(trainer, data, args.eval_k)
    acc.wait_for_everyone()

    train_start = time.perf_counter()
    with trainer:  # ends the trackers and the process group when the report is done
        trainer()
        metrics.update(train_time_s=round(time.perf_counter() - train_start, 1))
        bad = [unreadable_files(data.train)]
        if is_sharded(trainer.learner):  # FSDP: one copy of the weights, in shards; the whole net on rank 0
            whole = net_state_dict(trainer.learner)
            hashes = [weights_sha256(whole)] if acc.is_main_process else []
        else:  # every process holds the weights, and they must agree
            hashes = [weights_sha256(trainer.net.state_dict())]
        if acc.num_processes > 1:
            hashes, bad = gather_object(hashes), gather_object(bad)
        with gathered(trainer.learner, trainer.learner.encoder):  # FSDP: whole weights for the main process's report
            if acc.is_main_process:
                embeddings = final_report(trainer, args, data, metrics, hashes)
                report_unreadable(data, metrics, {k: v for found in bad for k, v in found.items()})
                if embeddings is not None and args.labels:
                    budget_report(args, data, metrics, embeddings, out)
                if args.plot:
                    make_plots(trainer, data, embeddings[1] if embeddings is not None else None, metrics, out)
                metrics.update(wall_time_s=round(time.perf_counter() - start, 1))
                atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
                print(f"wrote {out}/backbone.pt, backbone.safetensors, checkpoints, metrics.json"
                      f"{' and plots' if args.plot else ''} in {metrics['wall_time_s']:.0f} s")
        acc.wait_for_everyone()
    return metrics
