"""Choose what to label: diverse subsets (k-center greedy) and near-duplicate pairs of embeddings.

Both work in cosine geometry: rows are L2-normalised, and the distance between
two rows is the Euclidean distance of the unit vectors, sqrt(2 - 2·cos).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .checks import positive_int

__all__ = ["Selection", "select", "density_weights", "uncertainty_weights", "coverage_radius", "near_duplicates",
           "nearest_neighbour_distance", "relative_threshold"]

METHODS = ("kcenter", "random")
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


def select(embeddings: Any, n: int, method: str = "kcenter", weights: Any = None, seed: int = 0,
           files: Sequence[str] | None = None) -> Selection:
    """A diverse subset of ``n`` rows to label, by k-center greedy (coreset) or at random.

    ``kcenter`` picks the first row at random (probability ∝ weight) and then,
    each step, the row maximising weight_i × d_i, where d_i is its distance to
    the nearest row chosen so far; unweighted, this is the classic greedy whose
    coverage radius is at most twice the optimum. ``weights``: None (all 1),
    ``"density"`` (``density_weights``: favours rows in dense regions over
    outliers), ``"uncertainty"`` (``uncertainty_weights``: favours rows between
    clusters), or a tensor (N,) of non-negative scores, e.g. a classifier's
    entropy. Weights are divided by their maximum; a row of weight 0 is picked
    only once every positive-weight row is chosen or covered. ``random`` draws
    rows without replacement with probability ∝ weight. Deterministic given
    ``seed``. ``files`` (or the ``files`` of an ``Embeddings``) are carried over.
    """
    raw, files = _unpack(embeddings, files)
    x = _unit_rows(raw)
    size = x.shape[0]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= size:
        raise ValueError(f"n must be an int in [1, {size}] (the number of rows), got {n!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if files is not None and len(files) != size:
        raise ValueError(f"files must hold one name per row ({size}), got {len(files)}")
    w = _weights(weights, x, seed)
    gen = torch.Generator().manual_seed(seed)
    if method == "kcenter":
        idx = _kcenter(x, n, w, gen)
    else:
        p = torch.ones(size) if w is None else w.cpu()
        if int((p > 0).sum()) < n:
            raise ValueError(f"only {int((p > 0).sum())} rows have a positive weight but n={n}; "
                             "lower n or give more rows a positive weight")
        idx = torch.multinomial(p, n, replacement=False, generator=gen)
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
