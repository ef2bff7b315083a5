"""Per-row weights for weighted picks: density (favours dense regions), uncertainty (favours rows between clusters)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import positive_int
from .geometry import check_clusters, sample_rows, unit_rows

__all__ = ["density_weights", "uncertainty_weights"]


def density_weights(embeddings: Any, k: int = 10, sample: int = 4096, seed: int = 0) -> torch.Tensor:
    """Per-row density in [0, 1]: (1 + mean cosine similarity to its k nearest rows) / 2.

    The neighbours are searched in a random sample of ``sample`` rows (all rows
    if there are fewer), which keeps the cost at N × sample dot products.
    """
    x = unit_rows(embeddings)
    n = x.shape[0]
    k = positive_int(k, "k")
    pool = sample_rows(x, sample, seed)
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
    from ..kmeans import kmeans

    x = unit_rows(embeddings)
    n_clusters = min(check_clusters(n_clusters), x.shape[0])
    if n_clusters < 2:
        return torch.ones(x.shape[0], device=x.device)
    centres, _ = kmeans(x, n_clusters, seed=seed, max_iter=30)
    d2 = (x.square().sum(1, keepdim=True) - 2 * x @ centres.T + centres.square().sum(1)).clamp_min_(0)
    two = d2.topk(2, dim=1, largest=False).values.sqrt()
    return torch.where(two[:, 1] > 0, two[:, 0] / two[:, 1].clamp_min(1e-12), torch.ones_like(two[:, 0]))


def resolve_weights(weights: Any, x: torch.Tensor, seed: int) -> torch.Tensor | None:
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
