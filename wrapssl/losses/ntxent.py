"""NT-Xent, SimCLR's contrastive loss over two or more views, negatives from the global batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed


def nt_xent(views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """NT-Xent: each sample must pick its other views among all views of the global batch.

    ``views`` holds V tensors (n, d), row i of each being one image. Anchors are
    this process's V·n rows; candidates are the V·N rows of the global batch
    (negatives from every process), minus the anchor itself. With V > 2 an
    anchor's loss averages over its V−1 positives. V = 2 is SimCLR's loss.
    """
    n_views, n = len(views), views[0].shape[0]
    local = [F.normalize(v.float(), dim=1) for v in views]
    everyone = [distributed.gather(z) for z in local]
    big_n = everyone[0].shape[0]
    logits = torch.cat(local) @ torch.cat(everyone).T / temperature      # (V·n, V·N)
    device = logits.device
    # column of image i of view v in the global batch: v·N + rank·n + i
    offsets = torch.arange(n_views, device=device) * big_n
    image = distributed.rank() * n + torch.arange(n, device=device)
    same_image = offsets[None, :] + image.repeat(n_views)[:, None]   # (V·n, V): every view of the anchor's image
    own = (offsets[:, None] + image[None, :]).reshape(-1)             # (V·n,): the anchor itself
    pos_sum = logits.gather(1, same_image).sum(1) - logits.gather(1, own[:, None]).squeeze(1)
    self_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, own[:, None], True)
    lse = logits.masked_fill(self_mask, float("-inf")).logsumexp(1)
    return (lse - pos_sum / (n_views - 1)).mean()


class NTXentLoss(nn.Module):
    """The normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020, arXiv:2002.05709, eq. 1).

    Each row of ``z1`` must pick the same row of ``z2`` (and vice versa) among the 2N − 1 other
    L2-normalised rows, by cosine similarity / ``temperature``. More than two views (``loss(z1,
    z2, z3)``, FastSiam's multi-view form) average over each anchor's positives. Under
    torch.distributed the candidates are the global batch (gathered with gradients), so W
    processes at batch N equal one at W·N.

    Inputs: two or more (n, d) tensors, row i of each the same image. Output: a scalar.
    ``temperature``: 0.5 suits small batches; the paper uses 0.1 at batch 4096.

    >>> loss = NTXentLoss(temperature=0.1)(z1, z2)
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; SimCLR uses 0.1-0.5")
        self.temperature = float(temperature)

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        if len(views) == 1 and isinstance(views[0], (list, tuple)):
            views = tuple(views[0])
        if len(views) < 2:
            raise ValueError(f"NT-Xent needs at least two views, got {len(views)}")
        return nt_xent(list(views), self.temperature)
