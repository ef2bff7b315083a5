"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., 2021, arXiv:2103.03230)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import distributed
from ..augment import Views, byol_views
from ..heads import mlp
from .base import Method, mean_over_pairs, register_method


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit (biased) variance per dimension over the batch: a BatchNorm without affine."""
    mean = z.mean(0, keepdim=True)
    var = z.var(0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij², C the cross-correlation over the global batch."""
    a = standardize(distributed.gather(z1.float()))
    b = standardize(distributed.gather(z2.float()))
    c = a.T @ b / a.shape[0]
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off


@register_method("barlow_twins")
class BarlowTwins(Method):
    """Make the cross-correlation of two views' projections the identity: invariance without redundancy.

    Knobs: ``lambd`` (0.0051) weighs the off-diagonal redundancy term against
    the diagonal invariance term; it was tuned for 8192 dimensions, scale it
    roughly as 1/d for other widths. ``projector_dims`` (8192, 8192, 8192) are
    the widths after the encoder; the last is the correlation size, and the
    paper finds wider is better. Statistics use the global batch (gathered
    across processes). Paper: batch 2048, LARS lr 0.2 (weights) / 0.0048
    (biases, BN); it works down to batch 256.
    """

    uses_target = False

    def __init__(self, lambd: float = 0.0051, projector_dims: Sequence[int] = (8192, 8192, 8192)):
        super().__init__()
        if lambd < 0:
            raise ValueError(f"lambd must be non-negative, got {lambd}")
        if len(projector_dims) < 1:
            raise ValueError("projector_dims needs at least one width, e.g. (8192, 8192, 8192)")
        self.lambd, self.projector_dims = float(lambd), tuple(int(d) for d in projector_dims)

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, *self.projector_dims])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    def loss(self, online, target, step=0):
        return mean_over_pairs(online, lambda a, b: barlow_twins_loss(a, b, self.lambd), "Barlow Twins")
