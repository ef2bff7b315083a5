"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., 2021, arXiv:2103.03230)."""
from __future__ import annotations

from typing import Sequence

from ..augment import Views, byol_views
from ..heads import mlp
from ..losses import BarlowTwinsLoss
from .base import Method, mean_over_pairs, register_method


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
        self.criterion = BarlowTwinsLoss(self.lambd)

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, *self.projector_dims])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    def loss(self, online, target, step=0):
        return mean_over_pairs(online, self.criterion, "Barlow Twins")
