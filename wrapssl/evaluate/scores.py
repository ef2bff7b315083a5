"""A representation's scores in the report's rows, beside the trivial baselines (raw pixels, random init).

One protocol (kNN with all labelled training rows as memory, and a linear probe); ``evaluate`` gives all
scores of ``wrapssl evaluate``; ``format_scores`` prints the rows as a table.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..checks import positive_int

from .embeddings import Embeddings, _split_batch, embed_dataset
from .metrics import cluster_scores, knn_accuracy, linear_probe, retrieval_scores


def _labelled(e: Embeddings, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``e`` whose label is known."""
    if not isinstance(e, Embeddings):
        raise TypeError(f"{name} must be an Embeddings (from embed_dataset or Embeddings.load_npz), "
                        f"got {type(e).__name__}")
    keep = e.labels >= 0
    if not bool(keep.any()):
        raise ValueError(f"{name} has no labelled rows (all labels are -1); evaluation needs labels for "
                         "both the train and the test embeddings")
    return e.embeddings[keep], e.labels[keep]


def evaluate(train: Embeddings, test: Embeddings, k: int = 200, temperature: float = 0.1,
             probe_epochs: int = 100, weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """kNN and linear-probe accuracy (train → test), clustering and retrieval scores of test.

    Rows with label -1 are left out. Keys: knn_top1, linear_top1, nmi, ami,
    precision_at_1, map_at_r, n_train, n_test.
    """
    x, y = _labelled(train, "train")
    xt, yt = _labelled(test, "test")
    c = int(max(y.max(), yt.max())) + 1
    scores = {
        "knn_top1": knn_accuracy(x, y, xt, yt, k=k, temperature=temperature, num_classes=c),
        "linear_top1": linear_probe(x, y, xt, yt, epochs=probe_epochs, weight_decay=weight_decay, num_classes=c),
    }
    clusters = cluster_scores(xt, yt, seed=seed)
    scores.update(nmi=clusters["nmi"], ami=clusters["ami"])
    scores.update(retrieval_scores(xt, yt))
    scores.update(n_train=float(len(y)), n_test=float(len(yt)))
    return scores


def raw_pixels(dataset: Dataset, image_size: int | None = None, batch_size: int = 1024) -> Embeddings:
    """The trivial baseline's embeddings: each image at ``image_size`` (the net's input size), flattened.

    Pixels are scaled to [0, 1] (uint8 / 255) and resized as the Learner resizes its inputs
    (antialiased bilinear); ``None`` keeps the dataset's size. A representation that does not beat
    these vectors on the same protocol has not learned anything a user can use.
    """
    from ..augment import resize

    if image_size is not None:
        positive_int(image_size, "image_size")
    loader = DataLoader(dataset, batch_size=positive_int(batch_size, "batch_size"), shuffle=False)
    chunks, labels = [], []
    for batch in loader:
        images, y = _split_batch(batch)
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        if image_size is not None:
            x = resize(x, image_size)
        chunks.append(x.flatten(1))
        labels.append(y)
    if not chunks:
        raise ValueError("the dataset is empty; nothing to embed")
    emb = torch.cat(chunks)
    files = getattr(dataset, "files", None)
    files = list(files) if files is not None and len(files) == len(emb) else [str(i) for i in range(len(emb))]
    return Embeddings(emb, torch.cat(labels), files)


def probe_scores(train: Embeddings, test: Embeddings, k: int = 200, temperature: float = 0.1,
                 linear: bool = True) -> dict[str, float]:
    """The report's protocol: top-1 of the kNN classifier (all labelled ``train`` rows as its memory) and of
    a linear probe, on the labelled ``test`` rows. Keys ``knn`` and (when ``linear``) ``linear``."""
    x, y = _labelled(train, "train")
    xt, yt = _labelled(test, "test")
    c = int(max(y.max(), yt.max())) + 1
    out = {"knn": knn_accuracy(x, y, xt, yt, k=k, temperature=temperature, num_classes=c)}
    if linear:
        out["linear"] = linear_probe(x, y, xt, yt, num_classes=c)
    return out


def baseline_scores(memory: Dataset, queries: Dataset, image_size: int | None = None,
                    random_init: Any = None, k: int = 200, temperature: float = 0.1, linear: bool = True,
                    batch_size: int = 512, device: str | torch.device | None = None,
                    hidden_layer: Any = -1) -> dict[str, dict[str, float]]:
    """Scores of the trivial baselines on the report's protocol: ``raw_pixels`` and, when a randomly
    initialised model is given, ``random_init`` (a Learner, or a plain net cut at ``hidden_layer``,
    as in ``embed_dataset``)."""
    rows = {"raw_pixels": probe_scores(raw_pixels(memory, image_size), raw_pixels(queries, image_size),
                                       k, temperature, linear)}
    if random_init is not None:
        a = embed_dataset(random_init, memory, batch_size, device, hidden_layer=hidden_layer)
        b = embed_dataset(random_init, queries, batch_size, device, hidden_layer=hidden_layer)
        rows["random_init"] = probe_scores(a, b, k, temperature, linear)
    return rows


ROW_NAMES = {"raw_pixels": "raw pixels", "random_init": "random init", "pretrained": "pretrained"}


def format_scores(rows: dict[str, dict[str, float]], k: int = 200, memory: int | None = None) -> str:
    """The scores of each row (model) as an aligned text table, in percent; rows in the given order."""
    columns = [c for c in ("knn", "linear") if any(c in r for r in rows.values())]
    mem = f", {memory} memory" if memory is not None else ""
    heads = {"knn": f"kNN (k={k}{mem})", "linear": "linear probe"}
    width = max(len(ROW_NAMES.get(n, n)) for n in rows)
    lines = [" " * width + "".join(f"  {heads[c]:>{max(len(heads[c]), 8)}}" for c in columns)]
    for name, row in rows.items():
        cells = "".join(f"  {(f'{100 * row[c]:.2f}%' if c in row else '-'):>{max(len(heads[c]), 8)}}"
                        for c in columns)
        lines.append(f"{ROW_NAMES.get(name, name):<{width}}{cells}")
    return "\n".join(lines)
