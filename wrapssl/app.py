"""The training app's command line and entry point: flags named after the settings, parsed, checked, then run.

    wrapssl train                                    # small ResNet on Fashion-MNIST, a few minutes on 2 CPU cores
    wrapssl train --data stl10 --data-root ~/data --arch resnet18 --method simclr
    wrapssl train --data ~/photos --arch resnet18 --image-size 96 --epochs 100 --method byol
    accelerate launch -m wrapssl train ...                            # the GPUs from `accelerate config`
    accelerate launch --multi_gpu --num_processes 2 -m wrapssl train  # 2 processes without GPUs (gloo)
    torchrun --nproc_per_node 2 -m wrapssl train ...                  # the same without accelerate's launcher

Every flag is named after the setting it sets: a Trainer keyword (``--num-train-steps`` is ``num_train_steps``;
the short forms users know, ``--steps``, ``--lr``, ``--out``, ``--grad-accum``, ``--timeout``, ``--knn-k`` and
``--plots``, stay) or a field of ``AppSettings``, the app's own settings. So a message of the library that names a
setting names the flag too. No torch at import: ``--help`` and ``--version`` answer at once; pretrain.py holds the
run itself, report.py what it prints and writes, recipes.py the defaults.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from . import recipes
from .argparsing import (DEFAULT_BUDGETS, DEFAULT_DRAWS, DEFAULT_FINETUNE_STEPS, VERSION, HelpFormatter, Parser,
                         add_budget_args, key_values)
from .checks import (arg_type, fraction_arg, non_negative_float_arg, non_negative_int_arg, positive_float_arg,
                     positive_int_arg)
from .config import TrainConfig

# at least 2: BatchNorm and every loss compare images of a batch
BATCH_SIZE = arg_type(int, lambda v: v >= 2, "a whole number >= 2 (batch norm and the losses compare images)")


@dataclass
class AppSettings:
    """The app's own settings, around the Trainer's: what data, which net, the report. Each is a flag of the same
    name (``data_root`` is ``--data-root``) with this default; every other flag is a Trainer keyword of its name
    (a field of ``TrainConfig``)."""

    data: str = recipes.DEFAULT_RUN["data"]
    data_root: str | None = None
    max_pixels: int = recipes.MAX_PIXELS
    normalize: Any = None  # None, "auto" or (means, stds)
    arch: str = recipes.DEFAULT_RUN["arch"]
    method_arg: list[str] = field(default_factory=list)  # KEY=VALUE, repeatable
    teacher: str | None = None
    teacher_arch: str | None = None
    min_crop: float | None = None
    knn_train: int | None = None
    knn_test: int | None = None
    baselines: bool = True
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    draws: int = DEFAULT_DRAWS
    finetune_steps: int = DEFAULT_FINETUNE_STEPS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AppSettings:
        """The app's settings out of the parsed command line."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


APP = AppSettings()  # the defaults of the app's own flags
# the defaults of the Trainer's flags: TrainConfig's, with the default run's in their place (recipes.DEFAULT_RUN)
RUN = {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, **recipes.DEFAULT_RUN}


def _data_args(p: Parser) -> None:
    """The data flags: what to train on, its size and statistics."""
    d = p.add_argument_group("data")
    d.add_argument("--data", default=APP.data,
                   help=f"a named data set ({', '.join(recipes.DATASETS)}) or a folder of images (one subfolder per "
                        "class gives kNN labels; a flat folder trains without the kNN report). stl10 pretrains on "
                        "its 100k unlabeled split and reports kNN from train (memory) to test (queries). Other "
                        "channel counts: a folder of .npy (or, with tifffile, .tif) arrays, or a tensor file "
                        "(.pt/.npy, N x C x H x W); see docs/training.md")
    d.add_argument("--data-root", default=APP.data_root,
                   help=f"folder holding a named data set's files in torchvision's layout (cifar-10-batches-py, "
                        f"stl10_binary; nothing is downloaded). Default for fashion-mnist: "
                        f"{recipes.FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)")
    d.add_argument("--image-size", type=positive_int_arg, default=None,
                   help="side of the square views (default: " + ", ".join(
                       f"{r.image_size} for {n}" for n, r in recipes.DATA.items()) +
                        f", {recipes.FOLDER_IMAGE_SIZE} for folders). Compute grows with its square: on CPU stay at "
                        "or below 64")
    d.add_argument("--max-pixels", type=non_negative_int_arg, default=APP.max_pixels,
                   help="images above this many pixels are counted as unreadable (PIL's decompression-bomb "
                        "guard); raise it for huge scans or maps, 0 for no limit")
    d.add_argument("--normalize", nargs="+", default=APP.normalize, metavar="STATS",
                   help="per-channel statistics applied after augmentation: MEAN,MEAN,... STD,STD,... (values "
                        "of images in [0, 1], one per channel), or 'auto' to estimate them from up to 1,000 "
                        "images. Default: ImageNet's for 1- and 3-channel data, 'auto' for other channel counts")
    d.add_argument("--num-workers", type=non_negative_int_arg, default=RUN["num_workers"],
                   help="DataLoader processes decoding images; 0 is best for in-memory data (Fashion-MNIST, "
                        "CIFAR-10), use 4-8 per GPU for folders of JPEGs")


def _model_args(p: Parser) -> None:
    """The model and method flags: which net, which layer, which method and its settings."""
    m = p.add_argument_group("model and method")
    m.add_argument("--arch", default=APP.arch,
                   help="'small_resnet' (28-64 px on CPU), any torchvision model name (resnet50, vit_b_16, "
                        "convnext_tiny, ...) or 'timm:<name>'. Weights are never downloaded")
    m.add_argument("--hidden-layer", default=None,
                   help="layer whose output is the representation: a name from net.named_modules() or an int "
                        "index into its children (default: the net's pre-logits, the input of its classifier)")
    m.add_argument("--method", default=RUN["method"], choices=recipes.METHODS,
                   help="self-supervised method. simclr learns fastest in short CPU runs; byol, dino and swav need "
                        "long runs (benchmarks/RESULTS.md, the method table). Each gets the app's short-run "
                        "settings (wrapssl/recipes.py, docs/training.md)")
    m.add_argument("--method-arg", action="append", default=APP.method_arg, metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable, e.g. temperature=0.2 (simclr: 0.1-0.5; lower values "
                        "weigh hard negatives more and want larger batches; this app uses 0.2, which beat the "
                        "method's 0.5 at batch 256 in our runs) or projection_hidden_size=1024")
    m.add_argument("--teacher", default=APP.teacher, metavar="PATH",
                   help="--method distill: the teacher's weights (a backbone.pt from an earlier run, or a "
                        "torchvision/timm state dict); the student (--arch) learns to predict its features")
    m.add_argument("--teacher-arch", default=APP.teacher_arch, metavar="NAME",
                   help="the teacher's architecture, as --arch names it (default: --arch)")
    m.add_argument("--channels", type=positive_int_arg, default=None,
                   help="input channels of the net (default: 3 for grey and colour images, which repeats grey "
                        "to 3; else the data's own count). Grey data gets the same augmentation either way "
                        "(brightness/contrast jitter; saturation, hue and grayscale do nothing on grey); the "
                        "recorded runs use 3")
    m.add_argument("--init", default=None, metavar="PATH",
                   help="weights to start from: a torchvision/timm state dict, a backbone.pt or a checkpoint of "
                        "the same --arch (the classifier may differ: pretraining never runs it). Default: random")
    m.add_argument("--min-crop", type=fraction_arg, default=APP.min_crop,
                   help="smallest area fraction of the global random crops (default 0.25 for the 28-px built-in "
                        "data, else the method's 0.08); below 0.2 small images lose their object")


def _optimisation_args(p: Parser) -> None:
    """The optimisation flags: how long, how large a batch, how fast."""
    o = p.add_argument_group("optimisation")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--num-train-steps", "--steps", type=positive_int_arg, default=None, metavar="N",
                        help=f"optimiser steps (default {recipes.DEFAULT_RUN['num_train_steps']} when --epochs is "
                             "not given)")
    length.add_argument("--epochs", type=positive_float_arg, default=None,
                        help="passes over the data, instead of --num-train-steps (default: use --num-train-steps)")
    o.add_argument("--batch-size", type=BATCH_SIZE, default=RUN["batch_size"],
                   help="images per process per batch. Contrastive methods want 256 or more (more negatives); "
                        "below 64 BatchNorm statistics get noisy")
    o.add_argument("--learning-rate", "--lr", type=positive_float_arg, default=None, metavar="LR",
                   help="learning rate at a global batch of 256; it is scaled by global batch / 256. AdamW "
                        "with SimCLR and the small ResNet, in our runs: 8e-3 and 1.6e-2 equally good, 2e-3 about "
                        "1.4 kNN points worse; BYOL, SimSiam, Barlow Twins, VICReg, DINO and SwAV were run at "
                        "2e-3. If the loss turns NaN, halve it or lengthen the warmup. SGD: 0.05 (SimSiam); "
                        "LARS: 0.2-0.3 (BYOL, SimCLR) (default: the method's, 8e-3 for simclr, moco and nnclr, "
                        "1e-3 for mae, 2e-3 for the others)")
    o.add_argument("--optimizer", default=RUN["optimizer"], choices=recipes.OPTIMIZERS,
                   help="adamw is robust at any batch; lars was designed for batches of 1024 and more")
    o.add_argument("--weight-decay", type=non_negative_float_arg, default=None,
                   help="default 0.05 (adamw), 1e-4 (sgd), 1.5e-6 (lars); biases and norms never decay")
    o.add_argument("--warmup-steps", type=non_negative_int_arg, default=None,
                   help="linear warmup before the cosine decay (default: 10%% of the steps); lengthen it if the "
                        "loss spikes or turns NaN early")
    o.add_argument("--gradient-accumulation-steps", "--grad-accum", type=positive_int_arg, default=None, metavar="N",
                   help="batches per optimiser step: a larger effective batch without the memory (default: "
                        "accelerate's setting, ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1)")
    o.add_argument("--max-grad-norm", type=positive_float_arg, default=None,
                   help="clip gradients to this norm (DINO clips ViTs at 3.0; default: no clipping)")
    o.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="bf16 on GPUs that support it (A100, H100) saves memory and time; fp16 needs loss "
                        "scaling (done for you) and can overflow; keep 'no' on CPU (default: accelerate's config)")
    o.add_argument("--seed", type=int, default=RUN["seed"], help="seed for weights, data order and augmentations")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders (also switched on by a dynamo backend in `accelerate "
                        "config`): the first steps compile (about a minute); it pays most when the hidden layer "
                        "is the net's own output (benchmarks/RESULTS.md)")
    o.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (slower): needed on a GPU for a resumed run to end "
                        "bit-identical to an uninterrupted one; CPU runs are reproducible without it")


def _output_args(p: Parser) -> None:
    """The output flags: where the run goes, how often it checkpoints, logs and scores."""
    r = p.add_argument_group("output")
    r.add_argument("--checkpoint-folder", "--out", default=None, metavar="FOLDER",
                   help="output folder (default: runs/<method>-<data>). Running the same command again continues "
                        "the run in it; a run with other settings is refused there (see --resume)")
    r.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the run in --checkpoint-folder with the settings given now: more "
                        "--num-train-steps or a new --learning-rate rebuild the schedule at the step reached, as "
                        "if the run had been planned so. Or a checkpoint path to continue from (default: continue "
                        "only a run with the same settings; start fresh in an empty --checkpoint-folder)")
    r.add_argument("--checkpoint-every", type=positive_int_arg, default=RUN["checkpoint_every"],
                   help="steps between checkpoints")
    r.add_argument("--log-every", type=positive_int_arg, default=RUN["log_every"],
                   help="steps between log lines; the NaN check also runs then (no per-step GPU sync)")
    r.add_argument("--eval-every", type=positive_int_arg, default=None,
                   help="kNN accuracy every N steps during training, for the learning curve (each costs one "
                        "embedding pass over memory and queries; default: a third of the steps)")
    r.add_argument("--knn-train", type=positive_int_arg, default=APP.knn_train,
                   help="training images embedded as the kNN memory (default: all, the protocol of `wrapssl "
                        "evaluate`; the test split is the queries)")
    r.add_argument("--knn-test", type=positive_int_arg, default=APP.knn_test,
                   help="cap on the kNN query images (default: all)")
    r.add_argument("--eval-k", "--knn-k", type=positive_int_arg, default=RUN["eval_k"], metavar="K",
                   help="neighbours voting in the kNN classifier")
    r.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=APP.baselines,
                   help="also score raw pixels and the randomly initialised net on the same protocol (kNN and "
                        "linear probe): a pretrained backbone that does not beat them has not learned anything "
                        "useful")
    add_budget_args(r)
    r.add_argument("--collective-timeout", "--timeout", type=positive_float_arg, default=RUN["collective_timeout"],
                   metavar="SECONDS",
                   help="seconds a process waits for the others at a collective operation (multi-process runs) "
                        "before the run ends with an error: a stopped or hung process cannot block the job forever. "
                        "Keep it above the longest evaluation (the main process scores while others wait)")
    r.add_argument("--plot", "--plots", action=argparse.BooleanOptionalAction, default=RUN["plot"],
                   help="write the learning curve, loss curve, augmentation grid and embedding map PNGs (needs "
                        "matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with its default and tuning advice in every help string; builds without torch."""
    p = Parser(prog="wrapssl train", formatter_class=HelpFormatter,
               description="Self-supervised pretraining of a vision backbone with wrapssl; prints kNN accuracy of "
                           "the representation before (random init) and after. Each flag sets the Trainer keyword "
                           "or app setting of its name (--num-train-steps: num_train_steps).")
    p.add_argument("--version", action="version", version=VERSION)
    for group in (_data_args, _model_args, _optimisation_args, _output_args):
        group(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The checked command line (--num-train-steps defaults to the default run's when --epochs is not given, the
    learning rate to the method's); a bad argument exits with one line that names the fix, before anything is
    loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .evaluate.budgets import parse_budgets  # loads torch: after --help and --version have answered

    if args.num_train_steps is None and args.epochs is None:
        args.num_train_steps = recipes.DEFAULT_RUN["num_train_steps"]
    if args.learning_rate is None:
        args.learning_rate = recipes.method_defaults(args.method)[0]
    if args.warmup_steps is not None and args.num_train_steps is not None and args.warmup_steps > args.num_train_steps:
        parser.error(f"--warmup-steps {args.warmup_steps} is longer than the run (--num-train-steps "
                     f"{args.num_train_steps}); use at most {args.num_train_steps}")
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
        key_values(args.method_arg, "--method-arg")
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


def _program() -> list[str]:
    """How this app was started: `wrapssl train`, `python -m wrapssl train`, `python -m wrapssl.app` or
    `python <script>`."""
    arg0 = Path(sys.argv[0])
    if arg0.name == "wrapssl":
        return ["wrapssl", "train"]
    if arg0.suffix == ".py" and arg0.exists():
        here = Path(__file__).resolve().parent
        if arg0.resolve() == Path(__file__).resolve():
            return ["python", "-m", "wrapssl.app"]
        if arg0.name == "__main__.py" and arg0.resolve().parent == here:
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


def is_main() -> bool:
    """True on the process that speaks for a run (rank 0, as torchrun and accelerate launch number them)."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> dict:
    """Pretrain, evaluate before/after, write everything to --checkpoint-folder; returns the metrics.

    Ctrl-C or SIGTERM end the app with the shell's code for the signal (130, 143) after a checkpoint, and
    print the command that continues the run; a run that diverges, a write that fails, a refused folder and
    a process that stops answering end it with one ``error: ...`` line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from .distributed import CollectiveTimeoutError
    from .interrupt import TrainingInterrupted, sigterm_interrupts
    from .monitor import NonFiniteLossError
    from .pretrain import UnreadableDataError, run

    with sigterm_interrupts():
        try:
            return run(args)
        except TrainingInterrupted as e:
            if is_main():
                print(f"wrapssl: stopped by {e.signal_name} at step {e.step}; {e.checkpoint} holds it. Continue "
                      f"with:\n  {continue_command(argv)}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
        except KeyboardInterrupt as e:
            name = getattr(e, "signal_name", "SIGINT")
            if is_main():
                print(f"wrapssl: interrupted by {name}; every checkpoint written so far is kept. The same command "
                      f"continues:\n  {continue_command(argv)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + (15 if name == "SIGTERM" else 2)) from None
        except (NonFiniteLossError, CollectiveTimeoutError, UnreadableDataError, OSError) as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":  # python -m wrapssl.app
    from .argparsing import quiet_openmp
    quiet_openmp()  # before torch loads OpenMP
    main()
