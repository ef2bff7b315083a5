"""DINO's cross-entropy between a centred, sharpened teacher and a student, with the teacher's center."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Mean cross-entropy H(teacher_i, student_j) over all pairs with j ≠ i (teacher on global views only)."""
    log_p = torch.stack([F.log_softmax(s.float() / student_temp, dim=-1) for s in student])    # (V, n, K)
    q = torch.stack([F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher])  # (G, n, K)
    # Σ_{j≠i} log p_j = Σ_j log p_j − log p_i: all pairs at the cost of one sum
    others = log_p.sum(0, keepdim=True) - log_p[:len(teacher)]
    n_pairs = len(teacher) * (len(student) - 1)
    return -(q * others).sum(-1).mean(-1).sum() / n_pairs


class DINOLoss(nn.Module):
    """DINO's loss (Caron et al., 2021, arXiv:2104.14294, eq. 3 and Algorithm 1), which owns the center.

    ``forward(student, teacher, teacher_temp)``: ``student`` holds V (n, K) outputs (global
    views first, then local crops), ``teacher`` G ≤ V (n, K) outputs of the global views. The
    teacher's softmax at ``teacher_temp`` (of its outputs minus ``center``) is the target of the
    student's softmax at ``student_temp`` for every pair of different views; the loss is the
    mean cross-entropy over those G·(V − 1) pairs. The teacher gets no gradient.

    In training mode each call then moves the ``center`` buffer (1, K) towards the mean teacher
    output of the global batch (all-reduced across processes), with ``center_momentum`` (0.9):
    the centering that keeps the teacher from collapsing to one dimension. The teacher
    temperature is the caller's schedule (DINO: 0.04 warming up to 0.07; above 0.07 is unstable).

    >>> criterion = DINOLoss(out_dim=65536)
    >>> loss = criterion([s1, s2, *local], [t1, t2], teacher_temp=0.04)
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive (DINO uses 0.1), got {student_temp}")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must lie in [0, 1], got {center_momentum}")
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        if len(student) < 2 or len(student) < len(teacher):
            raise ValueError(f"DINO needs at least two views and a student output for every teacher view, "
                             f"got {len(student)} student and {len(teacher)} teacher views")
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be positive (DINO uses 0.04-0.07), got {teacher_temp}")
        teacher = [t.detach() for t in teacher]
        loss = dino_loss(student, teacher, self.center, self.student_temp, teacher_temp)
        if self.training:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        """EMA of the center towards the mean teacher output over the global batch."""
        t = torch.cat(teacher).float()
        batch_mean = distributed.all_reduce_sum(t.sum(0, keepdim=True)) / (t.shape[0] * distributed.world_size())
        self.center.lerp_(batch_mean.to(self.center.dtype), 1 - self.center_momentum)
