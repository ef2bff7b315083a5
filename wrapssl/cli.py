"""The ``wrapssl`` command: train, then embed, evaluate, plot and select with what a run learned."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

# No torch here (nor accelerate, kornia, torchvision): `wrapssl --help` and --version answer without loading
# them; each command imports what it needs when it runs.
from .argparsing import (VERSION, HelpFormatter, Parser, add_budget_args, cli_words,  # noqa: F401 (quiet_openmp:
                         quiet_openmp)  # the top-level train.py takes it from here)
from .checks import arg_type, fraction_arg, positive_float_arg, positive_int_arg

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .hidden import LayerSpec

DESCRIPTION = """Pretrain with `wrapssl train`, then use what the run learned. SOURCE is a run folder
(backbone.pt + metrics.json), a backbone.pt (give --arch unless metrics.json sits beside it)
or a Trainer checkpoint-N.pt. Outputs go into the run folder (or beside the input file)
unless --out says otherwise."""
EMBED_CHUNK = 4096  # images per progress-bar tick when embedding
COSINE = arg_type(float, lambda v: -1 <= v <= 1, "a cosine in [-1, 1]")


def _layer(text: str | None) -> LayerSpec | None:
    """A hidden layer from the command line: an int index or a dotted name."""
    if text is None:
        return None
    return int(text) if str(text).lstrip("-").isdigit() else text


def _run_record(folder: Path) -> dict[str, Any]:
    """The metrics.json a training run left in ``folder`` (empty if none)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e}); pass --arch and --data explicitly") from None


def load_backbone(source: str | os.PathLike, arch: str | None = None, hidden_layer: LayerSpec | None = None
                  ) -> tuple[Any, dict[str, Any]]:
    """(the backbone at ``source`` with its metadata, the arguments its run recorded); one error line otherwise."""
    from .backbone import load_backbone as load

    try:
        backbone = load(source, arch=arch, hidden_layer=hidden_layer)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {cli_words(str(e))}") from None
    return backbone, _run_record(backbone.folder).get("args", {})


def _dataset(spec: str | None, recorded: dict[str, Any], split: str, image_size: int | None, root: str | None):
    """The data to embed: --data, else the run's own data set (its labelled train/test splits)."""
    from .data import load_dataset

    spec = spec or recorded.get("data")
    if not spec:
        raise SystemExit("error: pass --data (a folder or a named data set such as fashion-mnist)")
    try:
        return load_dataset(spec, image_size or recorded.get("image_size"), split=split,
                            root=root or recorded.get("data_root"))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {cli_words(str(e))}") from None


def _embed_with_progress(backbone: Any, ds, args: argparse.Namespace, what: str, net: nn.Module | None = None):
    """``embed_dataset`` in chunks of EMBED_CHUNK images with the backbone's layer and normalisation (``net``:
    another net of the same make, e.g. its random init), with a progress bar on stderr."""
    import torch
    from torch.utils.data import Subset
    from tqdm.auto import tqdm

    from .backbone import Embedder
    from .evaluate import Embeddings, embed_dataset

    device = args.device
    parts = []
    net = (net if net is not None else backbone.net).to(device)
    with tqdm(total=len(ds), desc=f"embedding {what}", unit="img", file=sys.stderr, dynamic_ncols=True) as bar, \
            Embedder(net, backbone.hidden_layer, backbone.info.normalize, backbone.info.channels) as model:
        for start in range(0, len(ds), EMBED_CHUNK):
            chunk = Subset(ds, range(start, min(start + EMBED_CHUNK, len(ds))))
            parts.append(embed_dataset(model, chunk, batch_size=args.batch_size, device=device))
            bar.update(len(chunk))
    files = list(getattr(ds, "files", None) or [str(i) for i in range(len(ds))])[:len(ds)]
    return Embeddings(torch.cat([p.embeddings for p in parts]), torch.cat([p.labels for p in parts]), files)


def _device(text: str | None) -> torch.device:
    """--device as a device this machine has (default: cuda when available); one error line otherwise."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {text!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {text}: torch sees no CUDA device here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {text}: there are {torch.cuda.device_count()} CUDA devices "
                         "(cuda:0 ...); pick one of them")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {text}: MPS is not available here; use --device cpu")
    return device


def _embeddings(path: str | os.PathLike):
    """Embeddings from a .npz that `wrapssl embed` wrote; one error line for a missing or foreign file."""
    from .evaluate import Embeddings

    if not Path(path).is_file():
        raise SystemExit(f"error: {path}: no such file; write it with `wrapssl embed`")
    try:
        return Embeddings.load_npz(path)
    except Exception as e:  # a zip, pickle or shape error: the file is not ours
        raise SystemExit(f"error: {path} is not an embeddings file written by `wrapssl embed` "
                         f"({type(e).__name__}: {e})") from None


def _split(args: argparse.Namespace, recorded: dict[str, Any], split: str, backbone: Any = None):
    """One split of the data (the first --limit images of it), at --image-size, else the backbone's."""
    from torch.utils.data import Subset

    size = args.image_size or (backbone.info.image_size if backbone is not None else None)
    ds = _dataset(args.data, recorded, split, size, args.data_root)
    if args.limit:
        files = getattr(ds, "files", None)
        limited = Subset(ds, range(min(args.limit, len(ds))))
        limited.files = list(files[:len(limited)]) if files is not None else None
        ds = limited
    return ds


def _has_labels(ds) -> bool:
    """False if the data set's recorded labels say that every image is unlabelled (-1), without decoding any."""
    from torch.utils.data import Subset

    indices: Sequence[int] = range(len(ds))
    while isinstance(ds, Subset):
        indices, ds = [int(ds.indices[i]) for i in indices], ds.dataset
    labels = getattr(ds, "labels", None)
    if labels is None:
        return True  # no list to read: evaluate finds out from the embeddings
    return any(int(labels[i]) >= 0 for i in indices)


def _embed(args: argparse.Namespace, split: str):
    """(embeddings of one split of the data with the loaded backbone, the run folder)."""
    args.device = _device(args.device)
    backbone, recorded = load_backbone(args.source, args.arch, _layer(args.hidden_layer))
    ds = _split(args, recorded, split, backbone)
    return _embed_with_progress(backbone, ds, args, f"{split} split"), backbone.folder


def _baselines(args: argparse.Namespace, backbone: Any, recorded: dict[str, Any], train_ds, test_ds
               ) -> dict[str, dict[str, float]]:
    """Raw pixels and the randomly initialised net (the run's seed), scored as the backbone is."""
    from .evaluate import probe_scores, raw_pixels

    size = args.image_size or backbone.info.image_size
    print("scoring the baselines: raw pixels ...", file=sys.stderr)
    rows = {"raw_pixels": probe_scores(raw_pixels(train_ds, size), raw_pixels(test_ds, size), args.k,
                                       args.temperature)}
    from .backbone import random_init

    fresh = random_init(backbone, int(recorded.get("seed") or 0))
    a = _embed_with_progress(backbone, train_ds, args, "train split (random init)", net=fresh)
    b = _embed_with_progress(backbone, test_ds, args, "test split (random init)", net=fresh)
    rows["random_init"] = probe_scores(a, b, args.k, args.temperature)
    return rows


def _class_names(args: argparse.Namespace, folder: Path) -> list[str] | None:
    """Class names for a legend: --class-names, else the ones the run recorded in metrics.json."""
    if args.class_names:
        return [c.strip() for c in args.class_names.split(",")]
    return _run_record(folder).get("classes") or None


def cmd_train(argv: Sequence[str]) -> int:
    """Pretrain a backbone (the same app as `python -m wrapssl.train`)."""
    from .train import main as train_main

    train_main(list(argv))
    return 0


def cmd_embed(args: argparse.Namespace) -> None:
    """Write embeddings (and labels, file names) of a data set to .npz (and .csv)."""
    emb, folder = _embed(args, args.split)
    out = Path(args.out or folder / f"embeddings-{args.split}.npz")
    emb.save_npz(out)
    if args.csv:
        emb.save_csv(args.csv)
    print(f"wrote {len(emb)} embeddings of width {emb.embeddings.shape[1]} to {out}"
          + (f" and {args.csv}" if args.csv else ""))


def cmd_evaluate(args: argparse.Namespace) -> None:
    """kNN, linear probe, clustering and retrieval scores (train split as memory, test split as queries)."""
    from .evaluate import evaluate, format_scores

    if args.train_embeddings and args.test_embeddings:
        train, test = _embeddings(args.train_embeddings), _embeddings(args.test_embeddings)
        folder = Path(args.test_embeddings).parent
    elif args.source:
        args.device = _device(args.device)
        backbone, recorded = load_backbone(args.source, args.arch, _layer(args.hidden_layer))
        folder = backbone.folder
        train_ds, test_ds = _split(args, recorded, "train", backbone), _split(args, recorded, "test", backbone)
        for split, ds in (("train", train_ds), ("test", test_ds)):
            if not _has_labels(ds):
                raise SystemExit(f"error: the {split} images of {args.data or recorded.get('data')} have no labels "
                                 "(no class subfolders), and evaluate scores how well embeddings predict labels; "
                                 "without labels, `wrapssl embed` them and use `wrapssl plot` (a map) or `wrapssl "
                                 "select` (what to label), or sort the images into one subfolder per class")
        train = _embed_with_progress(backbone, train_ds, args, "train split")
        test = _embed_with_progress(backbone, test_ds, args, "test split")
    else:
        raise SystemExit("error: pass SOURCE (a run folder or backbone) or both --train-embeddings and "
                         "--test-embeddings")
    print(f"scoring {len(test)} test embeddings against {len(train)} train embeddings: kNN, linear probe, "
          "k-means clustering, retrieval ...", file=sys.stderr)
    try:
        scores = evaluate(train, test, k=args.k, temperature=args.temperature)
        if args.baselines and args.source:
            rows = _baselines(args, backbone, recorded, train_ds, test_ds)
            rows["pretrained"] = {"knn": scores["knn_top1"], "linear": scores["linear_top1"]}
            scores["baselines"] = {name: rows[name] for name in ("raw_pixels", "random_init")}
            print(format_scores(rows, k=args.k, memory=int(scores["n_train"])), file=sys.stderr)
        if args.source and args.labels:
            from .budgets import parse_budgets, print_report, report
            result = report(train_ds, test_ds, parse_budgets(args.labels), backbone, draws=args.draws,
                            seed=int(recorded.get("seed") or 0), embeddings=(train, test),
                            image_size=args.image_size or backbone.info.image_size,
                            finetune_steps=args.finetune_steps, baselines=args.baselines,
                            log=lambda m: print(m, file=sys.stderr))
            if result is not None:
                scores["label_budgets"] = result
                print_report(result, len(test), log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(scores, indent=2)
    print(text)
    from .files import atomic_write_text
    out = Path(args.out or folder / "scores.json")
    if scores.get("label_budgets"):
        try:
            from . import plots
            plots.budget_curve(scores["label_budgets"], out.with_name("budget_curve.png"))
            print(f"wrote {out.with_name('budget_curve.png')}", file=sys.stderr)
        except ImportError as e:
            print(f"note: no budget_curve.png ({e})", file=sys.stderr)
    atomic_write_text(out, text)
    print(f"wrote {out}", file=sys.stderr)


def cmd_plot(args: argparse.Namespace) -> None:
    """A 2-D map of saved embeddings, coloured by label (or by cluster when unlabelled)."""
    from . import plots

    source = Path(args.embeddings)
    emb = _embeddings(source)
    labels = emb.labels if bool((emb.labels >= 0).any()) else None
    points = min(len(emb), args.max_points)
    print(f"projecting {points} of {len(emb)} points with {args.method}"
          + (" (t-SNE: about a minute per 5,000 points on a CPU)" if args.method == "tsne" else "") + " ...",
          file=sys.stderr)
    out = Path(args.out or source.with_name(source.stem + "-map.png"))
    path = plots.embedding_map(emb.embeddings, labels, out, method=args.method, max_points=args.max_points,
                               seed=args.seed, class_names=_class_names(args, source.parent))
    print(f"wrote {path}")


def cmd_select(args: argparse.Namespace) -> None:
    """A subset to label (typical, covering or diverse), picked against random where labels allow; near-duplicates."""
    from .files import atomic_write_text
    from .select import compare_with_random, near_duplicates, relative_threshold, select

    source = Path(args.embeddings)
    emb = _embeddings(source)
    if args.n > len(emb):
        raise SystemExit(f"error: -n {args.n} is more than the {len(emb)} items in {source}; pass -n {len(emb)} "
                         "or fewer")
    out = Path(args.out or source.with_name(source.stem + "-selection.csv"))
    try:
        chosen = select(emb.embeddings, args.n, method=args.method, weights=args.weights, seed=args.seed,
                        files=emb.files)
        if args.duplicates is not None:
            threshold = relative_threshold(emb.embeddings, args.duplicates, seed=args.seed)
            how = f"closer than {args.duplicates:g} x the median nearest-neighbour distance: cosine >= {threshold:.4f}"
        else:
            threshold, how = args.duplicate_cosine, f"cosine >= {args.duplicate_cosine}"
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    rows = ["rank,index,file"] + [f"{r},{int(i)},{f}" for r, (i, f) in
                                  enumerate(zip(chosen.indices.tolist(), chosen.files or []))]
    atomic_write_text(out, "\n".join(rows) + "\n")
    print(f"wrote {len(chosen.indices)} selected items to {out}")
    test_path = Path(args.test_embeddings) if args.test_embeddings else source.with_name("embeddings-test.npz")
    labelled = bool((emb.labels >= 0).all())
    if args.compare and labelled and test_path.is_file() and test_path.resolve() != source.resolve():
        test = _embeddings(test_path)
        try:
            result = compare_with_random(emb, test, args.n, method=args.method, draws=args.draws, seed=args.seed)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        result["test_embeddings"] = str(test_path)
        cmp_path = out.with_name(out.stem + "-vs-random.json")
        atomic_write_text(cmp_path, json.dumps(result, indent=2) + "\n")
        print(f"linear probe on {len(test)} test items, trained on the {args.n} picked: "
              f"{100 * result['picked']:.2f}%; on {args.n} random ({args.draws} draws): "
              f"{100 * result['random_mean']:.2f}% ({100 * result['random_min']:.2f}-"
              f"{100 * result['random_max']:.2f}%); gain {100 * result['gain']:+.2f} points; wrote {cmp_path}")
    elif args.test_embeddings and args.compare:
        why = ("it has no such file" if not test_path.is_file() else "the input has rows without labels"
               if not labelled else "it is the input itself")
        raise SystemExit(f"error: cannot score the picks against random on {test_path}: {why}; pass the labelled "
                         "test split written by `wrapssl embed RUN --split test`, or --no-compare")
    if threshold is not None:
        try:
            pairs, sims = near_duplicates(emb.embeddings, threshold=threshold)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        lines = ["file_a,file_b,cosine"] + [f"{emb.files[int(i)]},{emb.files[int(j)]},{float(s):.4f}"
                                            for (i, j), s in zip(pairs.tolist(), sims.tolist())]
        dup_path = out.with_name(out.stem + "-duplicates.csv")
        atomic_write_text(dup_path, "\n".join(lines) + "\n")
        print(f"wrote {len(lines) - 1} near-duplicate pairs ({how}) to {dup_path}")


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

    from .budgets import draw_labels, parse_budgets
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
        raise SystemExit(f"error: {cli_words(str(e))}") from None
    if _is_rank0() and result.test_accuracy is not None:
        print(f"test accuracy {100 * result.test_accuracy:.2f}% on {len(test)} images after {result.steps} steps "
              f"({result.seconds:.0f} s); wrote {out}/classifier.safetensors and finetune.json")


def _is_rank0() -> bool:
    """True on the process that speaks (rank 0 under accelerate launch or torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def _source_args(p: argparse.ArgumentParser) -> None:
    """Arguments of every subcommand that loads a backbone and a data set."""
    p.add_argument("--arch", help="architecture of a bare weights file (default: what the backbone's metadata, or "
                                  "an older run's metrics.json, says)")
    p.add_argument("--hidden-layer", help="layer to embed from (default: the run's, else the arch's default)")
    p.add_argument("--data", help="folder or named data set, e.g. fashion-mnist (default: the run's own data)")
    p.add_argument("--data-root", help="folder holding a named data set's files (default: the run's)")
    p.add_argument("--image-size", type=positive_int_arg,
                   help="resize images to this (default: the run's image size)")


def cmd_shards(args: argparse.Namespace) -> None:
    """Write tar shards (an image, a .cls label where there is one) from a folder or a built-in data set."""
    from .data import load_dataset
    from .shards import reading_pattern, write_shards

    try:
        source = load_dataset(args.source, root=args.data_root, split=args.split)
        paths = write_shards(source, args.out_pattern, args.per_shard, progress=True)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {len(source)} images in {len(paths)} shards; train on them with:\n  wrapssl train --data "
          f"'{reading_pattern(args.out_pattern, len(paths))}'")


def _backbone_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the subcommands that embed a data set with a backbone."""
    _source_args(p)
    p.add_argument("--limit", type=positive_int_arg, help="embed only the first N images (default: all)")
    p.add_argument("--batch-size", type=positive_int_arg, default=256,
                   help="images per forward pass; lower it if memory is short")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _select_names(wanted: str | None) -> tuple[Sequence[str], str | None]:
    """``wrapssl.select``'s method names and default, read (loading torch) only when ``wanted`` may be select."""
    if wanted not in (None, "select"):
        return (), None  # the select subcommand is not parsed: its choices do not matter
    from .select import DEFAULT_METHOD, METHODS
    return METHODS, DEFAULT_METHOD


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``wrapssl`` command; ``wanted``: the subcommand about to be parsed, if known
    (the others then skip what is costly to build, so that `wrapssl --help` stays light)."""
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

    methods, default_method = _select_names(wanted)
    p = command("select", "pick images to label (better than random at small budgets); find near-duplicates",
                cmd_select)
    p.add_argument("embeddings", help=".npz written by 'wrapssl embed'")
    p.add_argument("-n", type=positive_int_arg, required=True, help="how many items to select (required)")
    p.add_argument("--method", choices=methods, default=default_method,
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
    args = build_parser(argv[0] if argv else "").parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
