"""Label-free health of a representation: effective rank (RankMe), spread of normalised embeddings, collapse.

Users of self-supervised learning rarely have labels to watch. Two numbers
computed on the embeddings of a fixed batch of images tell whether training
is spreading the images out or collapsing them onto a few directions:

- ``rankme``: the effective rank of the embedding matrix (Garrido et al.,
  2023, "RankMe"), between 1 (every image maps to one direction) and
  min(N, D). It tracks downstream accuracy well across methods.
- ``normalized_std``: the standard deviation over images of the
  L2-normalised embeddings, averaged over dimensions (the collapse monitor
  of SimSiam, Chen & He 2021): about 1/sqrt(D) when the embeddings spread
  over the sphere, 0 when every image gets the same vector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .backbone import Embedder
__all__ = ["rankme", "normalized_std", "Health", "health", "probe_images", "embedding_health", "COLLAPSE_RANK",
           "COLLAPSE_STD", "HEALTH_IMAGES"]

# A run is called collapsed when its embeddings have an effective rank below COLLAPSE_RANK, or when their
# normalised spread is below COLLAPSE_STD / sqrt(D). Healthy runs of every method on the main job stay far
# above both (benchmarks/RESULTS.md, "Health signals"); a constant net scores rank 1 and spread 0.
COLLAPSE_RANK = 2.0
COLLAPSE_STD = 0.03


def _matrix(embeddings: Any) -> torch.Tensor:
    """A finite float64 (N, D) matrix with N >= 2, or a ValueError."""
    x = torch.as_tensor(embeddings).detach()
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (N, D) with N >= 2 images, got {tuple(x.shape)}")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("embeddings contain NaN or inf; the run has diverged (lower the learning rate)")
    return x


def rankme(embeddings: Any, eps: float = 1e-7) -> float:
    """Effective rank of an (N, D) embedding matrix: exp of the entropy of its normalised singular values.

    p_k = σ_k / Σσ + eps; RankMe = exp(−Σ p_k log p_k) (Garrido et al., 2023, eq. 1). Uncentred, as
    in the paper. 1 for a rank-one (collapsed) matrix, min(N, D) when all singular values are equal.
    """
    x = _matrix(embeddings)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:  # all-zero embeddings: nothing is spread
        return 1.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def normalized_std(embeddings: Any) -> float:
    """Mean over dimensions of the std over images of the L2-normalised embeddings (SimSiam's monitor).

    About 1/sqrt(D) when the embeddings spread over the unit sphere; 0 when they are all the same.
    """
    x = F.normalize(_matrix(embeddings), dim=1)
    return float(x.std(dim=0, unbiased=False).mean())


@dataclass
class Health:
    """Label-free signals of one set of embeddings and whether they say the representation collapsed."""

    rank: float
    std: float
    dim: int

    @property
    def collapsed(self) -> bool:
        """True when the embeddings have (almost) one direction or (almost) no spread."""
        return self.rank < COLLAPSE_RANK or self.std < COLLAPSE_STD / math.sqrt(self.dim)

    def warning(self, step: int | None = None) -> str | None:
        """A one-paragraph warning with what to try, or None when healthy."""
        if not self.collapsed:
            return None
        at = f" at step {step}" if step is not None else ""
        return (f"the representation looks collapsed{at}: effective rank {self.rank:.2f} (of at most "
                f"{self.dim}) and normalised spread {self.std:.4f} (about {1 / math.sqrt(self.dim):.4f} when the "
                "embeddings are spread out). Every image is mapped to nearly the same vector, so the backbone is "
                "not learning. Try a lower learning rate or a longer warm-up, check that the method keeps its "
                "stop-gradient/EMA target, or switch to a contrastive method (simclr) that cannot collapse this way.")


def health(embeddings: Any) -> Health:
    """The health signals (RankMe, normalised spread) of an (N, D) embedding matrix."""
    x = _matrix(embeddings)
    return Health(rank=rankme(x), std=normalized_std(x), dim=x.shape[1])


HEALTH_IMAGES = 512  # images in the fixed probe batch: enough for a stable rank of a 128-2048-d embedding


def probe_images(dataset: Any, n: int = HEALTH_IMAGES) -> torch.Tensor:
    """A fixed batch of ``n`` images spread evenly over ``dataset`` (items are images or (image, label))."""
    size = len(dataset)
    if size < 2:
        raise ValueError(f"the health probe needs at least 2 images, the dataset has {size}")
    picks = torch.linspace(0, size - 1, min(n, size)).round().long().unique().tolist()
    items = [dataset[i] for i in picks]
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])


@torch.no_grad()
def embedding_health(embedder: "Embedder", images: torch.Tensor, batch_size: int = 256) -> Health:
    """The health of an ``Embedder``'s representations of ``images`` (no augmentation, no gradient, BN statistics
    untouched). A ``Learner`` serves too: its ``embed`` is its Embedder's, after reading ``float_input``."""
    chunks = [embedder.embed(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return health(torch.cat(chunks).float().cpu())
