"""k-means of embedding rows: exact (k-means++ over every row, Lloyd to a fixed point) for clustering scores and
map colours, and sampled (seeding on a sample, a few starts) for selection, which wants thousands of clusters."""
from __future__ import annotations

import math
from typing import Any

import torch

from .checks import positive_int

__all__ = ["kmeans", "sampled_kmeans"]


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
    x = torch.as_tensor(x).detach()
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; check the model's output (e.g. a diverged run)")
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


def _assign_unit(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every unit row of x: argmax of x·c - |c|²/2."""
    bias = centres.square().sum(1).mul_(-0.5)
    step = max(1, min(4096, (1 << 23) // max(1, centres.shape[0])))  # blocks of ~32 MB
    return torch.cat([torch.addmm(bias, x[s:s + step], centres.T).argmax(1) for s in range(0, x.shape[0], step)])


def sampled_kmeans(x: torch.Tensor, n_clusters: int, seed: int, max_iter: int = 10, tol: float = 1e-3) -> torch.Tensor:
    """k-means assignment (N,) of unit rows: the best of a few k-means++ starts, Lloyd steps until < tol move.

    Not ``kmeans`` above: its seeding passes over all rows for every
    centre, 40 s for K = 1,000 on 60k rows on a busy 2-core CPU, and TypiClust
    wants as many clusters as picks. Here the seeding runs on a sample, and up
    to 100 clusters the lowest-inertia of 3 starts is kept: one start merges two
    small modes now and then, and at few picks that costs a whole class.
    """
    size = x.shape[0]
    if n_clusters >= size:
        return torch.arange(size, device=x.device)
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(3 if n_clusters <= 100 else 1):
        assign, inertia = _lloyd_unit(x, _seed_sample(x, n_clusters, gen), max_iter, tol)
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def _seed_sample(x: torch.Tensor, n_clusters: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ centres (the best of 2 + ln K draws ∝ D² each, as scikit-learn) from a sample of rows."""
    size = x.shape[0]
    # a sample of 10 rows per centre: a pass per centre over all 60k rows costs 15 s at K = 1,000
    pool = x[torch.randperm(size, generator=gen)[:min(size, 10 * n_clusters + 1000)].to(x.device)].cpu()
    tries = 2 + int(math.log(n_clusters))
    centres = torch.empty(n_clusters, x.shape[1])
    p = int(torch.randint(len(pool), (1,), generator=gen))
    d2 = (2 - 2 * (pool @ pool[p])).clamp_min_(0).double()
    centres[0] = pool[p]
    for i in range(1, n_clusters):
        cdf = torch.cumsum(d2, 0)
        if cdf[-1] > 0:  # inverse-CDF draws ∝ d2: 4x faster than torch.multinomial over many rows
            cand = torch.searchsorted(cdf, torch.rand(tries, generator=gen, dtype=torch.float64) * cdf[-1])
            cand = cand.clamp_max_(len(pool) - 1)
        else:  # every row sits on a centre: any row will do
            cand = torch.randint(len(pool), (1,), generator=gen)
        new = torch.minimum(d2, (2 - 2 * (pool[cand] @ pool.T)).clamp_min_(0).double())
        best = int(new.sum(1).argmin())
        centres[i], d2 = pool[cand[best]], new[best]
    return centres.to(x.device)


def _lloyd_unit(x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, float]:
    """Lloyd steps from ``centres`` until under ``tol`` of the rows move: (assignment, sum of squared distances)."""
    size, k = x.shape[0], centres.shape[0]
    assign = _assign_unit(x, centres)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=k)
        centres = torch.zeros_like(centres).index_add_(0, assign, x) / counts.clamp_min(1)[:, None].float()
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):  # an empty cluster restarts at the rows farthest from their centre
            far = (x - centres[assign]).square().sum(1)
            centres[empty] = x[far.topk(len(empty)).indices]
        new = _assign_unit(x, centres)
        moved = int((new != assign).sum())
        assign = new
        if moved <= tol * size:
            break
    return assign, float((x - centres[assign]).square().sum())
