"""Typical picks (TypiClust): typicality within k-means clusters, the most typical row of each cluster."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..checks import positive_int
from .geometry import check_n, distance, similarities, unit_rows
from ..kmeans import sampled_kmeans

__all__ = ["typicality", "typiclust"]


def _mean_knn_distance(x: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean distance from rows ``rows`` of x (all by default) to their k nearest other rows of x (1 <= k < len(x))."""
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    out = [distance(sims.topk(k, dim=1).values).mean(1) for _, sims in similarities(x, rows)]
    return torch.cat(out) if out else torch.zeros(0, device=x.device)


def _typicality(x: torch.Tensor, k: int, groups: torch.Tensor, cap: int | None) -> torch.Tensor:
    """Typicality of unit rows within their group; in a group over ``cap`` rows only its ``cap`` most central rows.

    The cap bounds the cost (a group of g rows costs g² dot products, 40 s for
    one group of 60k): the most typical rows sit near the group's mean, so
    only the ``cap`` rows nearest the mean are scored (against the whole
    group, so their scores are exact); the others get 0.
    """
    out = torch.zeros(x.shape[0], device=x.device)
    order = groups.argsort(stable=True)
    _, sizes = torch.unique_consecutive(groups[order], return_counts=True)
    for members in order.split(sizes.tolist()):
        if len(members) < 2:
            continue  # a row alone has no neighbour: typicality 0
        kk = min(k, max(1, len(members) // 2))
        xg = x[members]
        rows = None
        if cap is not None and len(members) > cap:
            rows = (xg @ xg.mean(0)).topk(cap).indices  # nearest the mean = largest dot product for unit rows
        typ = 1.0 / (_mean_knn_distance(xg, kk, rows) + 1e-6)  # 1e-6: exact copies stay finite
        out[members if rows is None else members[rows]] = typ
    return out


def typicality(embeddings: Any, k: int = 20, groups: Any = None) -> torch.Tensor:
    """Per-row typicality: 1 / mean distance to its k nearest rows (TypiClust), within its group if given.

    Distances are between unit vectors. ``groups`` (N,) ints restricts each
    row's neighbours to rows of the same group (e.g. its k-means cluster); a
    group of g rows uses min(k, g // 2) neighbours (at least 1), as
    TypiClust does for small clusters. A row alone in its group gets 0.
    Exact: a group of g rows costs g² dot products.
    """
    x = unit_rows(embeddings)
    k = positive_int(k, "k")
    n = x.shape[0]
    if groups is None:
        return _typicality(x, k, torch.zeros(n, dtype=torch.long, device=x.device), None)
    g = torch.as_tensor(groups).detach()
    if g.shape != (n,) or g.is_floating_point() or g.dtype == torch.bool:
        raise ValueError(f"groups must be integer group ids, one per row, shape ({n},); got {tuple(g.shape)} {g.dtype}")
    return _typicality(x, k, g.long().to(x.device), None)


def typiclust_picks(x: torch.Tensor, n: int, seed: int, k: int = 20, min_cluster: int = 5, sparse: float = 2.0
               ) -> torch.Tensor:
    """TypiClust picks: one k-means cluster per pick, the most typical row of each, largest clusters first.

    Rows are ranked within their cluster by typicality; the picks are taken
    round by round (every cluster's best row, then every cluster's second ...),
    larger clusters first within a round. Clusters smaller than ``min_cluster``
    come last, as in TypiClust: they are mostly outliers. So do (our addition)
    clusters whose most typical row lies ``sparse`` times farther from its
    neighbours than in the median cluster: k-means gathers scattered outliers
    into one such cluster, and its "most typical" row is still an outlier.
    """
    assign = sampled_kmeans(x, n, seed)
    typ = _typicality(x, k, assign, cap=4096).cpu()
    assign = assign.cpu()
    sizes = torch.bincount(assign, minlength=int(assign.max()) + 1)
    # rank of each row inside its cluster by decreasing typicality
    order = torch.from_numpy(np.lexsort((-typ.double().numpy(), assign.numpy())))
    start = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(assign)
    rank[order] = torch.arange(len(order)) - start[assign[order]]
    # a cluster whose most typical row is still far from its neighbours gathers outliers: it goes last as well
    best = torch.zeros(len(sizes)).scatter_reduce_(0, assign, typ, "amax")
    spread = 1 / best.clamp_min(1e-12)  # mean neighbour distance of each cluster's most typical row
    big = sizes >= min_cluster
    typical_spread = float(spread[big].median()) if bool(big.any()) else math.inf
    last = (~big | (spread > sparse * typical_spread))[assign].long()
    size = sizes[assign]
    # np.lexsort sorts by its last key first: other clusters first, then round by round, larger clusters first
    picked = np.lexsort((assign.numpy(), -size.numpy(), rank.numpy(), last.numpy()))
    return torch.from_numpy(picked[:n].copy()).long()


def typiclust(embeddings: Any, n: int, k: int = 20, seed: int = 0) -> torch.Tensor:
    """Indices (n,) of the most typical row of each of n k-means clusters, larger clusters first (TypiClust).

    Hacohen et al. 2022: typicality is 1 / mean distance to the k nearest rows
    of the same cluster; clusters under 5 rows (mostly outliers) come last.
    Deterministic given ``seed`` (the k-means seeding).
    """
    x = unit_rows(embeddings)
    return typiclust_picks(x, check_n(n, x.shape[0]), seed, k=positive_int(k, "k"))
