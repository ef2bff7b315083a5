"""The ``wrapssl`` command's parser and dispatch: train, then finetune, embed, evaluate, plot, select, shards.

What each command does is in commands.py and finetune_command.py; `wrapssl train` is the app (app.py).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

# No torch here (nor accelerate, kornia, torchvision): `wrapssl --help` and --version answer without loading
# them; each command imports what it needs when it runs.
from .argparsing import VERSION, HelpFormatter, Parser, add_budget_args, quiet_openmp
from .checks import arg_type, fraction_arg, positive_float_arg, positive_int_arg
from .commands import cmd_embed, cmd_evaluate, cmd_plot, cmd_select, cmd_shards
from .finetune_command import cmd_finetune

DESCRIPTION = """Pretrain with `wrapssl train`, then use what the run learned. SOURCE is a run folder
(backbone.pt + metrics.json), a backbone.pt (give --arch unless metrics.json sits beside it)
or a Trainer checkpoint-N.pt. Outputs go into the run folder (or beside the input file)
unless --out says otherwise."""
COSINE = arg_type(float, lambda v: -1 <= v <= 1, "a cosine in [-1, 1]")
# wrapssl.select's methods, its default first, named here without loading it (tests/test_cli.py checks they agree)
SELECT_METHODS = ("typiclust", "probcover", "kcenter", "random")


def cmd_train(argv: Sequence[str]) -> int:
    """Pretrain a backbone: the training app (app.py), which parses its own flags."""
    from .app import main as train_main

    train_main(list(argv))
    return 0


def _source_args(p: argparse.ArgumentParser) -> None:
    """Arguments of every subcommand that loads a backbone and a data set."""
    p.add_argument("--arch", help="architecture of a bare weights file (default: what the backbone's metadata, or "
                                  "an older run's metrics.json, says)")
    p.add_argument("--hidden-layer", help="layer to embed from (default: the run's, else the arch's default)")
    p.add_argument("--data", help="folder or named data set, e.g. fashion-mnist (default: the run's own data)")
    p.add_argument("--data-root", help="folder holding a named data set's files (default: the run's)")
    p.add_argument("--image-size", type=positive_int_arg,
                   help="resize images to this (default: the run's image size)")

def _backbone_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the subcommands that embed a data set with a backbone."""
    _source_args(p)
    p.add_argument("--limit", type=positive_int_arg, help="embed only the first N images (default: all)")
    p.add_argument("--batch-size", type=positive_int_arg, default=256,
                   help="images per forward pass; lower it if memory is short")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``wrapssl`` command; builds without torch, so that every `--help` is fast."""
    parser = Parser(prog="wrapssl", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("train", help="pretrain a backbone (`wrapssl train --help` lists its flags)", add_help=False)

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=func.__doc__, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("embed", "embed a data set with a pretrained backbone", cmd_embed)
    p.add_argument("source", help="run folder, backbone.pt or checkpoint-N.pt")
    _backbone_args(p)
    p.add_argument("--split", choices=["train", "test", "unlabeled"], default="test",
                   help="which split of a named data set (unlabeled: STL-10 only)")
    p.add_argument("--out", help="output .npz: embeddings, labels, files (default: "
                                 "<run folder>/embeddings-<split>.npz)")
    p.add_argument("--csv", help="also write a CSV here: file,label,e0..eD-1 (default: no CSV)")

    p = command("evaluate", "kNN / linear probe / clustering / retrieval scores", cmd_evaluate)
    p.add_argument("source", nargs="?", help="run folder, backbone.pt or checkpoint-N.pt (default: use "
                                             "--train-embeddings and --test-embeddings)")
    _backbone_args(p)
    p.add_argument("--train-embeddings", help="saved train embeddings (.npz), instead of SOURCE (default: none)")
    p.add_argument("--test-embeddings", help="saved test embeddings (.npz), instead of SOURCE (default: none)")
    p.add_argument("-k", type=positive_int_arg, default=200,
                   help="kNN neighbours (200 as in InstDisc/DINO; 20 for tiny sets)")
    p.add_argument("--temperature", type=positive_float_arg, default=0.1,
                   help="kNN vote temperature; lower = sharper votes")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also score raw pixels and the randomly initialised net (the run's seed) on the same "
                        "protocol, under \"baselines\" (needs SOURCE)")
    add_budget_args(p)
    p.add_argument("--out", help="scores as JSON (default: <run folder>/scores.json, or beside the test "
                                 "embeddings)")

    p = command("finetune", "fine-tune a pretrained backbone on labelled images (a new classification head)",
                cmd_finetune)
    p.add_argument("source", help="run folder, backbone file (.safetensors from wrapssl train describes itself; "
                                  "another needs --arch) or checkpoint-N.pt")
    _source_args(p)
    p.add_argument("--labels", default="all",
                   help="how many labelled training images to use: 'all', a total (100) or per class (10/class), "
                        "drawn class-balanced with --label-seed; with a built-in set this simulates a budget")
    p.add_argument("--label-seed", type=int, default=0, help="seed of the draw of --labels")
    p.add_argument("--picks", metavar="CSV",
                   help="use the images a `wrapssl select` CSV picked (their labels from --data) instead of --labels")
    p.add_argument("--test", metavar="FOLDER",
                   help="labelled test images, one subfolder per class (default: a named set's test split; for a "
                        "folder, every fifth image is held out)")
    p.add_argument("--steps", type=positive_int_arg, default=300,
                   help="optimiser steps; 300 suits 100-1,000 labels at batch 64")
    p.add_argument("--batch-size", type=positive_int_arg, default=64,
                   help="labelled images per step and process (capped at the number of labelled images)")
    p.add_argument("--lr", type=positive_float_arg, default=2e-3,
                   help="the head's AdamW learning rate; the backbone gets lr x --backbone-lr-ratio")
    p.add_argument("--backbone-lr-ratio", type=float, default=0.1,
                   help="the backbone's learning rate relative to the head's: low keeps the pretrained features, 0 "
                        "trains the head only, 1.0 for a net trained from scratch")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases and norms)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="bf16 on recent GPUs (default: accelerate config's)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images")
    p.add_argument("--seed", type=int, default=0, help="seed of the head, the batches and the augmentations")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings given now (the same command again "
                        "continues a run with the same settings; other settings are refused without this)")
    p.add_argument("--out", help="output folder (default: <run folder>/finetune-<labels>)")

    p = command("plot", "2-D map of saved embeddings", cmd_plot)
    p.add_argument("embeddings", help=".npz written by 'wrapssl embed'")
    p.add_argument("--out", help="output PNG (default: <embeddings>-map.png beside the .npz)")
    p.add_argument("--method", choices=["tsne", "pca", "umap"], default="tsne",
                   help="tsne (scikit-learn; slow above ~10k points), pca (fast, linear), umap (needs umap-learn)")
    p.add_argument("--max-points", type=positive_int_arg, default=5000, help="subsample to this many points")
    p.add_argument("--class-names", help="comma-separated legend names by label (default: the class names the "
                                         "run recorded in its metrics.json, else the label numbers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample and the projection")

    p = command("select", "pick images to label (better than random at small budgets); find near-duplicates",
                cmd_select)
    p.add_argument("embeddings", help=".npz written by 'wrapssl embed'")
    p.add_argument("-n", type=positive_int_arg, required=True, help="how many items to select (required)")
    p.add_argument("--method", choices=SELECT_METHODS, default=SELECT_METHODS[0],
                   help="typiclust: the most typical item of each of n clusters (best measured on Fashion-MNIST: "
                        "+4.5 points over random picks at 100 labels, +1 at 1,000); probcover: greedy coverage "
                        "of balls around items; kcenter: cover the space (coreset; spends picks on outliers, "
                        "below random from 50 labels on); random: the baseline")
    p.add_argument("--weights", choices=["density", "uncertainty"],
                   help="kcenter/random only: density avoids outliers; uncertainty favours items between clusters "
                        "(default: none)")
    p.add_argument("--test-embeddings", metavar="PATH",
                   help="labelled test embeddings (.npz) to score the picks on: a linear probe trained on the "
                        "picked items against one trained on random ones, printed and written to "
                        "<out>-vs-random.json (default: embeddings-test.npz beside the input, if it exists and "
                        "the input is labelled)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="score the picks against random picks when labels and test embeddings exist")
    p.add_argument("--draws", type=positive_int_arg, default=3, help="random draws to compare against")
    dup = p.add_mutually_exclusive_group()
    dup.add_argument("--duplicates", type=fraction_arg, metavar="FRACTION",
                     help="also list near-duplicate pairs: pairs closer than FRACTION x the median distance from "
                          "an item to its nearest neighbour (0.1-0.3 finds near-copies; the cosine it amounts "
                          "to is printed; default: no duplicate search)")
    dup.add_argument("--duplicate-cosine", type=COSINE, metavar="COSINE",
                     help="the same with an absolute cosine threshold instead (its meaning depends on the model; "
                          "default: none)")
    p.add_argument("--out", help="output CSV: rank,index,file (default: <embeddings>-selection.csv beside the "
                                 ".npz; duplicates go to <out>-duplicates.csv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the picks (k-means, first pick) and of the random "
                                                       "draws (seed, seed+1, ...)")

    p = command("shards", "write tar shards (the WebDataset layout) from a folder or a built-in data set", cmd_shards)
    p.add_argument("source", help="an image folder (its files are copied as they are; class subfolders give .cls "
                                  "labels) or a built-in data set (written as PNG with labels)")
    p.add_argument("out_pattern", metavar="OUT_PATTERN",
                   help="the shards' names, 'out/train-%%06d.tar' or 'out/train-{000000..000099}.tar'; shards.json "
                        "(samples per shard, class names) is written beside them")
    p.add_argument("--per-shard", type=positive_int_arg, default=1000,
                   help="images per shard: aim for 100 MB to 1 GB per shard, and at least as many shards as "
                        "processes x DataLoader workers will read them")
    p.add_argument("--split", choices=["train", "test", "unlabeled"], default=None,
                   help="the split of a built-in data set (default: train; all of digits)")
    p.add_argument("--data-root", help="folder holding a built-in data set's files (default: its usual place)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wrapssl`` console script."""
    quiet_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and "--version" in argv[1:]:  # answered before the app loads torch
        print(VERSION)
        return 0
    if argv[:1] == ["train"]:  # the training app parses its own flags
        return cmd_train(argv[1:])
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
