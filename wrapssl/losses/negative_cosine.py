"""Negative cosine similarity losses: BYOL's normalised regression (2 − 2·cos) and SimSiam's −cos."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 − 2·cos(p, z) per sample (the mean squared error of the L2-normalised vectors): shape (n,)."""
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


class RegressionLoss(nn.Module):
    """BYOL's loss (Grill et al., 2020, arXiv:2006.07733, eq. 2): the mean over samples of
    ``‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z)``.

    Inputs: predictions ``p`` (n, d) and targets ``z`` (n, d); the caller stops the target's gradient
    (an EMA target, or ``z.detach()``). Output: a scalar in [0, 4]. Also the distillation loss of
    SimReg (Navaneet et al., 2022).

    >>> loss = RegressionLoss()(predictor(online), target.detach())
    """

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return regression_loss(p, z).mean()


class NegativeCosineLoss(nn.Module):
    """SimSiam's loss (Chen & He, 2021, arXiv:2011.10566, eq. 1): ``−mean_i cos(p_i, z_i)``.

    Inputs: predictions ``p`` (n, d) and projections ``z`` (n, d); SimSiam passes ``z.detach()`` (the
    stop-gradient that keeps it from collapsing) and symmetrises over the two views. Output: a
    scalar in [−1, 1].
    """

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(p, z, dim=-1).mean()
