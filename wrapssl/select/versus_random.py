"""Score picks against random ones: linear-probe accuracy of ``select``'s picks beside random draws of the same size."""
from __future__ import annotations

from typing import Any

import torch

from ..checks import positive_int
from .picks import DEFAULT_METHOD, select

__all__ = ["compare_with_random"]


def _labelled_rows(emb: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, labels) of an ``Embeddings`` whose every row has a known label, or a ValueError."""
    if not (hasattr(emb, "embeddings") and hasattr(emb, "labels")):
        raise ValueError(f"{name} must be a wrapssl Embeddings (embeddings, labels, files), got {type(emb).__name__}")
    x, y = torch.as_tensor(emb.embeddings), torch.as_tensor(emb.labels).long()
    if len(y) == 0:
        raise ValueError(f"{name} embeddings are empty")
    if bool((y < 0).any()):
        raise ValueError(f"{name} embeddings have {int((y < 0).sum())} rows without a label (-1); picks can only "
                         "be scored against random ones on fully labelled embeddings (e.g. a built-in set's split)")
    return x, y


def compare_with_random(train: Any, test: Any, n: int, method: str = DEFAULT_METHOD, draws: int = 3,
                        seed: int = 0, probe: Any = None) -> dict[str, Any]:
    """Linear-probe test accuracy when ``n`` train images are picked by ``method`` against ``draws`` random picks.

    ``train`` and ``test`` are fully labelled ``Embeddings`` of the same model.
    The picks use no labels: ``select(train, n, method, seed=seed)``; random
    draw i is ``select(train, n, "random", seed=seed + i)``. Each subset's
    labels train ``probe(x, y, xt, yt, num_classes=...)`` (default ``wrapssl.evaluate.linear_probe``; the few-label
    report passes its cross-validated probe), scored on all of ``test``.
    Returns a JSON-able dict: ``n``, ``method``, ``seed``, ``picked`` (accuracy
    in [0, 1]), ``random`` (one accuracy per draw), ``random_mean``,
    ``random_min``, ``random_max``, ``gain`` (picked - random_mean, in
    accuracy), and ``picked_classes`` / ``random_classes`` (classes present
    in each subset).
    """
    from ..evaluate.metrics import linear_probe  # one probe for the whole package

    x, y = _labelled_rows(train, "train")
    xt, yt = _labelled_rows(test, "test")
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"train embeddings have {tuple(x.shape[1:])} dims but test ones {tuple(xt.shape[1:])}; "
                         "embed both splits with the same model")
    draws = positive_int(draws, "draws")
    classes = int(max(y.max(), yt.max())) + 1

    fit = probe or linear_probe

    def score(idx: torch.Tensor) -> float:
        return fit(x[idx], y[idx], xt, yt, num_classes=classes)

    picked = select(x, n, method=method, seed=seed).indices
    rand = [select(x, n, method="random", seed=seed + i).indices for i in range(draws)]
    accs = [score(idx) for idx in rand]
    mean = sum(accs) / draws
    acc = score(picked)
    return {"n": int(n), "method": method, "seed": int(seed), "picked": acc, "random": accs,
            "random_mean": mean, "random_min": min(accs), "random_max": max(accs), "gain": acc - mean,
            "picked_classes": len(set(y[picked].tolist())),
            "random_classes": [len(set(y[idx].tolist())) for idx in rand]}
