"""Judge and export learned representations: embeddings, kNN, linear probe, clustering, retrieval.

Every metric is computed in torch/NumPy; scikit-learn is only needed by the tests.
All similarity-based metrics work in cosine geometry (rows are L2-normalised first).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checks import positive_int
from .files import atomic_open

__all__ = [
    "Embeddings", "embed_dataset", "knn_predict", "knn_accuracy", "linear_probe", "linear_probe_cv", "kmeans",
    "raw_pixels", "probe_scores", "baseline_scores", "format_scores",
    "normalized_mutual_info", "adjusted_mutual_info", "cluster_scores", "retrieval_scores", "evaluate",
]


# ----------------------------------------------------------------------------- export

@dataclass
class Embeddings:
    """Embeddings (N, D) float32 of a dataset with labels (N,) long (-1 = unknown) and file names."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    files: list[str]

    def __post_init__(self) -> None:
        self.embeddings = torch.as_tensor(self.embeddings).detach().float()
        self.labels = torch.as_tensor(self.labels).detach().long()
        self.files = [str(f) for f in self.files]
        if self.embeddings.ndim != 2:
            raise ValueError(f"embeddings must have shape (N, D), got {tuple(self.embeddings.shape)}")
        n = self.embeddings.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match the embeddings, got {tuple(self.labels.shape)}")
        if len(self.files) != n:
            raise ValueError(f"files must hold one name per embedding ({n}), got {len(self.files)}")

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write ``embeddings``, ``labels`` and ``files`` to an .npz file atomically."""
        with atomic_open(path, "wb") as f:
            np.savez(f, embeddings=self.embeddings.cpu().numpy(), labels=self.labels.cpu().numpy(),
                     files=np.asarray(self.files, dtype=str))

    def save_csv(self, path: str | os.PathLike) -> None:
        """Write a CSV with columns file, label, e0..e{D-1} atomically."""
        emb = self.embeddings.cpu().numpy()
        labels = self.labels.cpu().tolist()
        with atomic_open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label", *(f"e{i}" for i in range(emb.shape[1]))])
            for name, label, row in zip(self.files, labels, emb):
                # 9 significant digits round-trip float32 exactly
                writer.writerow([name, label, *(f"{v:.9g}" for v in row.tolist())])

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "Embeddings":
        """Read embeddings written by ``save_npz``."""
        with np.load(path, allow_pickle=False) as z:
            missing = {"embeddings", "labels", "files"} - set(z.files)
            if missing:
                raise ValueError(f"{os.fspath(path)} lacks {sorted(missing)}; was it written by Embeddings.save_npz?")
            return cls(torch.from_numpy(z["embeddings"].copy()), torch.from_numpy(z["labels"].copy()),
                       z["files"].tolist())


def _model_device(model: Any) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _plain_embedder(net: nn.Module, hidden_layer: Any, device: torch.device
                    ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """An images → (B, D) function for a plain net; eval mode inside, every module's flag restored after."""
    from .augment import normalization, to_float
    from .hidden import Encoder, eval_mode, input_channels

    encoder = Encoder(net, hidden_layer)
    channels = input_channels(net)
    normalize = normalization(channels).to(device)  # what a Learner trains such a net with
    try:
        with eval_mode(net):
            yield lambda images: encoder(normalize(to_float(images, channels)))
    finally:
        encoder.close()


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a collated batch; labels are -1 when the dataset gives none."""
    if isinstance(batch, torch.Tensor):
        return batch, torch.full((batch.shape[0],), -1, dtype=torch.long)
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], torch.as_tensor(batch[1]).long().view(-1)
    raise TypeError("dataset items must be (image, label) with image a (C,H,W) tensor and label an int "
                    f"(-1 = unknown); the loader produced {type(batch).__name__}")


def embed_dataset(model: Any, dataset: Dataset, batch_size: int = 256, device: str | torch.device | None = None,
                  num_workers: int = 0, hidden_layer: Any = -1) -> Embeddings:
    """Embed every item of ``dataset`` in order with a Learner (``.embed``) or a plain net.

    A plain ``nn.Module`` is cut at ``hidden_layer`` (as in ``Learner``), fed
    float images normalised as a Learner would (ImageNet statistics; their
    grey mean for a net whose first conv takes 1 channel), and run in eval mode without
    gradients; the train/eval flag of every submodule is restored afterwards.
    ``hidden_layer`` applies to a plain net only. ``device`` is where batches
    are sent (default: the model's device); the model itself is never moved.
    File names come from ``dataset.files`` when it exists, else they are the
    item indices as strings.
    """
    positive_int(batch_size, "batch_size")
    if not (callable(getattr(model, "embed", None)) or isinstance(model, nn.Module)):
        raise TypeError(f"model must be a wrapssl Learner (with .embed) or an nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else _model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if callable(getattr(model, "embed", None)):
        embedder: contextlib.AbstractContextManager = contextlib.nullcontext(model.embed)
    else:
        embedder = _plain_embedder(model, hidden_layer, device)
    chunks, labels = [], []
    with embedder as embed, torch.no_grad():
        for batch in loader:
            images, y = _split_batch(batch)
            z = embed(images.to(device, non_blocking=True))
            if z.ndim != 2 or z.shape[0] != images.shape[0]:
                raise ValueError(f"the model gave embeddings of shape {tuple(z.shape)} for {images.shape[0]} "
                                 "images; it must return (B, D): pick a pooled hidden_layer")
            chunks.append(z.detach().float().cpu())
            labels.append(y)
    if not chunks:
        raise ValueError("the dataset is empty; nothing to embed")
    emb = torch.cat(chunks)
    files = getattr(dataset, "files", None)
    if files is None:
        files = [str(i) for i in range(len(emb))]
    elif len(files) != len(emb):
        raise ValueError(f"dataset.files has {len(files)} names but the dataset gave {len(emb)} items; "
                         "make .files match the items or remove it")
    return Embeddings(emb, torch.cat(labels), list(files))


# ----------------------------------------------------------------------------- input checks

def _as_matrix(x: Any, name: str) -> torch.Tensor:
    """A finite float32 (N, D) tensor, or a ValueError saying what is wrong."""
    x = torch.as_tensor(x).detach()
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; check the model's output (e.g. a diverged run)")
    return x


def _as_labels(y: Any, n: int, name: str, allow_unknown: bool = False) -> torch.Tensor:
    """A long (N,) label tensor of length ``n``, or a ValueError."""
    y = torch.as_tensor(y).detach()
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class ids, got dtype {y.dtype}")
    y = y.long()
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match its embeddings, got {tuple(y.shape)}")
    lowest = -1 if allow_unknown else 0
    if n and int(y.min()) < lowest:
        hint = ("; keep labelled rows only, e.g. emb[labels >= 0], labels[labels >= 0]"
                if int(y.min()) == -1 else "")
        raise ValueError(f"{name} must be class ids >= {lowest}, found {int(y.min())}{hint}")
    return y


def _as_pair(emb: Any, labels: Any, prefix: str = "", allow_unknown: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (embeddings, labels) with at least one row; ``prefix`` names them in errors."""
    x = _as_matrix(emb, f"{prefix}emb")
    if x.shape[0] == 0:
        raise ValueError(f"{prefix}emb is empty; at least one row is needed")
    return x, _as_labels(labels, x.shape[0], f"{prefix}labels", allow_unknown).to(x.device)


def _num_classes(num_classes: int | None, *labels: torch.Tensor) -> int:
    """``num_classes`` checked against the labels, or one more than the largest label."""
    top = max(int(y.max()) for y in labels) + 1
    if num_classes is None:
        return top
    if num_classes < top:
        raise ValueError(f"num_classes={num_classes} but a label is {top - 1}; pass num_classes >= {top} or None")
    return num_classes


# ----------------------------------------------------------------------------- kNN

def knn_predict(train_emb: Any, train_labels: Any, test_emb: Any, k: int = 200, temperature: float = 0.1,
                num_classes: int | None = None, batch_size: int = 512) -> torch.Tensor:
    """Class of each test row by the weighted vote of its k most cosine-similar train rows.

    Each neighbour votes for its label with weight exp(similarity / temperature)
    (InstDisc, DINO). ``k`` larger than the train set is clamped to its size.
    Test rows are processed ``batch_size`` at a time, so memory is
    batch_size × N_train similarities.
    """
    x, y = _as_pair(train_emb, train_labels, "train_")
    q = _as_matrix(test_emb, "test_emb").to(x.device)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"train_emb has {x.shape[1]} dims but test_emb has {q.shape[1]}; "
                         "embed both with the same model")
    k = min(positive_int(k, "k"), x.shape[0])
    batch_size = positive_int(batch_size, "batch_size")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; 0.07-0.1 is usual")
    c = _num_classes(num_classes, y)
    x = F.normalize(x, dim=1)
    preds = []
    for start in range(0, q.shape[0], batch_size):
        sims, idx = (F.normalize(q[start:start + batch_size], dim=1) @ x.T).topk(k, dim=1)
        # subtracting the row max changes no argmax but keeps exp() finite for small temperatures
        weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = torch.zeros(sims.shape[0], c, device=x.device).scatter_add_(1, y[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)


def knn_accuracy(train_emb: Any, train_labels: Any, test_emb: Any, test_labels: Any, k: int = 200,
                 temperature: float = 0.1, num_classes: int | None = None, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of the weighted cosine kNN classifier (see ``knn_predict``)."""
    q, yq = _as_pair(test_emb, test_labels, "test_")
    pred = knn_predict(train_emb, train_labels, q, k, temperature, num_classes, batch_size)
    return (pred.cpu() == yq.cpu()).float().mean().item()


# ----------------------------------------------------------------------------- linear probe

def linear_probe(train_emb: Any, train_labels: Any, test_emb: Any, test_labels: Any, epochs: int = 100,
                 lr: float = 1.0, weight_decay: float = 1e-4, num_classes: int | None = None) -> float:
    """Top-1 test accuracy of multinomial logistic regression on frozen, standardised features.

    Full-batch L-BFGS (``epochs`` iterations, step size ``lr``) from zero
    weights minimises mean cross-entropy + weight_decay/2 · ||W||² (bias not
    penalised), i.e. scikit-learn's LogisticRegression with C = 1/(weight_decay·N).
    Full batch needs no shuffling, so the result is deterministic.
    """
    x, y = _as_pair(train_emb, train_labels, "train_")
    xt, yt = _as_pair(test_emb, test_labels, "test_")
    if xt.shape[1] != x.shape[1]:
        raise ValueError(f"train_emb has {x.shape[1]} dims but test_emb has {xt.shape[1]}; "
                         "embed both with the same model")
    xt, yt = xt.to(x.device), yt.to(x.device)
    c = _num_classes(num_classes, y, yt)
    w, b, mean, std = fit_logistic(x, y, c, weight_decay, epochs, lr)
    with torch.no_grad():
        pred = (((xt - mean) / std) @ w + b).argmax(dim=1)
    return (pred == yt).float().mean().item()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                 iterations: int = 100, lr: float = 1.0) -> tuple[torch.Tensor, ...]:
    """(w, b, mean, std) of the multinomial logistic regression ``logits = ((x - mean) / std) @ w + b``.

    Full-batch L-BFGS from zero weights on standardised features minimises mean cross-entropy +
    weight_decay/2 · ||w||² (bias not penalised); deterministic. ``linear_probe`` scores it.
    """
    iterations = positive_int(iterations, "epochs")
    if not lr > 0 or weight_decay < 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    x = x.detach().float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)  # constant features stay finite
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=lr, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


# ----------------------------------------------------------------------------- clustering

def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, K) between rows of x and rows of c."""
    return (x.square().sum(1, keepdim=True) - 2 * x @ c.T + c.square().sum(1)).clamp_min_(0)


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centre and the squared distance to it, for every row of x."""
    rows = max(1, chunk // max(1, c.shape[0]))  # bound the (rows, K) distance block
    idx, d2 = [], []
    for start in range(0, x.shape[0], rows):
        d, i = _sq_dists(x[start:start + rows], c).min(dim=1)
        idx.append(i)
        d2.append(d)
    return torch.cat(idx), torch.cat(d2)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: each new centre is the best of a few D²-weighted candidates."""
    n = x.shape[0]
    tries = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = _sq_dists(x, x[first:first + 1])[:, 0]
    for _ in range(1, k):
        weights = d2.cpu().double()
        if weights.sum() <= 0:  # every point already sits on a centre: any choice is as good
            weights = torch.ones_like(weights)
        cand = torch.multinomial(weights, tries, replacement=True, generator=gen).to(x.device)
        new_d2 = torch.minimum(d2[:, None], _sq_dists(x, x[cand]))
        best = int(new_d2.sum(0).argmin())
        centres.append(x[cand[best]])
        d2 = new_d2[:, best]
    return torch.stack(centres)


def kmeans(x: Any, n_clusters: int, seed: int = 0, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (K, D) and assignment (N,) of k-means (k-means++ seeding, Lloyd steps to a fixed point)."""
    x = _as_matrix(x, "x")
    n_clusters = positive_int(n_clusters, "n_clusters")
    if n_clusters > x.shape[0]:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of points ({x.shape[0]})")
    gen = torch.Generator().manual_seed(seed)
    centres = _kmeans_pp(x, n_clusters, gen)
    assign, d2 = _nearest(x, centres)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):  # an empty cluster restarts at the points worst served by the others
            centres[empty] = x[d2.topk(len(empty)).indices]
        new_assign, d2 = _nearest(x, centres)
        if torch.equal(new_assign, assign):  # same assignment ⇒ same centres: Lloyd has converged
            break
        assign = new_assign
    return centres, assign


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts n_ij of items with label i in ``a`` and label j in ``b``."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    na, nb = ai.max() + 1, bi.max() + 1
    return np.bincount(ai.ravel() * nb + bi.ravel(), minlength=na * nb).reshape(na, nb)


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a distribution given by counts."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mutual_info(table: np.ndarray) -> float:
    """Mutual information (nats) of a contingency table."""
    n = table.sum()
    i, j = table.nonzero()
    nij = table[i, j].astype(np.float64)
    a, b = table.sum(1)[i].astype(np.float64), table.sum(0)[j].astype(np.float64)
    return float(max(0.0, (nij / n * np.log(n * nij / (a * b))).sum()))


def _expected_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """E[MI] of two random labelings with cluster sizes a and b (hypergeometric model, Vinh et al. 2010)."""
    n = int(a.sum())
    lf = np.array([math.lgamma(m + 1) for m in range(n + 1)])  # log m!
    b = b.astype(np.int64)
    emi = 0.0
    for ai in a.astype(np.int64):
        lo, hi = np.maximum(1, ai + b - n), np.minimum(ai, b)
        lengths = np.maximum(hi - lo + 1, 0)
        total = int(lengths.sum())
        if total == 0:
            continue
        # every (j, n_ij) with n_ij in [lo_j, hi_j], flattened so one row of the table is one NumPy pass
        bj = np.repeat(b, lengths)
        nij = np.repeat(lo, lengths) + np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        log_p = (lf[ai] + lf[bj] + lf[n - ai] + lf[n - bj] - lf[n]
                 - lf[nij] - lf[ai - nij] - lf[bj - nij] - lf[n - ai - bj + nij])
        emi += float((nij / n * np.log(n * nij / (ai * bj.astype(np.float64))) * np.exp(log_p)).sum())
    return emi


def _label_arrays(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two equal-length 1-D NumPy label arrays."""
    a = np.asarray(torch.as_tensor(labels_true).cpu()).ravel()
    b = np.asarray(torch.as_tensor(labels_pred).cpu()).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"the two labelings must be non-empty and equally long, got {a.size} and {b.size}")
    return a, b


def normalized_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """NMI = MI / mean(H(true), H(pred)) (arithmetic mean, scikit-learn's default)."""
    table = _contingency(*_label_arrays(labels_true, labels_pred))
    if table.shape == (1, 1):  # neither labeling splits the data: they agree perfectly
        return 1.0
    mi = _mutual_info(table)
    if mi == 0:
        return 0.0
    return mi / max(0.5 * (_entropy(table.sum(1)) + _entropy(table.sum(0))), np.finfo(np.float64).eps)


def adjusted_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """AMI = (MI - E[MI]) / (mean(H(true), H(pred)) - E[MI]), 1 for identical partitions, ~0 for random ones."""
    table = _contingency(*_label_arrays(labels_true, labels_pred))
    if table.shape[0] == table.shape[1] and (np.count_nonzero(table, axis=1) == 1).all() \
            and (np.count_nonzero(table, axis=0) == 1).all():
        return 1.0  # identical up to renaming; also covers the 0/0 of all-singleton labelings
    mi = _mutual_info(table)
    emi = _expected_mutual_info(table.sum(1), table.sum(0))
    denom = 0.5 * (_entropy(table.sum(1)) + _entropy(table.sum(0))) - emi
    eps = np.finfo(np.float64).eps
    denom = min(denom, -eps) if denom < 0 else max(denom, eps)
    return float((mi - emi) / denom)


def cluster_scores(emb: Any, labels: Any, n_clusters: int | None = None, seed: int = 0) -> dict[str, float]:
    """NMI and AMI between labels and k-means clusters of the L2-normalised embeddings.

    All rows are clustered; the scores use the rows whose label is known
    (>= 0). ``n_clusters`` defaults to the number of distinct known labels.
    """
    x, y = _as_pair(emb, labels, allow_unknown=True)
    known = y >= 0
    if not bool(known.any()):
        raise ValueError("every label is -1 (unknown); clustering scores need some labelled rows")
    if n_clusters is None:
        n_clusters = int(torch.unique(y[known]).numel())
    _, assign = kmeans(F.normalize(x, dim=1), n_clusters, seed=seed)
    truth, found = y[known].cpu(), assign[known].cpu()
    return {"nmi": normalized_mutual_info(truth, found), "ami": adjusted_mutual_info(truth, found),
            "n_clusters": float(n_clusters)}


# ----------------------------------------------------------------------------- retrieval

def retrieval_scores(emb: Any, labels: Any, batch_size: int = 256) -> dict[str, float]:
    """Precision@1 and MAP@R of cosine retrieval, each row querying all the others.

    MAP@R (Musgrave et al. 2020): R is the number of other rows sharing the
    query's label; AP@R = (1/R) Σ_{i<=R} precision@i · [i-th result relevant].
    Rows with label -1 take no part; queries whose label no other row has
    (R = 0) are skipped by both scores.
    """
    x, y = _as_pair(emb, labels, allow_unknown=True)
    batch_size = positive_int(batch_size, "batch_size")
    keep = y >= 0
    x, y = F.normalize(x[keep], dim=1), y[keep]
    r_all = torch.bincount(y)[y] - 1
    queries = (r_all > 0).nonzero()[:, 0]
    if len(queries) == 0:
        raise ValueError("no labelled row shares its label with another row; retrieval needs repeated labels")
    max_r = int(r_all.max())
    p1, ap = [], []
    for start in range(0, len(queries), batch_size):
        q = queries[start:start + batch_size]
        sims = x[q] @ x.T
        sims[torch.arange(len(q), device=x.device), q] = -math.inf  # a query never retrieves itself
        idx = sims.topk(max_r, dim=1).indices
        rel = (y[idx] == y[q][:, None]).float()
        r = r_all[q]
        ranks = torch.arange(1, max_r + 1, device=x.device)
        rel = rel * (ranks[None] <= r[:, None])  # only the first R results count
        precision = rel.cumsum(1) / ranks
        ap.append((precision * rel).sum(1) / r)
        p1.append(rel[:, 0])
    return {"precision_at_1": torch.cat(p1).mean().item(), "map_at_r": torch.cat(ap).mean().item()}


# ----------------------------------------------------------------------------- all together

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


# ----------------------------------------------------------------------------- baselines

def raw_pixels(dataset: Dataset, image_size: int | None = None, batch_size: int = 1024) -> Embeddings:
    """The trivial baseline's embeddings: each image at ``image_size`` (the net's input size), flattened.

    Pixels are scaled to [0, 1] (uint8 / 255) and resized as the Learner resizes its inputs
    (antialiased bilinear); ``None`` keeps the dataset's size. A representation that does not beat
    these vectors on the same protocol has not learned anything a user can use.
    """
    from .augment import resize

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


PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def linear_probe_cv(train_emb: Any, train_labels: Any, test_emb: Any, test_labels: Any,
                    weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS, folds: int = 3, seed: int = 0,
                    num_classes: int | None = None) -> tuple[float, float]:
    """(test accuracy, chosen weight decay) of ``linear_probe`` with its weight decay chosen by ``folds``-fold
    cross-validation on the labelled training rows alone (the test rows are never looked at to choose).

    The probe for few labels: with 100 labelled images the all-label protocol's weight decay (1e-4)
    underfits its regulariser, and the best value differs per representation (raw pixels want more).
    """
    x, y = _as_pair(train_emb, train_labels, "train_")
    c = _num_classes(num_classes, y, torch.as_tensor(test_labels).long())
    wd = choose_weight_decay(x, y, c, weight_decays, folds, seed)
    return linear_probe(x, y, test_emb, test_labels, weight_decay=wd, num_classes=c), wd


def choose_weight_decay(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS, folds: int = 3, seed: int = 0) -> float:
    """The weight decay of ``weight_decays`` whose probe scores best held out, over ``folds`` folds of (x, y);
    1e-4 when there are too few rows to hold any out."""
    if len(y) < 2 * folds:
        return 1e-4
    parts = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).chunk(folds)
    best = None
    for wd in weight_decays:
        right = 0.0
        for k in range(folds):
            fit = torch.cat([p for j, p in enumerate(parts) if j != k])
            right += linear_probe(x[fit], y[fit], x[parts[k]], y[parts[k]], weight_decay=wd,
                                  num_classes=num_classes) * len(parts[k])
        if best is None or right > best[0] + 1e-9:
            best = (right, wd)
    return best[1]
