"""The ``wrapssl`` command: embed, evaluate, plot and select over a pretrained backbone."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .hidden import LayerSpec

DESCRIPTION = """Use what a wrapssl run learned. SOURCE is a run folder written by train.py
(backbone.pt + metrics.json), a backbone.pt (give --arch unless metrics.json sits beside it)
or a Trainer checkpoint-N.pt."""


def _layer(text: str | None) -> LayerSpec | None:
    """A hidden layer from the command line: an int index or a dotted name."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _run_args(folder: Path) -> dict[str, Any]:
    """The train.py arguments recorded in a run folder's metrics.json (empty if none)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("args", {})


def _net_state(source: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The net's state_dict from a run folder, a backbone.pt or a Trainer checkpoint, and its folder."""
    if source.is_dir():
        source = source / "backbone.pt"
    if not source.is_file():
        raise SystemExit(f"error: {source} not found; pass a run folder (with backbone.pt), a backbone.pt "
                         "or a checkpoint-N.pt")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {source} is not a readable torch file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and state.get("format") == "wrapssl.trainer":
        prefix = "encoder.net."  # the Learner keeps the user's net under encoder.net
        state = {k[len(prefix):]: v for k, v in state["learner"].items() if k.startswith(prefix)}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: {source} holds no state_dict of a net")
    return state, source.parent


def _channels_and_classes(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Input channels (first conv/patch weight) and classes (last 2-D weight) of a saved net."""
    convs = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 4]
    linears = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return (int(convs[0].shape[1]) if convs else 3), (int(linears[-1].shape[0]) if linears else 10)


def load_backbone(source: str | os.PathLike, arch: str | None = None, hidden_layer: LayerSpec | None = None
                  ) -> tuple[nn.Module, LayerSpec, dict[str, Any]]:
    """(net with the saved weights, its hidden layer, the run's recorded train.py arguments)."""
    from .archs import build_arch

    state, folder = _net_state(Path(source))
    recorded = _run_args(folder)
    arch = arch or recorded.get("arch")
    if not arch:
        raise SystemExit(f"error: no metrics.json beside {source} says which architecture this is; pass --arch "
                         "(e.g. --arch small_resnet or --arch resnet18)")
    channels, classes = _channels_and_classes(state)
    net, default_layer = build_arch(arch, channels=channels, num_classes=classes,
                                    image_size=recorded.get("image_size"))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"error: the weights in {source} do not fit arch {arch!r}: {e}") from None
    layer = hidden_layer if hidden_layer is not None else _layer(recorded.get("hidden_layer")) or default_layer
    return net, layer, recorded


def _dataset(spec: str | None, recorded: dict[str, Any], split: str, image_size: int | None, root: str | None):
    """The data to embed: --data, else the run's own data set."""
    from .data import FASHION_MNIST_DIR, load_dataset

    spec = spec or recorded.get("data")
    if not spec:
        raise SystemExit("error: pass --data (a folder, 'fashion-mnist' or 'digits')")
    size = image_size or recorded.get("image_size")
    try:
        return load_dataset(spec, size, train=split == "train", root=root or recorded.get("data_root") or
                            FASHION_MNIST_DIR)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def _embed(args: argparse.Namespace, split: str):
    """Embeddings of one split of the data with the loaded backbone."""
    from .evaluate import embed_dataset

    net, layer, recorded = load_backbone(args.source, args.arch, _layer(args.hidden_layer))
    ds = _dataset(args.data, recorded, split, args.image_size, args.data_root)
    if args.limit:
        from torch.utils.data import Subset
        files = getattr(ds, "files", None)
        ds_limited = Subset(ds, range(min(args.limit, len(ds))))
        if files is not None:
            ds_limited.files = files[:len(ds_limited)]
        ds = ds_limited
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return embed_dataset(net.to(device), ds, batch_size=args.batch_size, device=device, hidden_layer=layer)


def cmd_embed(args: argparse.Namespace) -> None:
    """Write embeddings (and labels, file names) of a data set to .npz (and .csv)."""
    emb = _embed(args, args.split)
    emb.save_npz(args.out)
    if args.csv:
        emb.save_csv(args.csv)
    print(f"wrote {len(emb)} embeddings of width {emb.embeddings.shape[1]} to {args.out}"
          + (f" and {args.csv}" if args.csv else ""))


def cmd_evaluate(args: argparse.Namespace) -> None:
    """kNN, linear probe, clustering and retrieval scores (train split as memory, test split as queries)."""
    from .evaluate import Embeddings, evaluate

    if args.train_embeddings and args.test_embeddings:
        train, test = Embeddings.load_npz(args.train_embeddings), Embeddings.load_npz(args.test_embeddings)
    elif args.source:
        train, test = _embed(args, "train"), _embed(args, "test")
    else:
        raise SystemExit("error: pass SOURCE (a run folder or backbone) or both --train-embeddings and "
                         "--test-embeddings")
    try:
        scores = evaluate(train, test, k=args.k, temperature=args.temperature)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(scores, indent=2)
    print(text)
    if args.out:
        from .files import atomic_write_text
        atomic_write_text(args.out, text)


def cmd_plot(args: argparse.Namespace) -> None:
    """A 2-D map of saved embeddings, coloured by label (or by cluster when unlabelled)."""
    from . import plots
    from .evaluate import Embeddings

    emb = Embeddings.load_npz(args.embeddings)
    labels = emb.labels if bool((emb.labels >= 0).any()) else None
    path = plots.embedding_map(emb.embeddings, labels, args.out, method=args.method, max_points=args.max_points,
                               seed=args.seed)
    print(f"wrote {path}")


def cmd_select(args: argparse.Namespace) -> None:
    """A diverse subset to label (k-center greedy) and, optionally, near-duplicate pairs."""
    from .evaluate import Embeddings
    from .select import near_duplicates, select
    from .files import atomic_write_text

    emb = Embeddings.load_npz(args.embeddings)
    try:
        chosen = select(emb.embeddings, args.n, method=args.method, weights=args.weights, seed=args.seed,
                        files=emb.files)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    rows = ["rank,index,file"] + [f"{r},{int(i)},{f}" for r, (i, f) in
                                  enumerate(zip(chosen.indices.tolist(), chosen.files or []))]
    atomic_write_text(args.out, "\n".join(rows) + "\n")
    print(f"wrote {len(chosen.indices)} selected items to {args.out}")
    if args.duplicates is not None:
        result = near_duplicates(emb.embeddings, threshold=args.duplicates)
        pairs, sims = result[0], result[1]
        lines = ["file_a,file_b,cosine"] + [f"{emb.files[int(i)]},{emb.files[int(j)]},{float(s):.4f}"
                                            for (i, j), s in zip(pairs.tolist(), sims.tolist())]
        dup_path = Path(args.out).with_name(Path(args.out).stem + "-duplicates.csv")
        atomic_write_text(dup_path, "\n".join(lines) + "\n")
        print(f"wrote {len(lines) - 1} near-duplicate pairs (cosine >= {args.duplicates}) to {dup_path}")


def _backbone_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the subcommands that load a backbone and a data set."""
    p.add_argument("--arch", help="architecture of a bare backbone.pt (default: the run's own, from metrics.json)")
    p.add_argument("--hidden-layer", help="layer to embed from (default: the run's, else the arch's default)")
    p.add_argument("--data", help="folder, 'fashion-mnist' or 'digits' (default: the run's own data)")
    p.add_argument("--data-root", help="folder holding the Fashion-MNIST IDX files")
    p.add_argument("--image-size", type=int, help="resize images to this (default: the run's image size)")
    p.add_argument("--limit", type=int, help="embed only the first N images (quick looks)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass; lower it if memory is short")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``wrapssl`` command."""
    parser = argparse.ArgumentParser(prog="wrapssl", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed a data set with a pretrained backbone",
                       description=cmd_embed.__doc__)
    p.add_argument("source", help="run folder, backbone.pt or checkpoint-N.pt")
    _backbone_args(p)
    p.add_argument("--split", choices=["train", "test"], default="test", help="which split of a built-in data set")
    p.add_argument("--out", default="embeddings.npz", help="output .npz (embeddings, labels, files)")
    p.add_argument("--csv", help="also write a CSV: file,label,e0..eD-1")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("evaluate", help="kNN / linear probe / clustering / retrieval scores",
                       description=cmd_evaluate.__doc__)
    p.add_argument("source", nargs="?", help="run folder, backbone.pt or checkpoint-N.pt")
    _backbone_args(p)
    p.add_argument("--train-embeddings", help="saved train embeddings (.npz), instead of SOURCE")
    p.add_argument("--test-embeddings", help="saved test embeddings (.npz), instead of SOURCE")
    p.add_argument("-k", type=int, default=200, help="kNN neighbours (200 as in InstDisc/DINO; 20 for tiny sets)")
    p.add_argument("--temperature", type=float, default=0.1, help="kNN vote temperature; lower = sharper votes")
    p.add_argument("--out", help="also write the scores as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="2-D map of saved embeddings", description=cmd_plot.__doc__)
    p.add_argument("embeddings", help=".npz written by 'wrapssl embed'")
    p.add_argument("--out", default="embedding_map.png", help="output PNG")
    p.add_argument("--method", choices=["tsne", "pca", "umap"], default="tsne",
                   help="tsne (scikit-learn; slow above ~10k points), pca (fast, linear), umap (needs umap-learn)")
    p.add_argument("--max-points", type=int, default=5000, help="subsample to this many points")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("select", help="pick a diverse subset to label; find near-duplicates",
                       description=cmd_select.__doc__)
    p.add_argument("embeddings", help=".npz written by 'wrapssl embed'")
    p.add_argument("-n", type=int, required=True, help="how many items to select")
    p.add_argument("--method", choices=["kcenter", "random"], default="kcenter",
                   help="kcenter covers the embedding space (coreset); random is the baseline")
    p.add_argument("--weights", choices=["density", "uncertainty"],
                   help="density avoids outliers; uncertainty favours items between clusters")
    p.add_argument("--duplicates", type=float, metavar="COSINE",
                   help="also list pairs with cosine similarity >= this (0.95-0.99 finds near-copies)")
    p.add_argument("--out", default="selection.csv", help="output CSV: rank,index,file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_select)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wrapssl`` console script."""
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
