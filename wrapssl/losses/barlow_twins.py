"""Barlow Twins' redundancy-reduction loss on the cross-correlation of two views over the global batch."""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed


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


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins (Zbontar et al., 2021, arXiv:2103.03230, eq. 1): ``Σ_i (1 − C_ii)² + λ·Σ_{i≠j} C_ij²``.

    C (d, d) is the cross-correlation of the two views' projections, each standardised per
    dimension over the global batch (gathered across processes). Inputs: ``z1``, ``z2`` (n, d).
    Output: a scalar, 0 when C is the identity. ``lambd`` (0.0051) was tuned for d = 8192; scale
    it roughly as 1/d.

    >>> loss = BarlowTwinsLoss(lambd=0.0051)(z1, z2)
    """

    def __init__(self, lambd: float = 0.0051):
        super().__init__()
        if lambd < 0:
            raise ValueError(f"lambd must be non-negative, got {lambd}")
        self.lambd = float(lambd)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z1, z2, self.lambd)
