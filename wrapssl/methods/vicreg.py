"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce & LeCun, 2022, arXiv:2105.04906)."""
from __future__ import annotations

from typing import Sequence

from ..augment import Views, byol_views
from ..heads import mlp
from ..losses import VICRegLoss
from .base import Method, mean_over_pairs, register_method


@register_method("vicreg")
class VICReg(Method):
    """Pull two views together while keeping every dimension's variance up and dimensions decorrelated.

    Knobs: ``sim_weight`` / ``var_weight`` / ``cov_weight`` (25 / 25 / 1): the
    paper's grid found equal invariance and variance weights best, with the
    covariance weight 1; raise ``var_weight`` if embeddings collapse.
    ``projector_dims`` (8192, 8192, 8192): wider helps, as for Barlow Twins.
    Variance and covariance use the global batch (gathered across processes).
    Paper: batch 2048, LARS lr 0.2·B/256 (base 0.2 at B=256), wd 1e-6.
    """

    uses_target = False

    def __init__(self, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                 projector_dims: Sequence[int] = (8192, 8192, 8192), eps: float = 1e-4):
        super().__init__()
        if min(sim_weight, var_weight, cov_weight) < 0:
            raise ValueError("VICReg's loss weights must be non-negative")
        if len(projector_dims) < 1:
            raise ValueError("projector_dims needs at least one width, e.g. (8192, 8192, 8192)")
        self.sim_weight, self.var_weight, self.cov_weight = float(sim_weight), float(var_weight), float(cov_weight)
        self.projector_dims, self.eps = tuple(int(d) for d in projector_dims), float(eps)
        self.criterion = VICRegLoss(self.sim_weight, self.var_weight, self.cov_weight, self.eps)

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, *self.projector_dims])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    def loss(self, online, target, step=0):
        return mean_over_pairs(online, self.criterion, "VICReg")
