"""SwAV's swapped prediction of balanced cluster codes, with the Sinkhorn-Knopp step that makes the codes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft codes (n, K) whose rows sum to 1 and whose prototypes share the global batch equally.

    ``scores`` (n, K) are cosine similarities of this process's samples to K
    prototypes. Sinkhorn–Knopp alternates normalising prototype sums (summed
    over every process) and sample sums. ``valid`` (n,) bool marks which rows
    take part (the rest get zero codes), for a partly filled queue.
    """
    # scores are cosines ≤ 1: shifting by the bound keeps exp in range and cancels in the normalisation
    q = torch.exp((scores.float() - 1) / epsilon).T                       # (K, n)
    if valid is not None:
        q = q * valid[None, :].to(q.dtype)
        n_total = distributed.all_reduce_sum(valid.sum().to(q.dtype))
    else:
        n_total = scores.shape[0] * distributed.world_size()
    k = q.shape[0]
    tiny = torch.finfo(q.dtype).tiny
    q = q / distributed.all_reduce_sum(q.sum())
    for _ in range(iterations):
        # each prototype gets 1/K of the mass, then each sample 1/B
        q = q / distributed.all_reduce_sum(q.sum(1, keepdim=True)).clamp_min(tiny) / k
        q = q / q.sum(0, keepdim=True).clamp_min(tiny) / n_total
    return (q * n_total).T


class SwAVLoss(nn.Module):
    """SwAV's swapped prediction (Caron et al., 2020, arXiv:2006.09882, eq. 1-3).

    ``forward(scores, codes=None)``: ``scores`` holds V ≥ 2 tensors (n, K), each view's cosine
    similarities to K prototypes (L2-normalised projections against L2-normalised prototypes).
    The first ``crops_for_assign`` (2) views get a code: ``codes`` when given (e.g. computed with
    a queue of past projections), else ``sinkhorn`` of their scores (``sinkhorn_epsilon`` 0.05,
    ``sinkhorn_iterations`` 3, prototype sums over the global batch). Every other view predicts
    each code with a softmax of its scores at ``temperature`` (0.1); the loss is the mean
    cross-entropy over those (code, view) pairs. Codes carry no gradient. Output: a scalar.

    >>> loss = SwAVLoss()([z1 @ prototypes.T, z2 @ prototypes.T])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 crops_for_assign: int = 2):
        super().__init__()
        if temperature <= 0 or sinkhorn_epsilon <= 0:
            raise ValueError("temperature and sinkhorn_epsilon must be positive (SwAV: 0.1 and 0.05)")
        if min(crops_for_assign, sinkhorn_iterations) < 1:
            raise ValueError("crops_for_assign and sinkhorn_iterations must be at least 1")
        self.temperature, self.sinkhorn_epsilon = float(temperature), float(sinkhorn_epsilon)
        self.sinkhorn_iterations, self.crops_for_assign = int(sinkhorn_iterations), int(crops_for_assign)

    def forward(self, scores: list[torch.Tensor], codes: list[torch.Tensor] | None = None) -> torch.Tensor:
        n_assign = self.crops_for_assign
        if len(scores) < max(2, n_assign):
            raise ValueError(f"SwAV needs at least two views and one per assigned crop (crops_for_assign="
                             f"{n_assign}), got {len(scores)} views")
        if codes is not None and len(codes) != n_assign:
            raise ValueError(f"SwAV got {len(codes)} codes for crops_for_assign={n_assign}")
        log_p = torch.stack([F.log_softmax(s / self.temperature, dim=1) for s in scores])  # (V, n, K)
        total_log_p = log_p.sum(0)
        loss = 0.0
        for i in range(n_assign):
            code = codes[i].detach() if codes is not None else \
                sinkhorn(scores[i].detach(), self.sinkhorn_epsilon, self.sinkhorn_iterations)
            # every other view predicts view i's code
            loss = loss - (code * (total_log_p - log_p[i])).sum(1).mean() / (len(scores) - 1)
        return loss / n_assign
