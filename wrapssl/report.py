"""The training app's report: scores beside the baselines, few-label budgets, health, figures, metrics.json.

Every quality number is printed beside the trivial baselines on one protocol (kNN with every training image
as memory, and a linear probe): raw pixels (the images flattened) and the randomly initialised net; with
--labels, the few-label rows too. What is printed is also kept in the run's metrics.json.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .evaluate import ROW_NAMES, Embeddings, baseline_scores, embed_dataset, format_scores, probe_scores
from .nnutil import private_rng
from .rundata import RunData

if TYPE_CHECKING:
    from .trainer import Trainer


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a net's state_dict: each key (UTF-8) then its tensor's raw bytes, in sorted key order."""
    h = hashlib.sha256()
    for key, value in sorted(state.items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def score_learner(trainer: Trainer, data: RunData, k: int) -> tuple[dict[str, float], tuple[Embeddings, Embeddings]]:
    """kNN (temperature 0.1) and linear-probe accuracy of the learner's representation now, and the (memory,
    query) embeddings; reuses the Trainer's evaluation when it ran at this step."""
    if trainer.last_eval is not None and trainer.last_eval[0] == trainer.step:
        a, b = trainer.last_eval[1:]
    else:
        device = trainer.accelerator.device
        with private_rng(device):  # the run's random stream stays as if nothing was scored
            a = embed_dataset(trainer.learner, data.memory, batch_size=512, device=device)
            b = embed_dataset(trainer.learner, data.queries, batch_size=512, device=device)
    return probe_scores(a, b, k=k), (a, b)


def score_baselines(trainer: Trainer, args: argparse.Namespace, data: RunData) -> dict[str, dict[str, float]]:
    """The report's rows before training, raw pixels and the random-init net; none with --no-baselines."""
    rows: dict[str, dict[str, float]] = {}
    if not args.baselines:
        return rows
    print("scoring the baselines: raw pixels ...", flush=True)
    rows.update(baseline_scores(data.memory, data.queries, args.image_size, k=args.eval_k))
    print("scoring the randomly initialised net ..." if args.init is None else
          f"scoring the net as it starts, from --init {args.init} (the 'random init' row below) ...", flush=True)
    rows["random_init"], _ = score_learner(trainer, data, args.eval_k)
    return rows


def learning_curve(trainer: Trainer, metrics: dict[str, Any]) -> list[list[float]]:
    """(minutes of training, kNN accuracy) points: the random init at 0, then every evaluation of the run."""
    minutes = dict(trainer.history.get("train_minutes", []))
    points = [[0.0, metrics["scores"]["random_init"]["knn"]]] if "random_init" in metrics.get("scores", {}) else []
    points += [[minutes[step], knn] for step, knn in trainer.history.get("knn", []) if step in minutes]
    return points


def make_plots(trainer: Trainer, data: RunData, queries: Embeddings | None, metrics: dict[str, Any],
               out: Path) -> None:
    """Learning curve, augmentation grid and embedding map (the Trainer wrote the loss curve); skipped with a
    notice if matplotlib is missing."""
    try:
        from . import plots
        if len(metrics.get("learning_curve", [])) > 1:
            scores = metrics["scores"]
            levels = {ROW_NAMES[r]: scores[r]["knn"] for r in ("raw_pixels", "random_init") if r in scores}
            plots.learning_curve(metrics["learning_curve"], out / "learning_curve.png", levels,
                                 title=f"{trainer.record['method']} on {metrics['data']}: kNN (k={metrics['knn_k']}, "
                                       f"{metrics['knn_memory']} images as memory)")
        if metrics.get("label_budgets", {}).get("budgets"):
            plots.budget_curve(metrics["label_budgets"], out / "budget_curve.png",
                               title=f"{trainer.record['method']} on {metrics['data']}: test accuracy with few labels")
        images = torch.stack([data.train[i][0] for i in range(8)]).to(trainer.accelerator.device)
        plots.augmentation_grid(trainer.learner, images, out / "augmentations.png")
        if queries is not None:
            plots.embedding_map(queries.embeddings, queries.labels, out / "embedding_map.png",
                                class_names=data.classes or None, max_points=2000)
    except ImportError as e:  # plotting is an extra
        print(f"note: plots skipped ({e}); pip install matplotlib scikit-learn")


def summary_line(scores: dict[str, dict[str, float]]) -> str:
    """One line: before -> after for each metric, and raw pixels beside it."""
    parts = []
    for metric, name in (("knn", "kNN"), ("linear", "linear probe")):
        if metric not in scores.get("pretrained", {}):
            continue
        text = f"{name} {100 * scores['pretrained'][metric]:.2f}%"
        if metric in scores.get("random_init", {}):
            text = f"{name} {100 * scores['random_init'][metric]:.2f}% (random init) -> " \
                   f"{100 * scores['pretrained'][metric]:.2f}% (pretrained)"
        if metric in scores.get("raw_pixels", {}):
            text += f", raw pixels {100 * scores['raw_pixels'][metric]:.2f}%"
        parts.append(text)
    return "; ".join(parts)


def final_report(trainer: Trainer, args: argparse.Namespace, data: RunData, metrics: dict[str, Any],
                 hashes: list[str]) -> tuple[Embeddings, Embeddings] | None:
    """Compute and print the run's final metrics into ``metrics`` (main process); returns the (memory, query)
    embeddings."""
    embeddings = None
    if data.memory is not None:
        scores = metrics.setdefault("scores", {})
        scores["pretrained"], embeddings = score_learner(trainer, data, args.eval_k)
        metrics["knn_after"] = scores["pretrained"]["knn"]
        metrics["learning_curve"] = learning_curve(trainer, metrics)
        print(f"\nscores on {len(data.queries)} test images ({len(data.memory)} training images as kNN memory, "
              f"k={args.eval_k}, t=0.1):")
        print(format_scores(scores, k=args.eval_k, memory=len(data.memory)))
        print(summary_line(scores))
        if "raw_pixels" in scores and scores["pretrained"]["knn"] <= scores["raw_pixels"]["knn"]:
            print("note: the pretrained backbone does not beat raw pixels on kNN: train longer, or try another "
                  "method or recipe (docs/training.md)")
    health = trainer.health if trainer.health is not None else trainer.check_health()
    metrics["health"] = {"rank": health.rank, "embedding_std": health.std, "dim": health.dim,
                         "collapsed": health.collapsed}
    print(f"health (no labels needed): effective rank {health.rank:.1f} of at most {health.dim}, spread of "
          f"normalised embeddings {health.std:.4f} ({'COLLAPSED' if health.collapsed else 'healthy'})")
    if len(set(hashes)) > 1:
        print(f"warning: the {len(hashes)} processes ended with different weights: {hashes}")
    losses = trainer.history.get("loss") or [(0, None)]
    metrics.update(steps=trainer.step, images_seen=trainer.step * trainer.global_batch * trainer.grad_accum,
                   num_processes=trainer.accelerator.num_processes, device=str(trainer.accelerator.device),
                   weights_sha256=hashes, final_loss=losses[-1][1], classes=data.classes, args=dict(vars(args)),
                   train_minutes=round(trainer.train_minutes, 3))
    return embeddings


def budget_report(args: argparse.Namespace, data: RunData, metrics: dict[str, Any],
                  embeddings: tuple[Embeddings, Embeddings], out: Path) -> None:
    """Accuracy with few labels (``--labels``, ``--draws``): raw pixels, the net from scratch, the pretrained net
    (linear and fine-tuned), and images picked by `wrapssl select` against random ones; printed and kept in
    metrics.json under ``label_budgets``."""
    from .backbone import load_backbone
    from .evaluate.budgets import parse_budgets, print_report, report

    started = time.perf_counter()
    print()
    try:
        result = report(data.memory, data.queries, parse_budgets(args.labels), load_backbone(out), draws=args.draws,
                        seed=args.seed, embeddings=embeddings, image_size=args.image_size,
                        finetune_steps=args.finetune_steps, baselines=args.baselines,
                        log=lambda m: print(m, flush=True))
    except ValueError as e:
        print(f"note: label budgets skipped ({e})")
        return
    if result is not None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        metrics["label_budgets"] = result
        print_report(result, len(data.queries))


def report_unreadable(data: RunData, metrics: dict[str, Any], bad: dict[str, str]) -> None:
    """List the files that could not be read (replaced by readable ones while training) and keep them in metrics."""
    metrics["unreadable_files"] = bad
    if not bad:
        return
    total = len(getattr(data.train, "files", ())) or len(data.train)
    shown = "\n".join(f"  {name}: {why}" for name, why in list(bad.items())[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    print(f"warning: {len(bad)} of {total} files could not be read; each was replaced by a readable one while "
          f"training (all of them are in metrics.json under unreadable_files):\n{shown}{more}")
