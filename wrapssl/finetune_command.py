"""What `wrapssl finetune` does: a pretrained backbone with a new head, fine-tuned on labelled images (all, a
class-balanced budget, or the picks of `wrapssl select`), and its test accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .commands import _dataset, _layer, load_backbone


def _finetune_sets(args: argparse.Namespace, recorded: dict[str, Any], backbone: Any):
    """(labelled training images, test images, class names) for `wrapssl finetune`: a named set's train/test
    splits, or a folder with one subfolder per class (every fifth image held out for the test, as
    `wrapssl train` does, unless --test names a folder)."""
    from torch.utils.data import Subset

    from .data import dataset_name
    from .finetune import dataset_labels

    spec = args.data or recorded.get("data")
    if not spec:
        raise SystemExit("error: pass --data: a folder with one subfolder per class, or a named data set such as "
                         "fashion-mnist")
    size = args.image_size or backbone.info.image_size
    if dataset_name(spec) is not None:
        train = _dataset(spec, recorded, "train", size, args.data_root)
        test = _dataset(spec, recorded, "test", size, args.data_root)
        return train, test, list(getattr(train, "classes", []) or [])
    images = _dataset(spec, recorded, "train", size, args.data_root)
    classes = list(getattr(images, "classes", []) or [])
    if not classes:
        raise SystemExit(f"error: {spec} has no labels (no class subfolders); fine-tuning needs labelled images: "
                         "sort them into one subfolder per class")
    if args.test:
        return images, _dataset(args.test, {}, "test", size, None), classes
    # every fifth image is held out for the test, as `wrapssl train` does; with --picks (indices into the whole
    # folder, as `wrapssl embed` numbers it), the picks train and the held-out images that were not picked test
    labels = dataset_labels(images).tolist()
    picked = set(_picked(args.picks, len(images))) if args.picks else set()
    train = images if args.picks else Subset(images, [i for i in range(len(images)) if i % 5 and labels[i] >= 0])
    test = Subset(images, [i for i in range(len(images)) if i % 5 == 0 and labels[i] >= 0 and i not in picked])
    test.labels = [labels[i] for i in test.indices]
    if not args.picks:
        train.labels = [labels[i] for i in train.indices]
    return train, test, classes


def _picked(path: str, n: int) -> list[int]:
    """The item indices of a `wrapssl select` CSV (rank,index,file); one error line for a foreign file."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        picked = [int(r["index"]) for r in rows]
    except FileNotFoundError:
        raise SystemExit(f"error: --picks {path}: no such file; write it with `wrapssl select`") from None
    except (KeyError, ValueError, TypeError):
        raise SystemExit(f"error: --picks {path} is not a selection written by `wrapssl select` (columns rank,index,"
                         "file)") from None
    bad = [i for i in picked if not 0 <= i < n]
    if not picked or bad:
        raise SystemExit(f"error: --picks {path} names {'no items' if not picked else f'item {bad[0]}'}, and the "
                         f"training images are 0..{n - 1}; select from embeddings of the same data "
                         "(`wrapssl embed RUN --split train`)")
    return picked


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a pretrained backbone with a new classification head on labelled images; report its test accuracy."""
    from torch.utils.data import Subset

    from .evaluate.budgets import draw_labels, parse_budgets
    from .finetune import FinetuneSettings, dataset_labels, finetune

    backbone, recorded = load_backbone(args.source, args.arch, _layer(args.hidden_layer))
    train, test, classes = _finetune_sets(args, recorded, backbone)
    labels = dataset_labels(train)
    try:
        if args.picks:
            chosen, how = _picked(args.picks, len(train)), f"the {args.picks} picks"
            if bool((labels[chosen] < 0).any()):
                raise SystemExit(f"error: some of the --picks {args.picks} have no label; label them (one subfolder "
                                 "per class) first")
        elif args.labels.lower() == "all":
            chosen, how = [i for i in range(len(train)) if labels[i] >= 0], "every labelled image"
        else:
            budgets = parse_budgets(args.labels)
            if len(budgets) != 1:
                raise SystemExit("error: --labels takes one count here (e.g. 100 or 10/class); `wrapssl evaluate "
                                 "--labels` compares several")
            chosen = draw_labels(labels, budgets[0], seed=args.label_seed)
            how = f"a class-balanced draw of {budgets[0]} (--label-seed {args.label_seed})"
        settings = FinetuneSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    backbone_lr_ratio=args.backbone_lr_ratio, weight_decay=args.weight_decay,
                                    seed=args.seed, mixed_precision=args.mixed_precision, num_workers=args.num_workers)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out or backbone.folder / f"finetune-{len(chosen)}")
    if _is_rank0():
        print(f"fine-tuning {backbone.info.arch} [{backbone.hidden_layer}] on {len(chosen)} labelled images "
              f"({how}), {len(test)} test images, into {out}", file=sys.stderr)
    try:
        result = finetune(backbone, Subset(train, chosen), test, settings=settings, out=out, classes=classes,
                          resume=True if args.resume else None)
    except (ValueError, FloatingPointError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if _is_rank0() and result.test_accuracy is not None:
        print(f"test accuracy {100 * result.test_accuracy:.2f}% on {len(test)} images after {result.steps} steps "
              f"({result.seconds:.0f} s); wrote {out}/classifier.safetensors and finetune.json")


def _is_rank0() -> bool:
    """True on the process that speaks (rank 0 under accelerate launch or torchrun)."""
    return os.environ.get("RANK", "0") == "0"
