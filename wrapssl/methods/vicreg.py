"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce & LeCun, 2022, arXiv:2105.04906)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import distributed
from ..augment import Views, byol_views
from ..heads import mlp
from .base import Method, mean_over_pairs, register_method


def _variance(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean hinge on each dimension's std reaching 1."""
    return F.relu(1 - torch.sqrt(z.var(0) + eps)).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariances, divided by the dimension."""
    z = z - z.mean(0)
    cov = z.T @ z / (z.shape[0] - 1)
    diag = torch.diagonal(cov)
    return (cov.pow(2).sum() - diag.pow(2).sum()) / z.shape[1]


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """λ·MSE(z1, z2) + μ·variance hinge + ν·covariance penalty, statistics over the global batch."""
    a, b = distributed.gather(z1.float()), distributed.gather(z2.float())
    invariance = F.mse_loss(a, b)
    variance = (_variance(a, eps) + _variance(b, eps)) / 2
    covariance = _covariance(a) + _covariance(b)
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance


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

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, *self.projector_dims])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    def loss(self, online, target, step=0):
        return mean_over_pairs(online, lambda a, b: vicreg_loss(a, b, self.sim_weight, self.var_weight,
                                                                self.cov_weight, self.eps), "VICReg")
