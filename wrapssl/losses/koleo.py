"""KoLeo, DINOv2's regulariser that spreads a batch's features evenly over the sphere."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo entropy estimate (Sablayrolles et al., 2019; DINOv2): −mean log of each L2-normalised row's distance
    to its nearest other row. Minimising it spreads the batch's features evenly over the sphere."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():  # the neighbour is chosen without gradient; the distance to it carries one
        cos = x @ x.T
        cos.fill_diagonal_(-2.0)
        nearest = cos.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()


class KoLeoLoss(nn.Module):
    """The Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., 2019, arXiv:1806.03198; DINOv2,
    Oquab et al., 2023, arXiv:2304.07193, eq. 4): ``−mean_i log(‖x_i − x_nn(i)‖ + eps)`` of the
    L2-normalised rows, nn(i) the nearest other row (chosen without gradient).

    Input: (n, d) features, n ≥ 2, of this process's batch (as in DINOv2). Output: a scalar;
    lower when the rows spread out. DINOv2 weighs it 0.1 beside its main loss.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeo needs (n, d) features with n >= 2 rows, got shape {tuple(x.shape)}")
        return koleo_loss(x, self.eps)
