"""Scores of a representation: kNN, the linear probe (a logistic fit), k-means clustering (NMI, AMI), retrieval.

All similarity-based metrics work in cosine geometry (rows are L2-normalised first). NMI and AMI are
scikit-learn's (``pip install scikit-learn``, or wrapssl[eval]); the rest is torch.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import optional_import, positive_int
from ..kmeans import kmeans


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


def _label_arrays(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two equal-length 1-D NumPy label arrays."""
    a = np.asarray(torch.as_tensor(labels_true).cpu()).ravel()
    b = np.asarray(torch.as_tensor(labels_pred).cpu()).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"the two labelings must be non-empty and equally long, got {a.size} and {b.size}")
    return a, b


def _sklearn_metrics() -> Any:
    """scikit-learn's metrics module, or an ImportError that says how to install it."""
    return optional_import("sklearn.metrics", "clustering scores (NMI, AMI) need scikit-learn: pip install "
                                              "scikit-learn (or pip install wrapssl[eval])")


def normalized_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """NMI = MI / mean(H(true), H(pred)) (arithmetic mean), scikit-learn's ``normalized_mutual_info_score``."""
    return float(_sklearn_metrics().normalized_mutual_info_score(*_label_arrays(labels_true, labels_pred)))


def adjusted_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """AMI = (MI - E[MI]) / (mean(H(true), H(pred)) - E[MI]), 1 for identical partitions, ~0 for random ones
    (scikit-learn's ``adjusted_mutual_info_score``)."""
    return float(_sklearn_metrics().adjusted_mutual_info_score(*_label_arrays(labels_true, labels_pred)))


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
