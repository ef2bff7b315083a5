"""The training app: pretrain a backbone self-supervised, then report what it learned against the baselines.

    wrapssl train                                    # small ResNet on Fashion-MNIST, a few minutes on 2 CPU cores
    python -m wrapssl.train --data stl10 --data-root ~/data --arch resnet18 --method simclr
    wrapssl train --data ~/photos --arch resnet18 --image-size 96 --epochs 100 --method byol
    accelerate launch -m wrapssl.train ...                            # the GPUs from `accelerate config`
    accelerate launch --multi_gpu --num_processes 2 -m wrapssl.train  # 2 processes without GPUs (gloo)
    torchrun --nproc_per_node 2 -m wrapssl.train ...                  # the same without accelerate's launcher

Writes into --out: checkpoints, backbone.pt and backbone.safetensors (the net's weights),
metrics.json, metrics.csv, TensorBoard logs and PNG plots. Re-running a command continues its
run; other settings into a used --out are refused unless --resume says to continue with them;
Ctrl-C and SIGTERM write a checkpoint and print the command that continues. With labels,
the report scores the pretrained backbone beside two trivial baselines on one protocol (kNN
with every training image as memory, and a linear probe): raw pixels (the images flattened)
and the randomly initialised net; learning_curve.png shows kNN against minutes of training.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":  # run as a program (python -m wrapssl.train): before torch loads OpenMP
    from .argparsing import quiet_openmp
    quiet_openmp()

import torch
from accelerate.utils import gather_object
from torch.utils.data import Dataset, Subset

from .archs import build_arch
from .checks import (arg_type, fraction_arg, non_negative_float_arg, non_negative_int_arg, positive_float_arg,
                     positive_int_arg)
from .argparsing import VERSION, HelpFormatter, Parser, add_budget_args, cli_words
from .data import (DATASETS, FASHION_MNIST_DIR, MAX_PIXELS, UnreadableDataError, dataset_name, load_dataset,
                   unreadable_files)
from .budgets import parse_budgets
from .distributed import CollectiveTimeoutError
from .evaluate import ROW_NAMES, Embeddings, baseline_scores, embed_dataset, format_scores, probe_scores
from .files import atomic_write_text
from .interrupt import TrainingInterrupted, sigterm_interrupts
from .methods import available_methods
from .monitor import NonFiniteLossError
from .optim import OPTIMIZERS
from .runs import RunConflictError
from .shards import TarShards, is_shard_spec
from .trainer import DEFAULT_TIMEOUT, Trainer

# The default run is chosen to finish, evaluations included, within 10 minutes on 2 idle CPU cores (7:48 measured)
# and to beat raw pixels and the randomly initialised net; what we measured is in benchmarks/RESULTS.md, section 6.
DEFAULTS = dict(data="fashion-mnist", arch="small_resnet", method="simclr", batch_size=256, steps=1000, lr=8e-3)
DEFAULT_IMAGE_SIZE = {"fashion-mnist": 28, "digits": 16, "cifar10": 32, "stl10": 96}


def method_defaults(method: str, steps: int | None = None) -> tuple[float, dict[str, Any]]:
    """The app's settings of ``method`` for short runs at batch 256: (AdamW learning rate at batch 256, method
    keywords), used unless --lr and --method-arg override them. Smaller heads than the ImageNet papers (CPU
    runs, small data), the EMA momentum 0.99 of lightly's CIFAR-10 benchmarks, and DINO's teacher-temperature
    warm-up over the first 30% of the ``steps``; the method table in benchmarks/RESULTS.md used exactly these."""
    ema = {"moving_average_decay": 0.99}
    heads = {"projection_hidden_size": 1024}
    settings = {
        "simclr": (DEFAULTS["lr"], {"temperature": 0.2}),
        "moco": (DEFAULTS["lr"], {"temperature": 0.2, **heads, "prediction_hidden_size": 1024, **ema}),
        "nnclr": (DEFAULTS["lr"], {"temperature": 0.2, "queue_size": 4096, **heads, "prediction_hidden_size": 1024}),
        "byol": (2e-3, {**heads, **ema}),
        "simsiam": (2e-3, {"projection_size": 1024, "prediction_hidden_size": 256}),
        "barlow_twins": (2e-3, {"projector_dims": (1024, 1024, 1024)}),
        "vicreg": (2e-3, {"projector_dims": (1024, 1024, 1024)}),
        "dino": (2e-3, {"out_dim": 2048, "hidden_size": 1024, "n_local": 4,
                        "warmup_teacher_temp_steps": max(1, (steps or 1000) * 3 // 10), **ema}),
        "swav": (2e-3, {"n_prototypes": 512, **heads, "n_local": 4,
                        "freeze_prototypes_steps": max(1, (steps or 1000) // 20)}),
        "mae": (1e-3, {}),
        "distill": (2e-3, {}),
    }
    lr, kwargs = settings.get(method, (2e-3, {}))
    return lr, dict(kwargs)

# Smallest crop of the global views by data: at 28 px an 8% crop is a 8x8 patch with no garment left in it.
MIN_CROP = {"fashion-mnist": 0.25, "digits": 0.25}
# The split each named data set pretrains on; kNN memory is its "train" split, queries its "test" split.
PRETRAIN_SPLIT = {"stl10": "unlabeled"}
# at least 2: BatchNorm and every loss compare the images of a batch
BATCH_SIZE = arg_type(int, lambda v: v >= 2, "a whole number >= 2 (batch norm and the losses compare images)")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with its default and tuning advice in every help string."""
    p = Parser(
        prog="wrapssl train",
        description="Self-supervised pretraining of a vision backbone with wrapssl; prints kNN accuracy of the "
                    "representation before (random init) and after.",
        formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=VERSION)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=DEFAULTS["data"],
                   help=f"a named data set ({', '.join(DATASETS)}) or a folder of images (one subfolder per class "
                        "gives kNN labels; a flat folder trains without the kNN report). stl10 pretrains on its "
                        "100k unlabeled split and reports kNN from train (memory) to test (queries). Other "
                        "channel counts: a folder of .npy (or, with tifffile, .tif) arrays, or a tensor file "
                        "(.pt/.npy, N x C x H x W); see docs/training.md")
    d.add_argument("--data-root", default=None,
                   help=f"folder holding a named data set's files in torchvision's layout (cifar-10-batches-py, "
                        f"stl10_binary; nothing is downloaded). Default for fashion-mnist: {FASHION_MNIST_DIR} "
                        "(apt-get install -y dataset-fashion-mnist)")
    d.add_argument("--image-size", type=positive_int_arg, default=None,
                   help="side of the square views (default: " + ", ".join(
                       f"{s} for {n}" for n, s in DEFAULT_IMAGE_SIZE.items()) + ", 64 for folders). "
                        "Compute grows with its square: on CPU stay at or below 64")
    d.add_argument("--max-pixels", type=non_negative_int_arg, default=MAX_PIXELS,
                   help="images above this many pixels are counted as unreadable (PIL's decompression-bomb "
                        "guard); raise it for huge scans or maps, 0 for no limit")
    d.add_argument("--normalize", nargs="+", default=None, metavar="STATS",
                   help="per-channel statistics applied after augmentation: MEAN,MEAN,... STD,STD,... (values "
                        "of images in [0, 1], one per channel), or 'auto' to estimate them from up to 1,000 "
                        "images. Default: ImageNet's for 1- and 3-channel data, 'auto' for other channel counts")
    d.add_argument("--num-workers", type=non_negative_int_arg, default=0,
                   help="DataLoader processes decoding images; 0 is best for in-memory data (Fashion-MNIST, "
                        "CIFAR-10), use 4-8 per GPU for folders of JPEGs")
    m = p.add_argument_group("model and method")
    m.add_argument("--arch", default=DEFAULTS["arch"],
                   help="'small_resnet' (28-64 px on CPU), any torchvision model name (resnet50, vit_b_16, "
                        "convnext_tiny, ...) or 'timm:<name>'. Weights are never downloaded")
    m.add_argument("--hidden-layer", default=None,
                   help="layer whose output is the representation: a name from net.named_modules() or an int "
                        "index into its children (default: the net's pre-logits, the input of its classifier)")
    m.add_argument("--method", default=DEFAULTS["method"], choices=available_methods(),
                   help="self-supervised method. simclr learns fastest in short CPU runs; byol, dino and swav need "
                        "long runs (benchmarks/RESULTS.md, the method table). Each gets the app's short-run "
                        "settings (docs/training.md)")
    m.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable, e.g. temperature=0.2 (simclr: 0.1-0.5; lower values "
                        "weigh hard negatives more and want larger batches; this app uses 0.2, which beat the "
                        "method's 0.5 at batch 256 in our runs) or projection_hidden_size=1024")
    m.add_argument("--teacher", default=None, metavar="PATH",
                   help="--method distill: the teacher's weights (a backbone.pt from an earlier run, or a "
                        "torchvision/timm state dict); the student (--arch) learns to predict its features")
    m.add_argument("--teacher-arch", default=None, metavar="NAME",
                   help="the teacher's architecture, as --arch names it (default: --arch)")
    m.add_argument("--channels", type=positive_int_arg, default=None,
                   help="input channels of the net (default: 3 for grey and colour images, which repeats grey "
                        "to 3; else the data's own count). Grey data gets the same augmentation either way "
                        "(brightness/contrast jitter; saturation, hue and grayscale do nothing on grey); the "
                        "recorded runs use 3")
    m.add_argument("--init", default=None, metavar="PATH",
                   help="weights to start from: a torchvision/timm state dict, a backbone.pt or a checkpoint of "
                        "the same --arch (the classifier may differ: pretraining never runs it). Default: random")
    m.add_argument("--min-crop", type=fraction_arg, default=None,
                   help="smallest area fraction of the global random crops (default 0.25 for the 28-px built-in "
                        "data, else the method's 0.08); below 0.2 small images lose their object")
    o = p.add_argument_group("optimisation")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int_arg, default=None,
                        help=f"optimiser steps (default {DEFAULTS['steps']} when --epochs is not given)")
    length.add_argument("--epochs", type=positive_float_arg, default=None,
                        help="passes over the data, instead of --steps (default: use --steps)")
    o.add_argument("--batch-size", type=BATCH_SIZE, default=DEFAULTS["batch_size"],
                   help="images per process per batch. Contrastive methods want 256 or more (more negatives); "
                        "below 64 BatchNorm statistics get noisy")
    o.add_argument("--lr", type=positive_float_arg, default=None,
                   help="learning rate at a global batch of 256; it is scaled by global batch / 256. AdamW "
                        "with SimCLR and the small ResNet, in our runs: 8e-3 and 1.6e-2 equally good, 2e-3 about "
                        "1.4 kNN points worse; BYOL, SimSiam, Barlow Twins, VICReg, DINO and SwAV were run at "
                        "2e-3. If the loss turns NaN, halve it or lengthen the warmup. SGD: 0.05 (SimSiam); "
                        "LARS: 0.2-0.3 (BYOL, SimCLR) (default: the method's, 8e-3 for simclr, moco and nnclr, "
                        "1e-3 for mae, 2e-3 for the others)")
    o.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw is robust at any batch; lars was designed for batches of 1024 and more")
    o.add_argument("--weight-decay", type=non_negative_float_arg, default=None,
                   help="default 0.05 (adamw), 1e-4 (sgd), 1.5e-6 (lars); biases and norms never decay")
    o.add_argument("--warmup-steps", type=non_negative_int_arg, default=None,
                   help="linear warmup before the cosine decay (default: 10%% of the steps); lengthen it if the "
                        "loss spikes or turns NaN early")
    o.add_argument("--grad-accum", type=positive_int_arg, default=None,
                   help="batches per optimiser step: a larger effective batch without the memory (default: "
                        "accelerate's setting, ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1)")
    o.add_argument("--max-grad-norm", type=positive_float_arg, default=None,
                   help="clip gradients to this norm (DINO clips ViTs at 3.0; default: no clipping)")
    o.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="bf16 on GPUs that support it (A100, H100) saves memory and time; fp16 needs loss "
                        "scaling (done for you) and can overflow; keep 'no' on CPU (default: accelerate's config)")
    o.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentations")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders (also switched on by a dynamo backend in `accelerate "
                        "config`): the first steps compile (about a minute); it pays most when the hidden layer "
                        "is the net's own output (benchmarks/RESULTS.md)")
    o.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (slower): needed on a GPU for a resumed run to end "
                        "bit-identical to an uninterrupted one; CPU runs are reproducible without it")
    r = p.add_argument_group("output")
    r.add_argument("--out", default=None,
                   help="output folder (default: runs/<method>-<data>). Running the same command again continues "
                        "the run in it; a run with other settings is refused there (see --resume)")
    r.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the run in --out with the settings given now: more --steps or a new --lr "
                        "rebuild the schedule at the step reached, as if the run had been planned so. Or a "
                        "checkpoint path to continue from (default: continue only a run with the same settings; "
                        "start fresh in an empty --out)")
    r.add_argument("--checkpoint-every", type=positive_int_arg, default=100, help="steps between checkpoints")
    r.add_argument("--log-every", type=positive_int_arg, default=10,
                   help="steps between log lines; the NaN check also runs then (no per-step GPU sync)")
    r.add_argument("--eval-every", type=positive_int_arg, default=None,
                   help="kNN accuracy every N steps during training, for the learning curve (each costs one "
                        "embedding pass over memory and queries; default: a third of the steps)")
    r.add_argument("--knn-train", type=positive_int_arg, default=None,
                   help="training images embedded as the kNN memory (default: all, the protocol of `wrapssl "
                        "evaluate`; the test split is the queries)")
    r.add_argument("--knn-test", type=positive_int_arg, default=None,
                   help="cap on the kNN query images (default: all)")
    r.add_argument("--knn-k", type=positive_int_arg, default=200, help="neighbours voting in the kNN classifier")
    r.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also score raw pixels and the randomly initialised net on the same protocol (kNN and "
                        "linear probe): a pretrained backbone that does not beat them has not learned anything "
                        "useful")
    add_budget_args(r)
    r.add_argument("--timeout", type=positive_float_arg, default=DEFAULT_TIMEOUT,
                   help="seconds a process waits for the others at a collective operation (multi-process runs) "
                        "before the run ends with an error: a stopped or hung process cannot block the job forever. "
                        "Keep it above the longest evaluation (the main process scores while others wait)")
    r.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write the learning curve, loss curve, augmentation grid and embedding map PNGs (needs "
                        "matplotlib)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The checked command line (--steps defaults to DEFAULTS["steps"] when --epochs is not given); a bad
    argument exits with one line that names the fix, before anything is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is None and args.epochs is None:
        args.steps = DEFAULTS["steps"]
    if args.lr is None:
        args.lr = method_defaults(args.method)[0]
    if args.warmup_steps is not None and args.steps is not None and args.warmup_steps > args.steps:
        parser.error(f"--warmup-steps {args.warmup_steps} is longer than the run (--steps {args.steps}); use at "
                     f"most {args.steps}")
    if args.teacher is not None and args.method != "distill":
        parser.error(f"--teacher is for --method distill (this run uses {args.method}); add --method distill or "
                     "drop --teacher")
    if args.method == "distill" and args.teacher is None and \
            not any(a.partition("=")[0] == "teacher" for a in args.method_arg):
        parser.error("--method distill needs a trained teacher: --teacher PATH (e.g. the backbone.pt of an "
                     "earlier run), with --teacher-arch NAME when it is not the --arch net")
    for flag, path in (("--init", args.init), ("--teacher", args.teacher),
                       ("--resume", None if args.resume == "auto" else args.resume)):
        if path is not None and not Path(path).expanduser().is_file():
            parser.error(f"{flag} {path}: no such file")
    try:
        args.labels = [str(b) for b in parse_budgets(args.labels)]  # checked now, kept as text (metrics.json)
        args.normalize = parse_normalize(args.normalize)
        _method_kwargs(args.method_arg)
    except ValueError as e:
        parser.error(str(e))
    return args


def parse_normalize(values: Sequence[str] | None) -> str | tuple[tuple[float, ...], tuple[float, ...]] | None:
    """--normalize as None, "auto" or (means, stds); ValueError naming the expected form."""
    if values is None:
        return None
    if list(values) == ["auto"]:
        return "auto"
    form = "--normalize expects 'auto' or two comma-separated lists, MEAN,MEAN,... STD,STD,..."
    if len(values) != 2:
        raise ValueError(f"{form}; got {' '.join(values)!r}")
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in values)
    except ValueError:
        raise ValueError(f"{form}; got {' '.join(values)!r}") from None
    if len(mean) != len(std) or not all(0 < v < float("inf") for v in std) or \
            not all(abs(v) < float("inf") for v in mean):
        raise ValueError(f"--normalize needs as many means as stds, finite, stds > 0; got {' '.join(values)!r}")
    return mean, std


@dataclass
class RunData:
    """What a run trains on and is judged by: kNN memory and queries are None without labels."""

    train: Dataset
    memory: Dataset | None
    queries: Dataset | None
    classes: list[str]
    channels: int = 3  # of the images, as the data holds them


def _method_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings as keyword arguments (values parsed as Python literals when they are)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--method-arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _data_name(spec: str) -> str:
    """A short name for the data: the built-in's name or the folder's (for tar shards, their folder's)."""
    if is_shard_spec(spec):
        return Path(spec.split(",")[0]).expanduser().resolve().parent.name or "shards"
    return dataset_name(spec) or Path(spec).expanduser().resolve().name or "data"


def _cap(ds: Dataset, n: int | None) -> Dataset:
    """The first n items of ds (all when n is None)."""
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


def load_data(args: argparse.Namespace) -> RunData:
    """The pretraining set and the labelled kNN memory and queries, from --data; missing files exit with advice."""
    name = dataset_name(args.data)
    try:
        if name is not None:
            def split(which: str) -> Dataset:
                return load_dataset(name, args.image_size, root=args.data_root, split=which)
            labelled = split("train")
            train = split(PRETRAIN_SPLIT[name]) if name in PRETRAIN_SPLIT else labelled
            return RunData(train, _cap(labelled, args.knn_train), _cap(split("test"), args.knn_test),
                           list(labelled.classes), _channels(train))
        folder = load_dataset(args.data, args.image_size, max_pixels=args.max_pixels or None)
        if isinstance(folder, TarShards):
            return _shard_data(folder, args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {cli_words(str(e))}") from None
    if not folder.classes:
        print(f"note: {args.data} has no labels (no class subfolders); training without the kNN report")
        return RunData(folder, None, None, [], _channels(folder))
    # one image in five is a kNN query; pretraining sees every image (labels are never used for it)
    queries = [i for i in range(len(folder)) if i % 5 == 0 and folder.labels[i] >= 0]
    memory = [i for i in range(len(folder)) if i % 5 != 0 and folder.labels[i] >= 0]
    return RunData(folder, Subset(folder, memory[:args.knn_train]), _cap(Subset(folder, queries), args.knn_test),
                   list(folder.classes), _channels(folder))


# kNN sets read from tar shards by default: the first samples in shard order (a stream has no random access)
SHARD_KNN = (10_000, 2_500)


def _shard_data(shards: TarShards, args: argparse.Namespace) -> RunData:
    """Tar shards to pretrain on; kNN memory and queries are their first labelled samples (.cls) in shard order,
    one in five a query, 10,000 and 2,500 at most unless --knn-train and --knn-test say otherwise."""
    memory_n, query_n = args.knn_train or SHARD_KNN[0], args.knn_test or SHARD_KNN[1]
    head = shards.head(memory_n + query_n)
    labelled = [i for i, y in enumerate(head.labels) if y >= 0]
    if not labelled:
        print(f"note: the first samples of {args.data} have no labels (.cls members); training without the kNN "
              "report")
        return RunData(shards, None, None, [], shards.channels)
    classes = list(shards.classes) or [str(c) for c in range(max(head.labels[i] for i in labelled) + 1)]
    queries = [i for k, i in enumerate(labelled) if k % 5 == 0][:query_n]
    memory = [i for k, i in enumerate(labelled) if k % 5 != 0][:memory_n]
    print(f"kNN report: memory and queries are the first {len(memory)} and {len(queries)} labelled samples of the "
          "shards (--knn-train, --knn-test)")
    return RunData(shards, Subset(head, memory), Subset(head, queries), classes, shards.channels)


def _channels(ds: Dataset) -> int:
    """The channel count of the data set's images (a folder says it; otherwise its first image does)."""
    return int(getattr(ds, "channels", None) or ds[0][0].shape[0])


def make_trainer(args: argparse.Namespace, name: str, data: RunData, out: Path) -> tuple[Trainer, Any]:
    """The net from --arch and the Trainer from the flags; bad settings exit with one line naming the fix."""
    min_crop = args.min_crop if args.min_crop is not None else MIN_CROP.get(name)
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
        method_kwargs = {**crop, **method_defaults(args.method, _planned_steps(args, data))[1],
                         **_method_kwargs(args.method_arg),
                         **normalize_kwargs(args, data, channels)}
        if args.teacher is not None:
            method_kwargs.update(teacher=args.teacher, teacher_arch=args.teacher_arch or args.arch)
        trainer = Trainer(
            net, dataset=data.train, image_size=args.image_size, hidden_layer=hidden, method=args.method,
            learning_rate=args.lr, scale_lr=True, num_train_steps=args.steps, epochs=args.epochs,
            batch_size=args.batch_size, optimizer=args.optimizer, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, gradient_accumulation_steps=args.grad_accum,
            max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision, num_workers=args.num_workers,
            seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every, checkpoint_folder=out,
            log_every=args.log_every, eval_every=_eval_every(args, data) if knn_sets is not None else None,
            eval_dataset=knn_sets, eval_k=args.knn_k, plot=args.plots, compile=args.compile,
            deterministic=args.deterministic, init=args.init, collective_timeout=args.timeout, **method_kwargs)
    except RunConflictError as e:
        raise SystemExit(f"error: {conflict_message(e)}") from None
    except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
        raise SystemExit(f"error: {cli_words(str(e))}") from None
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
    args.normalize = stats  # recorded in metrics.json, where `wrapssl embed` and `evaluate` find it
    return {"normalize": stats}


def conflict_message(e: RunConflictError) -> str:
    """Why a used --out is refused, and the choices, in this app's words."""
    return cli_words(str(e)).replace("delete its checkpoints to start over", f"delete {e.folder} to start over")


def _eval_every(args: argparse.Namespace, data: RunData) -> int:
    """--eval-every, or a third of the run (two points inside the learning curve, and its end)."""
    if args.eval_every is not None:
        return args.eval_every
    return max(1, -(-_planned_steps(args, data) // 3))


def _planned_steps(args: argparse.Namespace, data: RunData) -> int:
    """--steps, or the steps --epochs makes (the Trainer resolves them the same way)."""
    if args.steps is not None:
        return args.steps
    return max(1, round(args.epochs * (len(data.train) // args.batch_size)))


def weights_sha256(net: torch.nn.Module) -> str:
    """SHA-256 over the state_dict: each key (UTF-8) then its tensor's raw bytes, in sorted key order."""
    h = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
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
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            a = embed_dataset(trainer.learner, data.memory, batch_size=512, device=device)
            b = embed_dataset(trainer.learner, data.queries, batch_size=512, device=device)
    return probe_scores(a, b, k=k), (a, b)


def score_baselines(trainer: Trainer, args: argparse.Namespace, data: RunData) -> dict[str, dict[str, float]]:
    """The report's rows before training, raw pixels and the random-init net; none with --no-baselines."""
    rows: dict[str, dict[str, float]] = {}
    if not args.baselines:
        return rows
    print("scoring the baselines: raw pixels ...", flush=True)
    rows.update(baseline_scores(data.memory, data.queries, args.image_size, k=args.knn_k))
    print("scoring the randomly initialised net ..." if args.init is None else
          f"scoring the net as it starts, from --init {args.init} (the 'random init' row below) ...", flush=True)
    rows["random_init"], _ = score_learner(trainer, data, args.knn_k)
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
                                 title=f"{trainer.config['method']} on {metrics['data']}: kNN (k={metrics['knn_k']}, "
                                       f"{metrics['knn_memory']} images as memory)")
        if metrics.get("label_budgets", {}).get("budgets"):
            plots.budget_curve(metrics["label_budgets"], out / "budget_curve.png",
                               title=f"{trainer.config['method']} on {metrics['data']}: test accuracy with few labels")
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
        scores["pretrained"], embeddings = score_learner(trainer, data, args.knn_k)
        metrics["knn_after"] = scores["pretrained"]["knn"]
        metrics["learning_curve"] = learning_curve(trainer, metrics)
        print(f"\nscores on {len(data.queries)} test images ({len(data.memory)} training images as kNN memory, "
              f"k={args.knn_k}, t=0.1):")
        print(format_scores(scores, k=args.knn_k, memory=len(data.memory)))
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
    from .budgets import print_report, report

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


def check_out(out: Path) -> None:
    """Exit with one line if --out cannot be written, before any data is read (nothing is created here: the
    probe goes into --out or, when it does not exist yet, the folder it would be made in)."""
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
    """Exit with one line if the disk under --out cannot hold a checkpoint and the exported backbone."""
    # a checkpoint holds the learner and the optimiser's moments (about twice the trainable weights)
    need = 3 * _bytes(trainer.learner.state_dict()) + 2 * _bytes(trainer.net.state_dict())
    free = shutil.disk_usage(out).free
    if free < need:
        raise SystemExit(f"error: --out {out} has {free / 2**20:,.1f} MB free, and this run writes about "
                         f"{need / 2**20:,.1f} MB (a checkpoint and the backbone); free space or pick another --out")


def _program() -> list[str]:
    """How this app was started: `wrapssl train`, `python -m wrapssl.train`, `python -m wrapssl train` or
    `python <script>`."""
    arg0 = Path(sys.argv[0])
    if arg0.name == "wrapssl":
        return ["wrapssl", "train"]
    if arg0.suffix == ".py" and arg0.exists():
        if arg0.resolve() == Path(__file__).resolve():
            return ["python", "-m", "wrapssl.train"]
        if arg0.name == "__main__.py" and arg0.resolve().parent == Path(__file__).resolve().parent:
            return ["python", "-m", "wrapssl", "train"]
        return ["python", sys.argv[0]]
    return ["wrapssl", "train"]


def continue_command(argv: Sequence[str]) -> str:
    """The command that continues this run: the same arguments, with --resume (an older --resume PATH dropped)."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join([*_program(), *kept, "--resume"])


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


def _is_main() -> bool:
    """True on the process that speaks for a run (rank 0, as torchrun and accelerate launch number them)."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> dict:
    """Pretrain, evaluate before/after, write everything to --out; returns the metrics.

    Ctrl-C or SIGTERM end the app with the shell's code for the signal (130, 143) after a checkpoint, and
    print the command that continues the run; a run that diverges, a write that fails, a refused --out and
    a process that stops answering end it with one ``error: ...`` line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with sigterm_interrupts():
        try:
            return _run(args)
        except TrainingInterrupted as e:
            if _is_main():
                print(f"wrapssl: stopped by {e.signal_name} at step {e.step}; {e.checkpoint} holds it. Continue "
                      f"with:\n  {continue_command(argv)}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
        except KeyboardInterrupt as e:
            name = getattr(e, "signal_name", "SIGINT")
            if _is_main():
                print(f"wrapssl: interrupted by {name}; every checkpoint written so far is kept. The same command "
                      f"continues:\n  {continue_command(argv)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + (15 if name == "SIGTERM" else 2)) from None
        except (NonFiniteLossError, CollectiveTimeoutError, UnreadableDataError, OSError) as e:
            raise SystemExit(f"error: {cli_words(str(e))}") from None


def _run(args: argparse.Namespace) -> dict:
    """The app's work: data, Trainer, baselines, training, report (see ``main``)."""
    start = time.perf_counter()
    name = _data_name(args.data)
    if args.image_size is None:
        args.image_size = DEFAULT_IMAGE_SIZE.get(name, 64)
    out = Path(args.out or f"runs/{args.method}-{name}")
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
    if data.memory is not None and "scores" not in metrics and acc.is_main_process:
        metrics.update(data=name, knn_k=args.knn_k, knn_memory=len(data.memory), knn_queries=len(data.queries))
        metrics["scores"] = score_baselines(trainer, args, data)
        if metrics["scores"]:  # empty with --no-baselines
            metrics["knn_before"], metrics["knn_before_step"] = metrics["scores"]["random_init"]["knn"], trainer.step
            print(format_scores(metrics["scores"], k=args.knn_k, memory=len(data.memory)), flush=True)
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2))  # so that a resumed run finds it
    acc.wait_for_everyone()

    train_start = time.perf_counter()
    with trainer:  # ends the trackers and the process group when the report is done
        trainer()
        metrics.update(train_time_s=round(time.perf_counter() - train_start, 1))
        hashes, bad = [weights_sha256(net=trainer.net)], [unreadable_files(data.train)]
        if acc.num_processes > 1:
            hashes, bad = gather_object(hashes), gather_object(bad)
        if acc.is_main_process:
            embeddings = final_report(trainer, args, data, metrics, hashes)
            report_unreadable(data, metrics, {k: v for found in bad for k, v in found.items()})
            if embeddings is not None and args.labels:
                budget_report(args, data, metrics, embeddings, out)
            if args.plots:
                make_plots(trainer, data, embeddings[1] if embeddings is not None else None, metrics, out)
            metrics.update(wall_time_s=round(time.perf_counter() - start, 1))
            atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
            print(f"wrote {out}/backbone.pt, backbone.safetensors, checkpoints, metrics.json"
                  f"{' and plots' if args.plots else ''} in {metrics['wall_time_s']:.0f} s")
        acc.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
