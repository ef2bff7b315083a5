"""What the selection rooms share: unit rows, the counts they take, row blocks, neighbour cosines, cosine bounds.

Every selection works on L2-normalised rows; the distance between two rows is
the Euclidean distance of the unit vectors, sqrt(2 - 2·cos).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..checks import int_at_least, positive_int

# Float32 dot products of unit vectors are off by ~1e-6, so a distance near 0 can be off by
# ~1e-3 after the square root; pruning bounds keep this much slack so they never drop a true update.
DIST_SLACK = 1e-2
SIM_SLACK = 1e-4


def unit_rows(embeddings: Any) -> torch.Tensor:
    """Finite (N, D) float32 rows scaled to unit length (zero rows stay zero); a wrapssl ``Embeddings`` works too."""
    x = torch.as_tensor(unpack(embeddings, None)[0]).detach()
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("embeddings are empty; nothing to select from")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("embeddings contain NaN or inf; check the model's output (e.g. a diverged run)")
    return F.normalize(x, dim=1)


def unpack(embeddings: Any, files: Sequence[str] | None) -> tuple[Any, Sequence[str] | None]:
    """Raw embeddings and file names from a tensor or a wrapssl ``Embeddings``."""
    if hasattr(embeddings, "embeddings") and hasattr(embeddings, "files"):
        return embeddings.embeddings, files if files is not None else embeddings.files
    return embeddings, files


def check_n(n: Any, size: int) -> int:
    """``n`` as an int in [1, size], else a ValueError."""
    what = f"an int in [1, {size}] (the number of rows)"
    if int_at_least(n, "n", 1, what=what) > size:
        raise ValueError(f"n must be {what}, got {n!r}")
    return int(n)


def check_clusters(n_clusters: Any) -> int:
    """``n_clusters`` as an int >= 2, else a ValueError that says what it stands for."""
    return int_at_least(n_clusters, "n_clusters", 2, what="an int >= 2 (roughly the number of classes)")


def sample_rows(x: torch.Tensor, sample: Any, seed: int) -> torch.Tensor:
    """Indices of ``sample`` rows of x drawn without replacement (all rows, shuffled, if there are fewer)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return order[:positive_int(sample, "sample")].to(x.device)


def chunk_rows(cols: int, budget: int = 1 << 23) -> int:
    """Rows per block so that a (rows, cols) float32 block stays near ``budget`` elements (32 MB)."""
    return max(1, min(4096, budget // max(1, cols)))


def similarities(x: torch.Tensor, rows: torch.Tensor, self_match: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks (part of ``rows``, cosines of those rows with every row of x); a row's own cosine is -inf
    unless ``self_match``, so that it is never its own neighbour."""
    for part in rows.split(chunk_rows(x.shape[0])):
        sims = x[part] @ x.T
        if not self_match:
            sims[torch.arange(len(part), device=x.device), part] = -math.inf
        yield part, sims


def distance(sims: torch.Tensor) -> torch.Tensor:
    """Distances sqrt(2 - 2·cos) between unit vectors from their cosines (in place)."""
    return (2 - 2 * sims).clamp_min_(0).sqrt_()


def rotated_bounds(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
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
