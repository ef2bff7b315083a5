"""Choose ``n`` rows to label with one call: ``select`` dispatches to TypiClust, ProbCover, k-center or random."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .coverage import kcenter_picks, probcover_picks
from .geometry import check_n, unit_rows, unpack
from .typical import typiclust_picks
from .weights import resolve_weights

__all__ = ["Selection", "select", "METHODS", "DEFAULT_METHOD"]


METHODS = ("typiclust", "probcover", "kcenter", "random")
DEFAULT_METHOD = "typiclust"  # measured best against random picks (benchmarks/RESULTS.md, issue 19)


@dataclass
class Selection:
    """Selected row indices in the order they were picked, and their file names (empty if none known)."""

    indices: torch.Tensor
    files: list[str]


def select(embeddings: Any, n: int, method: str = DEFAULT_METHOD, weights: Any = None, seed: int = 0,
           files: Sequence[str] | None = None) -> Selection:
    """``n`` rows to label, chosen by typicality (TypiClust), probability coverage (ProbCover), k-center or at random.

    ``typiclust`` (the default; measured best in benchmarks/RESULTS.md) splits
    the rows into ``n`` k-means clusters and takes the most typical row of each
    (typicality: 1 / mean distance to its 20 nearest rows in the cluster),
    larger clusters first; clusters under 5 rows come last. ``probcover``
    greedily takes the row whose δ-ball holds the most rows not yet covered,
    δ from ``probcover_radius`` (10 k-means clusters stand in for classes).
    Both avoid outliers, which is what helps at small budgets. ``kcenter``
    picks the first row at random (probability ∝ weight) and then, each step,
    the row maximising weight_i × d_i, where d_i is its distance to the nearest
    row chosen so far; unweighted, this is the classic coreset greedy whose
    coverage radius is at most twice the optimum. ``weights`` (kcenter and
    random only): None (all 1), ``"density"`` (``density_weights``: favours
    rows in dense regions over outliers), ``"uncertainty"``
    (``uncertainty_weights``: favours rows between clusters), or a tensor (N,)
    of non-negative scores, e.g. a classifier's entropy. Weights are divided by
    their maximum; a row of weight 0 is picked only once every positive-weight
    row is chosen or covered. ``random`` draws rows without replacement with
    probability ∝ weight. Deterministic given ``seed``. ``files`` (or the
    ``files`` of an ``Embeddings``) are carried over.
    """
    raw, files = unpack(embeddings, files)
    x = unit_rows(raw)
    size = x.shape[0]
    n = check_n(n, size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if files is not None and len(files) != size:
        raise ValueError(f"files must hold one name per row ({size}), got {len(files)}")
    if weights is not None and method not in ("kcenter", "random"):
        raise ValueError(f"weights apply to method 'kcenter' or 'random', not {method!r}; drop them or change method")
    w = resolve_weights(weights, x, seed)
    gen = torch.Generator().manual_seed(seed)
    if method == "typiclust":
        idx = typiclust_picks(x, n, seed)
    elif method == "probcover":
        idx = probcover_picks(x, n, seed, delta=None, n_clusters=10)
    elif method == "kcenter":
        idx = kcenter_picks(x, n, w, gen)
    else:
        p = torch.ones(size) if w is None else w.cpu()
        if int((p > 0).sum()) < n:
            raise ValueError(f"only {int((p > 0).sum())} rows have a positive weight but n={n}; "
                             "lower n or give more rows a positive weight")
        idx = torch.multinomial(p, n, replacement=False, generator=gen)
    idx = idx.cpu()
    return Selection(idx, [str(files[i]) for i in idx.tolist()] if files is not None else [])
