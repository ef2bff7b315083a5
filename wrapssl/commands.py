"""What `wrapssl embed`, `evaluate`, `plot`, `select` and `shards` do: a run's backbone over a data set, and
what its embeddings tell (scores beside the baselines, a map, what to label, near-duplicates).

No torch at import (cli.py builds its parser from here for `wrapssl --help`); each command loads what it needs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .encoder import LayerSpec

EMBED_CHUNK = 4096  # images per progress-bar tick when embedding


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
        raise SystemExit(f"error: {e}") from None
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
        raise SystemExit(f"error: {e}") from None


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
    """Raw pixels and the randomly initialised net (the run's seed), scored as the backbone is (the app's rows:
    the raw pixels by the same helper; the random init rebuilt from the seed the app's net started from)."""
    from .backbone import random_init
    from .evaluate import baseline_scores, probe_scores

    size = args.image_size or backbone.info.image_size
    print("scoring the baselines: raw pixels ...", file=sys.stderr)
    rows = baseline_scores(train_ds, test_ds, size, k=args.k, temperature=args.temperature)
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
            from .evaluate.budgets import parse_budgets, print_report, report
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

def cmd_shards(args: argparse.Namespace) -> None:
    """Write tar shards (an image, a .cls label where there is one) from a folder or a built-in data set."""
    from .data import load_dataset
    from .data.shard_writer import reading_pattern, write_shards

    try:
        source = load_dataset(args.source, root=args.data_root, split=args.split)
        paths = write_shards(source, args.out_pattern, args.per_shard, progress=True)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {len(source)} images in {len(paths)} shards; train on them with:\n  wrapssl train --data "
          f"'{reading_pattern(args.out_pattern, len(paths))}'")
