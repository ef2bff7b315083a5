"""Choose what to label: typical (TypiClust), covering (ProbCover) or diverse (k-center) subsets; near-duplicates.

All work in cosine geometry: rows are L2-normalised, and the distance between
two rows is the Euclidean distance of the unit vectors, sqrt(2 - 2·cos).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checks import positive_int

__all__ = ["Selection", "select", "compare_with_random", "typiclust", "probcover", "typicality", "probcover_radius",
           "density_weights", "uncertainty_weights", "coverage_radius", "near_duplicates",
           "nearest_neighbour_distance", "relative_threshold", "METHODS", "DEFAULT_METHOD"]

METHODS = ("typiclust", "probcover", "kcenter", "random")
DEFAULT_METHOD = "typiclust"  # measured best against random picks (benchmarks/RESULTS.md, issue 19)
# Float32 dot products of unit vectors are off by ~1e-6, so a distance near 0 can be off by
# ~1e-3 after the square root; pruning bounds keep this much slack so they never drop a true update.
_DIST_SLACK = 1e-2
_SIM_SLACK = 1e-4


@dataclass
class Selection:
    """Selected row indices in the order they were picked, and their file names (empty if none known)."""

    indices: torch.Tensor
    files: list[str]


def _unit_rows(embeddings: Any) -> torch.Tensor:
    """Finite (N, D) float32 rows scaled to unit length (zero rows stay zero)."""
    x = torch.as_tensor(embeddings).detach()
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("embeddings are empty; nothing to select from")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("embeddings contain NaN or inf; check the model's output (e.g. a diverged run)")
    return F.normalize(x, dim=1)


def _unpack(embeddings: Any, files: Sequence[str] | None) -> tuple[Any, Sequence[str] | None]:
    """Raw embeddings and file names from a tensor or a wrapssl ``Embeddings``."""
    if hasattr(embeddings, "embeddings") and hasattr(embeddings, "files"):
        return embeddings.embeddings, files if files is not None else embeddings.files
    return embeddings, files


def density_weights(embeddings: Any, k: int = 10, sample: int = 4096, seed: int = 0) -> torch.Tensor:
    """Per-row density in [0, 1]: (1 + mean cosine similarity to its k nearest rows) / 2.

    The neighbours are searched in a random sample of ``sample`` rows (all rows
    if there are fewer), which keeps the cost at N × sample dot products.
    """
    x = _unit_rows(embeddings)
    n = x.shape[0]
    k = positive_int(k, "k")
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randperm(n, generator=gen)[:sample].to(x.device)
    k = min(k, len(pool) - 1)
    if k < 1:
        return torch.ones(n, device=x.device)  # a single row has no neighbour; every row is equally dense
    where = torch.full((n,), -1, dtype=torch.long, device=x.device)
    where[pool] = torch.arange(len(pool), device=x.device)  # column of each sampled row, to mask self-matches
    xs = x[pool]
    out = []
    for start in range(0, n, 4096):
        sims = x[start:start + 4096] @ xs.T
        rows = torch.arange(start, start + sims.shape[0], device=x.device)
        own = where[rows]
        hit = own >= 0
        sims[hit.nonzero()[:, 0], own[hit]] = -math.inf  # a row is not its own neighbour
        out.append(sims.topk(k, dim=1).values.mean(1))
    return (1 + torch.cat(out)).div_(2).clamp_(0, 1)


def uncertainty_weights(embeddings: Any, n_clusters: int = 10, seed: int = 0) -> torch.Tensor:
    """Per-row ambiguity in [0, 1]: distance to the nearest k-means centre / distance to the second.

    1 means the row sits halfway between two clusters (a classifier trained on
    the clusters would be least sure of it); 0 means it sits on a centre.
    Set ``n_clusters`` to roughly the number of classes you expect.
    """
    from .evaluate import kmeans  # one k-means for the whole package

    x = _unit_rows(embeddings)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 2:
        raise ValueError(f"n_clusters must be an int >= 2, got {n_clusters!r}")
    n_clusters = min(n_clusters, x.shape[0])
    if n_clusters < 2:
        return torch.ones(x.shape[0], device=x.device)
    centres, _ = kmeans(x, n_clusters, seed=seed, max_iter=30)
    d2 = (x.square().sum(1, keepdim=True) - 2 * x @ centres.T + centres.square().sum(1)).clamp_min_(0)
    two = d2.topk(2, dim=1, largest=False).values.sqrt()
    return torch.where(two[:, 1] > 0, two[:, 0] / two[:, 1].clamp_min(1e-12), torch.ones_like(two[:, 0]))


def _weights(weights: Any, x: torch.Tensor, seed: int) -> torch.Tensor | None:
    """Non-negative per-row weights scaled so the largest is 1, or None for unweighted."""
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights == "density":
            w = density_weights(x, seed=seed)
        elif weights == "uncertainty":
            w = uncertainty_weights(x, seed=seed)
        else:
            raise ValueError(f"weights must be None, 'density', 'uncertainty' or a tensor of shape "
                             f"({x.shape[0]},), got {weights!r}")
    else:
        w = torch.as_tensor(weights).detach().float().to(x.device)
    if w.shape != (x.shape[0],):
        raise ValueError(f"weights must have one value per row, shape ({x.shape[0]},), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0 (e.g. a classifier's entropy or 1 - max prob)")
    top = w.max()
    if not top > 0:
        raise ValueError("all weights are 0; give at least one row a positive weight")
    return w / top


def _kcenter(x: torch.Tensor, n: int, w: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-center: repeatedly pick the row maximising weight × distance to the chosen set.

    Exact greedy, made fast by two bounds that skip rows which provably cannot
    come closer to the new centre c: the triangle inequality (a row at distance
    d from its centre c_j cannot get closer unless |c - c_j| < 2d) and the
    32-dim upper bound on cosines of ``_rotated_bounds``. Only the remaining
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
    _, bound = _rotated_bounds(x, 31) if x.shape[1] > 64 else (None, None)
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
                mask &= bound @ bound[p] > 1 - d2 / 2 - _SIM_SLACK
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
    thr = (dc - _DIST_SLACK).clamp_min_(0).square_().div_(4)
    return d2 > thr.index_select(0, assign)


def _chunk_rows(cols: int, budget: int = 1 << 23) -> int:
    """Rows per block so that a (rows, cols) float32 block stays near ``budget`` elements (32 MB)."""
    return max(1, min(4096, budget // max(1, cols)))


def _mean_knn_distance(x: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean distance from rows ``rows`` of x (all by default) to their k nearest other rows of x (1 <= k < len(x))."""
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    out = []
    for part in rows.split(_chunk_rows(x.shape[0])):
        sims = x[part] @ x.T
        sims[torch.arange(len(part), device=x.device), part] = -math.inf  # a row is not its own neighbour
        out.append((2 - 2 * sims.topk(k, dim=1).values).clamp_min_(0).sqrt_().mean(1))
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
    x = _unit_rows(_unpack(embeddings, None)[0])
    k = positive_int(k, "k")
    n = x.shape[0]
    if groups is None:
        return _typicality(x, k, torch.zeros(n, dtype=torch.long, device=x.device), None)
    g = torch.as_tensor(groups).detach()
    if g.shape != (n,) or g.is_floating_point() or g.dtype == torch.bool:
        raise ValueError(f"groups must be integer group ids, one per row, shape ({n},); got {tuple(g.shape)} {g.dtype}")
    return _typicality(x, k, g.long().to(x.device), None)


def _assign(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every unit row of x: argmax of x·c - |c|²/2."""
    bias = centres.square().sum(1).mul_(-0.5)
    step = _chunk_rows(centres.shape[0])
    return torch.cat([torch.addmm(bias, x[s:s + step], centres.T).argmax(1) for s in range(0, x.shape[0], step)])


def _cluster(x: torch.Tensor, n_clusters: int, seed: int, max_iter: int = 10, tol: float = 1e-3) -> torch.Tensor:
    """k-means assignment (N,) of unit rows: the best of a few k-means++ starts, Lloyd steps until < tol move.

    Not ``wrapssl.evaluate.kmeans``: its seeding passes over all rows for every
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
        assign, inertia = _lloyd(x, _seed_centres(x, n_clusters, gen), max_iter, tol)
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def _seed_centres(x: torch.Tensor, n_clusters: int, gen: torch.Generator) -> torch.Tensor:
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


def _lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, float]:
    """Lloyd steps from ``centres`` until under ``tol`` of the rows move: (assignment, sum of squared distances)."""
    size, k = x.shape[0], centres.shape[0]
    assign = _assign(x, centres)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=k)
        centres = torch.zeros_like(centres).index_add_(0, assign, x) / counts.clamp_min(1)[:, None].float()
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):  # an empty cluster restarts at the rows farthest from their centre
            far = (x - centres[assign]).square().sum(1)
            centres[empty] = x[far.topk(len(empty)).indices]
        new = _assign(x, centres)
        moved = int((new != assign).sum())
        assign = new
        if moved <= tol * size:
            break
    return assign, float((x - centres[assign]).square().sum())


def _typiclust(x: torch.Tensor, n: int, seed: int, k: int = 20, min_cluster: int = 5, sparse: float = 2.0
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
    assign = _cluster(x, n, seed)
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


def probcover_radius(embeddings: Any, n_clusters: int = 10, purity: float = 0.95, sample: int = 5000,
                     seed: int = 0) -> float:
    """The ball radius δ for ProbCover: the largest δ at which ``purity`` of the balls hold one k-means cluster only.

    ProbCover's purity rule with k-means clusters standing in for the unknown
    classes (set ``n_clusters`` to roughly the number of classes). A ball of
    radius δ around row i is pure when no row of another cluster lies within
    δ, i.e. when δ < the distance from i to the nearest row of another
    cluster; δ is that distance's (1 - purity) quantile over ``sample`` rows.
    """
    x = _unit_rows(_unpack(embeddings, None)[0])
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 2:
        raise ValueError(f"n_clusters must be an int >= 2 (roughly the number of classes), got {n_clusters!r}")
    if not 0 < purity < 1:
        raise ValueError(f"purity must be in (0, 1), got {purity}; ProbCover uses 0.95")
    if x.shape[0] <= n_clusters:
        raise ValueError(f"need more than n_clusters={n_clusters} rows to measure purity, got {x.shape[0]}")
    assign = _cluster(x, n_clusters, seed)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randperm(x.shape[0], generator=gen)[:positive_int(sample, "sample")].to(x.device)
    nearest_other = []
    step = _chunk_rows(x.shape[0])
    for rows in pool.split(step):
        sims = x[rows] @ x.T
        sims.masked_fill_(assign[rows, None] == assign[None, :], -math.inf)
        nearest_other.append((2 - 2 * sims.amax(1)).clamp_min_(0).sqrt_())
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
    probe = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:1000].to(x.device)
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
        found = [(x[rows] @ x.T >= threshold).nonzero() + torch.stack([rows[0], rows[0] * 0])
                 for rows in own.split(_chunk_rows(size))]
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


def _probcover(x: torch.Tensor, n: int, seed: int, delta: float | None, n_clusters: int,
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


def _check_n(n: Any, size: int) -> int:
    """``n`` as an int in [1, size], else a ValueError."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= size:
        raise ValueError(f"n must be an int in [1, {size}] (the number of rows), got {n!r}")
    return int(n)


def typiclust(embeddings: Any, n: int, k: int = 20, seed: int = 0) -> torch.Tensor:
    """Indices (n,) of the most typical row of each of n k-means clusters, larger clusters first (TypiClust).

    Hacohen et al. 2022: typicality is 1 / mean distance to the k nearest rows
    of the same cluster; clusters under 5 rows (mostly outliers) come last.
    Deterministic given ``seed`` (the k-means seeding).
    """
    x = _unit_rows(_unpack(embeddings, None)[0])
    return _typiclust(x, _check_n(n, x.shape[0]), seed, k=positive_int(k, "k"))


def probcover(embeddings: Any, n: int, delta: float | None = None, n_clusters: int = 10, seed: int = 0
              ) -> torch.Tensor:
    """Indices (n,) picked greedily to cover the most rows with balls of radius δ (ProbCover).

    Yehuda et al. 2022. δ: given, or ``probcover_radius`` with ``n_clusters``
    k-means clusters (roughly the number of classes). Distances are between
    unit vectors (at most 2). Deterministic given ``seed``.
    """
    x = _unit_rows(_unpack(embeddings, None)[0])
    n = _check_n(n, x.shape[0])
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 2:
        raise ValueError(f"n_clusters must be an int >= 2 (roughly the number of classes), got {n_clusters!r}")
    return _probcover(x, n, seed, delta, n_clusters)

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
    raw, files = _unpack(embeddings, files)
    x = _unit_rows(raw)
    size = x.shape[0]
    n = _check_n(n, size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if files is not None and len(files) != size:
        raise ValueError(f"files must hold one name per row ({size}), got {len(files)}")
    if weights is not None and method not in ("kcenter", "random"):
        raise ValueError(f"weights apply to method 'kcenter' or 'random', not {method!r}; drop them or change method")
    w = _weights(weights, x, seed)
    gen = torch.Generator().manual_seed(seed)
    if method == "typiclust":
        idx = _typiclust(x, n, seed)
    elif method == "probcover":
        idx = _probcover(x, n, seed, delta=None, n_clusters=10)
    elif method == "kcenter":
        idx = _kcenter(x, n, w, gen)
    else:
        p = torch.ones(size) if w is None else w.cpu()
        if int((p > 0).sum()) < n:
            raise ValueError(f"only {int((p > 0).sum())} rows have a positive weight but n={n}; "
                             "lower n or give more rows a positive weight")
        idx = torch.multinomial(p, n, replacement=False, generator=gen)
    idx = idx.cpu()
    return Selection(idx, [str(files[i]) for i in idx.tolist()] if files is not None else [])


def coverage_radius(embeddings: Any, indices: Any) -> float:
    """Largest distance from any row to its nearest selected row (the k-center objective)."""
    x = _unit_rows(_unpack(embeddings, None)[0])
    idx = torch.as_tensor(indices, dtype=torch.long, device=x.device)
    if idx.ndim != 1 or len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= x.shape[0]:
        raise ValueError(f"indices must be a non-empty 1-D list of row numbers in [0, {x.shape[0]})")
    best = torch.full((x.shape[0],), -math.inf, device=x.device)
    for start in range(0, len(idx), 1024):
        best = torch.maximum(best, (x @ x[idx[start:start + 1024]].T).amax(1))
    return float((2 - 2 * best).clamp_min(0).sqrt().max())


def _rotated_bounds(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates on the top principal axis (N,) and bound vectors (N, m+1) with a_i·a_j >= x_i·x_j.

    After an orthogonal rotation y = xV (dot products unchanged), x_i·x_j =
    y_i[:m]·y_j[:m] + y_i[m:]·y_j[m:] <= y_i[:m]·y_j[:m] + |y_i[m:]||y_j[m:]|
    (Cauchy-Schwarz), so appending the residual norm as one more coordinate
    gives an upper bound from an (m+1)-dim matmul.
    """
    cov = x.T.double() @ x.double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a D×D eigh gains nothing from threads and stalls for seconds on a busy CPU
    try:
        _, vecs = torch.linalg.eigh(cov)
    finally:
        torch.set_num_threads(threads)
    y = x @ vecs.flip(1).float()  # axes by decreasing energy, so the first m hold most of each row
    head = y[:, 0].contiguous()
    if m >= x.shape[1]:
        return head, y
    return head, torch.cat([y[:, :m], y[:, m:].norm(dim=1, keepdim=True)], dim=1)


def near_duplicates(embeddings: Any, threshold: float = 0.95, block_size: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (i, j), i < j, with cosine similarity >= threshold, and those similarities.

    Returns ``pairs`` (P, 2) long sorted by (i, j) and ``similarities`` (P,).
    Exact: two pruning rules discard only pairs that provably fall below the
    threshold. (1) Rows are sorted by their coordinate on the top principal
    axis; unit vectors with cosine >= t differ there by at most sqrt(2 - 2t),
    so each block of rows meets only a window of columns. (2) Within it, an
    upper bound on every cosine comes from a 32-dim matmul (see
    ``_rotated_bounds``; for D > 48); only rows whose bound reaches the
    threshold get exact cosines. Memory stays at block_size × 8·block_size
    floats plus the pairs found. Zero rows match nothing. Pairs within ~1e-6
    of the threshold may go either way through float32 rounding.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}; near-duplicates usually sit above 0.9")
    block_size = positive_int(block_size, "block_size")
    x = _unit_rows(_unpack(embeddings, None)[0])
    dev = x.device
    nonzero = (x.abs().sum(1) > 0).nonzero()[:, 0]  # a zero row has cosine 0 with everything
    x = x[nonzero]
    dim = x.shape[1]
    head, bound = _rotated_bounds(x, dim if dim <= 48 else 31)
    order = head.argsort()
    head, bound, x, ids = head[order], bound[order].contiguous(), x[order].contiguous(), nonzero[order]
    reach = math.sqrt(max(0.0, 2 - 2 * threshold)) + _SIM_SLACK
    stop = torch.searchsorted(head, head + reach, right=True).tolist()  # first column out of each row's reach
    cols = 8 * block_size
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    found_i, found_j, found_s = [empty], [empty], [torch.zeros(0, device=dev)]
    for r0 in range(0, x.shape[0], block_size):
        r1 = min(r0 + block_size, x.shape[0])
        for c0 in range(r0, stop[r1 - 1], cols):
            c1 = min(c0 + cols, stop[r1 - 1])
            upper = bound[r0:r1] @ bound[c0:c1].T
            if c0 == r0:
                upper.triu_(1)  # the diagonal block: keep only column > row (0 is below any threshold)
            # a row max is ~20x cheaper than compare + nonzero, and most rows have no candidate at all
            rows = (upper.amax(1) >= threshold - _SIM_SLACK).nonzero()[:, 0] + r0
            if len(rows) == 0:
                continue
            sims = x.index_select(0, rows) @ x[c0:c1].T  # exact cosines, only for rows that may hold a pair
            if c0 == r0:
                sims.masked_fill_(torch.arange(c0, c1, device=dev) <= rows[:, None], 0.0)
            ii, jj = (sims >= threshold).nonzero(as_tuple=True)
            found_i.append(ids[rows[ii]])
            found_j.append(ids[jj + c0])
            found_s.append(sims[ii, jj])
    a, b = torch.cat(found_i), torch.cat(found_j)
    if len(a) == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=dev), torch.zeros(0, device=dev)
    pairs = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
    sims = torch.cat(found_s)
    key = pairs[:, 0] * (int(pairs.max()) + 1) + pairs[:, 1]
    perm = key.argsort()
    return pairs[perm], sims[perm]


def nearest_neighbour_distance(embeddings: Any, sample: int = 2048, seed: int = 0) -> float:
    """Median distance from a row to its nearest other row, over a random sample of ``sample`` rows.

    Distances are between unit vectors (sqrt(2 - 2·cos)). The sample's rows are
    compared with every row, so the cost is N × sample dot products.
    """
    x = _unit_rows(_unpack(embeddings, None)[0])
    n = x.shape[0]
    if n < 2:
        raise ValueError("need at least 2 embeddings to measure nearest-neighbour distances")
    pool = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:positive_int(sample, "sample")]
    best = []
    for start in range(0, len(pool), 256):
        rows = pool[start:start + 256].to(x.device)
        sims = x[rows] @ x.T
        sims[torch.arange(len(rows), device=x.device), rows] = -math.inf  # a row is not its own neighbour
        best.append(sims.amax(1))
    return float((2 - 2 * torch.cat(best)).clamp_min(0).sqrt().median())


def relative_threshold(embeddings: Any, fraction: float, sample: int = 2048, seed: int = 0) -> float:
    """The cosine above which two rows are closer than ``fraction`` × the median nearest-neighbour distance.

    An absolute cosine means different things for different models (trained
    embeddings of one data set can have a median pair cosine of 0.8); relative to
    how far apart true neighbours typically are, 0.1-0.3 marks near-copies.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}; 0.1-0.3 finds near-copies")
    d = fraction * nearest_neighbour_distance(embeddings, sample, seed)
    return 1 - d * d / 2


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
    from .evaluate import linear_probe  # one probe for the whole package

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
