"""Find near-duplicates: pairs of rows above a cosine, and thresholds relative to the typical neighbour distance."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import positive_int
from .geometry import SIM_SLACK, distance, rotated_bounds, sample_rows, similarities, unit_rows

__all__ = ["near_duplicates", "nearest_neighbour_distance", "relative_threshold"]


def near_duplicates(embeddings: Any, threshold: float = 0.95, block_size: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (i, j), i < j, with cosine similarity >= threshold, and those similarities.

    Returns ``pairs`` (P, 2) long sorted by (i, j) and ``similarities`` (P,).
    Exact: two pruning rules discard only pairs that provably fall below the
    threshold. (1) Rows are sorted by their coordinate on the top principal
    axis; unit vectors with cosine >= t differ there by at most sqrt(2 - 2t),
    so each block of rows meets only a window of columns. (2) Within it, an
    upper bound on every cosine comes from a 32-dim matmul (see
    ``rotated_bounds``; for D > 48); only rows whose bound reaches the
    threshold get exact cosines. Memory stays at block_size × 8·block_size
    floats plus the pairs found. Zero rows match nothing. Pairs within ~1e-6
    of the threshold may go either way through float32 rounding.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}; near-duplicates usually sit above 0.9")
    block_size = positive_int(block_size, "block_size")
    x = unit_rows(embeddings)
    dev = x.device
    nonzero = (x.abs().sum(1) > 0).nonzero()[:, 0]  # a zero row has cosine 0 with everything
    x = x[nonzero]
    dim = x.shape[1]
    head, bound = rotated_bounds(x, dim if dim <= 48 else 31)
    order = head.argsort()
    head, bound, x, ids = head[order], bound[order].contiguous(), x[order].contiguous(), nonzero[order]
    reach = math.sqrt(max(0.0, 2 - 2 * threshold)) + SIM_SLACK
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
            rows = (upper.amax(1) >= threshold - SIM_SLACK).nonzero()[:, 0] + r0
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
    x = unit_rows(embeddings)
    n = x.shape[0]
    if n < 2:
        raise ValueError("need at least 2 embeddings to measure nearest-neighbour distances")
    best = [sims.amax(1) for _, sims in similarities(x, sample_rows(x, sample, seed))]
    return float(distance(torch.cat(best)).median())


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
