"""VICReg's variance-invariance-covariance loss, statistics over the global batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed


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


class VICRegLoss(nn.Module):
    """VICReg (Bardes, Ponce & LeCun, 2022, arXiv:2105.04906, eq. 6): ``λ·s + μ·v + ν·c``.

    s is the mean squared error of the two views' projections; v the mean hinge
    ``max(0, 1 − sqrt(Var(z_j) + ε))`` over dimensions, averaged over both views; c the sum of
    squared off-diagonal covariances divided by d, summed over both views. Statistics use the
    global batch (gathered across processes). Inputs: ``z1``, ``z2`` (n, d), n ≥ 2. Output: a
    scalar. Weights ``sim_weight`` / ``var_weight`` / ``cov_weight`` (25 / 25 / 1) are the paper's.

    >>> loss = VICRegLoss()(z1, z2)
    """

    def __init__(self, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                 eps: float = 1e-4):
        super().__init__()
        if min(sim_weight, var_weight, cov_weight) < 0:
            raise ValueError("VICReg's loss weights must be non-negative")
        self.sim_weight, self.var_weight, self.cov_weight = float(sim_weight), float(var_weight), float(cov_weight)
        self.eps = float(eps)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return vicreg_loss(z1, z2, self.sim_weight, self.var_weight, self.cov_weight, self.eps)
