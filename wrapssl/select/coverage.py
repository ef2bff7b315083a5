"""Covering picks: ProbCover (greedy δ-ball coverage), weighted k-center greedy, and the coverage radius."""
from __future__ import annotations

import math
from typing import Any

import torch

from .duplicates import near_duplicates
from .geometry import (DIST_SLACK, SIM_SLACK, check_clusters, check_n, distance, rotated_bounds, sample_rows,
                       similarities, unit_rows)
from ..kmeans import sampled_kmeans

__all__ = ["probcover", "probcover_radius", "coverage_radius"]


def probcover_radius(embeddings: Any, n_clusters: int = 10, purity: float = 0.95, sample: int = 5000,
                     seed: int = 0) -> float:
    """The ball radius δ for ProbCover: the largest δ at which ``purity`` of the balls hold one k-means cluster only.

    ProbCover's purity rule with k-means clusters standing in for the unknown
    classes (set ``n_clusters`` to roughly the number of classes). A ball of
    radius δ around row i is pure when no row of another cluster lies within
    δ, i.e. when δ < the distance from i to the nearest row of another
    cluster; δ is that distance's (1 - purity) quantile over ``sample`` rows.
    """
    x = unit_rows(embeddings)
    n_clusters = check_clusters(n_clusters)
    if not 0 < purity < 1:
        raise ValueError(f"purity must be in (0, 1), got {purity}; ProbCover uses 0.95")
    if x.shape[0] <= n_clusters:
        raise ValueError(f"need more than n_clusters={n_clusters} rows to measure purity, got {x.shape[0]}")
    assign = sampled_kmeans(x, n_clusters, seed)
    pool = sample_rows(x, sample, seed)
    nearest_other = []
    for rows, sims in similarities(x, pool, self_match=True):  # a row's own cluster is masked, itself included
        sims.masked_fill_(assign[rows, None] == assign[None, :], -math.inf)
        nearest_other.append(distance(sims.amax(1)))
    d = torch.cat(nearest_other)
    return float(torch.quantile(d.double(), 1 - purity))


def _ball_graph(x: torch.Tensor, delta: float, max_edges: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (indptr (N+1,), indices) of the δ-ball graph: j is in row i's list when |x_i - x_j| <= δ (i itself too).

    The pairs come from ``near_duplicates`` (exact, pruned: 7 s instead of 80 s
    for a dense pass over 60k rows). A sample of 1,000 rows estimates the
    number of edges first, so that a radius that joins most pairs fails fast
    instead of filling the memory.
    """
    size = x.shape[0]
    threshold = 1 - delta * delta / 2  # |a - b|² = 2 - 2 a·b for unit vectors
    probe = sample_rows(x, 1000, seed)
    estimate = float((x[probe] @ x.T >= threshold).sum(1).float().mean()) * size
    if estimate > max_edges:
        raise ValueError(f"balls of radius {delta:.3g} hold about {estimate:,.0f} neighbours in all (limit "
                         f"{max_edges:,}); pass a smaller delta")
    own = torch.arange(size, device=x.device)
    if threshold > 0:
        pairs, _ = near_duplicates(x, threshold=min(1.0, threshold))
        src = torch.cat([pairs[:, 0], pairs[:, 1], own])
        dst = torch.cat([pairs[:, 1], pairs[:, 0], own])
    else:  # δ >= √2: near_duplicates takes positive cosines only; the graph is dense and (by the check) small
        found = [(sims >= threshold).nonzero() + torch.stack([rows[0], rows[0] * 0])
                 for rows, sims in similarities(x, own, self_match=True)]
        src, dst = torch.cat(found).unbind(1)
    order = src.argsort(stable=True)
    indptr = torch.zeros(size + 1, dtype=torch.long, device=x.device)
    torch.cumsum(torch.bincount(src, minlength=size), 0, out=indptr[1:])
    return indptr, dst[order]


def _rows_of(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The concatenated CSR neighbour lists of ``rows``."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    total = int(lens.sum())
    if total == 0:
        return indices[:0].long()
    shift = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
    return indices[shift + torch.arange(total, device=indices.device)].long()


def probcover_picks(x: torch.Tensor, n: int, seed: int, delta: float | None, n_clusters: int,
               max_edges: int = 20_000_000) -> torch.Tensor:
    """ProbCover picks: greedily the row whose δ-ball holds the most rows no pick covers yet.

    Each pick covers its ball; every newly covered row then leaves the count of
    every ball it lies in. Once everything is covered the rest are drawn at random.
    The graph takes about 60 bytes per edge while it is built; ``max_edges``
    (20M: balls of 330 rows on average over 60k) bounds it.
    """
    size = x.shape[0]
    if delta is None:
        delta = probcover_radius(x, n_clusters=min(n_clusters, size - 1), seed=seed) if size > 2 else 0.0
    elif isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta <= 2:
        raise ValueError(f"delta must be a ball radius in [0, 2] between unit vectors, got {delta!r}")
    indptr, indices = _ball_graph(x, float(delta), max_edges, seed)
    degree = (indptr[1:] - indptr[:-1]).clone()
    covered = torch.zeros(size, dtype=torch.bool, device=x.device)
    chosen = []
    for _ in range(n):
        c = int(degree.argmax())
        if degree[c] <= 0:
            break
        chosen.append(c)
        ball = _rows_of(indptr, indices, torch.tensor([c], device=x.device))
        new = ball[~covered[ball]]
        covered[new] = True
        degree -= torch.bincount(_rows_of(indptr, indices, new), minlength=size)
    if len(chosen) < n:  # all covered: the rest at random, as ProbCover does
        free = torch.ones(size, dtype=torch.bool)
        free[chosen] = False
        gen = torch.Generator().manual_seed(seed)
        rest = free.nonzero()[:, 0]
        chosen += rest[torch.randperm(len(rest), generator=gen)[:n - len(chosen)]].tolist()
    return torch.tensor(chosen, dtype=torch.long)


def probcover(embeddings: Any, n: int, delta: float | None = None, n_clusters: int = 10, seed: int = 0
              ) -> torch.Tensor:
    """Indices (n,) picked greedily to cover the most rows with balls of radius δ (ProbCover).

    Yehuda et al. 2022. δ: given, or ``probcover_radius`` with ``n_clusters``
    k-means clusters (roughly the number of classes). Distances are between
    unit vectors (at most 2). Deterministic given ``seed``.
    """
    x = unit_rows(embeddings)
    n = check_n(n, x.shape[0])
    return probcover_picks(x, n, seed, delta, check_clusters(n_clusters))


def kcenter_picks(x: torch.Tensor, n: int, w: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-center: repeatedly pick the row maximising weight × distance to the chosen set.

    Exact greedy, made fast by two bounds that skip rows which provably cannot
    come closer to the new centre c: the triangle inequality (a row at distance
    d from its centre c_j cannot get closer unless |c - c_j| < 2d) and the
    32-dim upper bound on cosines of ``rotated_bounds``. Only the remaining
    rows get a full dot product with c. Where the bounds prune little (e.g.
    isotropic data), steps fall back to one dense pass and re-try them later.
    """
    size = x.shape[0]
    dev = x.device
    w2 = None if w is None else w.square()  # argmax of w·d equals argmax of w²·d², no square roots needed
    d2 = torch.full((size,), math.inf, device=dev)
    score = d2 if w2 is None else torch.empty(size, device=dev)
    assign = torch.zeros(size, dtype=torch.long, device=dev)
    taken = torch.zeros(size, dtype=torch.bool, device=dev)
    centres = torch.empty(n, x.shape[1], device=dev)
    _, bound = rotated_bounds(x, 31) if x.shape[1] > 64 else (None, None)
    prune_from = bound_from = 1  # steps before these skip the triangle / PCA bound (they pruned too little)
    p = int(torch.multinomial(torch.ones(size) if w is None else w.cpu(), 1, generator=gen))
    chosen = []
    for t in range(n):
        chosen.append(p)
        c = centres[t] = x[p]
        taken[p] = True
        count = size
        if t >= prune_from:
            mask = _may_improve(d2, assign, centres[:t], c)
            if bound is not None and t >= bound_from:  # cosine > current best 1 - d²/2 is needed to improve
                mask &= bound @ bound[p] > 1 - d2 / 2 - SIM_SLACK
            count = int(mask.sum())
            if bound is not None and t >= bound_from and count > size // 2:
                bound_from = t + 32
            if count > size // 8:
                prune_from = t + 8
        if count > size // 8:  # many candidates: one dense pass is cheaper than gathering rows
            new = (2 - 2 * (x @ c)).clamp_min_(0)
            better = new < d2
            torch.minimum(d2, new, out=d2)
            assign.masked_fill_(better, t)
            if w2 is not None:
                torch.mul(d2, w2, out=score)
        else:
            cand = mask.nonzero()[:, 0]
            new = (2 - 2 * (x.index_select(0, cand) @ c)).clamp_min_(0)  # index_select: ~5x faster than []
            keep = new < d2.index_select(0, cand)
            better, upd = cand[keep], new[keep]
            d2.index_copy_(0, better, upd)
            assign.index_fill_(0, better, t)
            if w2 is not None:
                score.index_copy_(0, better, upd * w2.index_select(0, better))
        d2[p] = 0.0
        score[p] = 0.0
        if t + 1 < n:
            p = int(score.argmax())
            if taken[p] or not score[p] > 0:  # every row left is covered or weightless: take the farthest
                free = (~taken).nonzero()[:, 0]
                p = int(free[d2.index_select(0, free).argmax()])
    return torch.tensor(chosen, dtype=torch.long)


def _may_improve(d2: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Rows that the triangle inequality allows to come closer to the new centre c."""
    dc = (2 - 2 * (centres @ c)).clamp_min_(0).sqrt_()
    # row i (nearest centre j) can only improve if d_i > (dc_j - slack) / 2
    thr = (dc - DIST_SLACK).clamp_min_(0).square_().div_(4)
    return d2 > thr.index_select(0, assign)


def coverage_radius(embeddings: Any, indices: Any) -> float:
    """Largest distance from any row to its nearest selected row (the k-center objective)."""
    x = unit_rows(embeddings)
    idx = torch.as_tensor(indices, dtype=torch.long, device=x.device)
    if idx.ndim != 1 or len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= x.shape[0]:
        raise ValueError(f"indices must be a non-empty 1-D list of row numbers in [0, {x.shape[0]})")
    best = torch.full((x.shape[0],), -math.inf, device=x.device)
    for start in range(0, len(idx), 1024):
        best = torch.maximum(best, (x @ x[idx[start:start + 1024]].T).amax(1))
    return float(distance(best).max())
