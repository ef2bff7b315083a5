"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments.

Caron et al., 2020, arXiv:2006.09882.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..augment import Views, multicrop_views
from ..heads import mlp
from ..losses import SwAVLoss
from ..losses.swav import sinkhorn
from .base import Method, register_method


@register_method("swav")
class SwAV(Method):
    """Swapped prediction: each view predicts the balanced cluster code (Sinkhorn) of another view.

    Projections are L2-normalised and scored against ``n_prototypes`` (3000)
    prototypes, themselves L2-normalised at every step. Codes come from the
    first ``crops_for_assign`` (2) views with Sinkhorn–Knopp (``sinkhorn_epsilon``
    0.05, ``sinkhorn_iterations`` 3, sums over the global batch); every other
    view predicts them with a softmax at ``temperature`` (0.1).

    Views: 2 global crops + ``n_local`` (6) local crops of ``local_size``
    (default 96/224 of ``image_size``), crop scales (0.14, 1) and (0.05, 0.14).
    The net must accept the local size: ResNets do; torchvision ViTs do not.

    Knobs: ``queue_length`` (0 = off) keeps that many past projections of the
    global batch per assigned view and adds them to the Sinkhorn problem (every
    process holds the same queue and brings its 1/W share of it); turn it on
    when the global batch is small next to ``n_prototypes`` (the paper uses 3840
    for batch 256); entries are used as soon as they are filled.
    ``freeze_prototypes_steps`` (313, one ImageNet epoch at batch 4096) keeps the
    prototypes fixed at the start. Paper: batch 4096, LARS lr 4.8, wd 1e-6.
    """

    uses_target = False

    def __init__(self, n_prototypes: int = 3000, temperature: float = 0.1, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, projection_size: int = 128, projection_hidden_size: int = 2048,
                 n_local: int = 6, local_size: int | None = None, crops_for_assign: int = 2,
                 queue_length: int = 0, freeze_prototypes_steps: int = 313):
        super().__init__()
        if temperature <= 0 or sinkhorn_epsilon <= 0:
            raise ValueError("temperature and sinkhorn_epsilon must be positive (SwAV: 0.1 and 0.05)")
        if min(n_prototypes, crops_for_assign, sinkhorn_iterations) < 1:
            raise ValueError("n_prototypes, crops_for_assign and sinkhorn_iterations must be at least 1")
        if min(queue_length, n_local, freeze_prototypes_steps) < 0:
            raise ValueError("queue_length, n_local and freeze_prototypes_steps must be non-negative")
        self.n_prototypes, self.temperature = n_prototypes, float(temperature)
        self.sinkhorn_epsilon, self.sinkhorn_iterations = float(sinkhorn_epsilon), sinkhorn_iterations
        self.projection_size, self.projection_hidden_size = projection_size, projection_hidden_size
        self.n_local, self.local_size, self.crops_for_assign = n_local, local_size, crops_for_assign
        self.queue_length, self.freeze_prototypes_steps = queue_length, freeze_prototypes_steps
        self.criterion = SwAVLoss(self.temperature, self.sinkhorn_epsilon, sinkhorn_iterations, crops_for_assign)
        if queue_length:
            self.register_buffer("queue", torch.zeros(crops_for_assign, queue_length, projection_size))
            self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, self.projection_hidden_size, self.projection_size])
        self.prototypes = nn.Linear(self.projection_size, self.n_prototypes, bias=False)

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return multicrop_views(image_size, n_local=self.n_local, local_size=self.local_size,
                               global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), channels=channels)

    @torch.no_grad()
    def _enqueue(self, z: list[torch.Tensor]) -> None:
        """Push this step's normalised projections of the assigned views (global batch) to the front of the queue."""
        new = torch.stack([distributed.gather(v) for v in z]).to(self.queue.dtype)[:, -self.queue_length:]
        n = new.shape[1]
        self.queue.copy_(torch.cat([new, self.queue[:, :self.queue_length - n]], dim=1))
        self.queue_len.copy_(torch.clamp(self.queue_len + n, max=self.queue_length))

    def loss(self, online, target, step=0):
        if len(online) < max(2, self.crops_for_assign):
            raise ValueError(f"SwAV needs at least two views and one per assigned crop (crops_for_assign="
                             f"{self.crops_for_assign}), got {len(online)} views")
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        w = self.prototypes.weight
        if step < self.freeze_prototypes_steps:
            # a zero gradient rather than none: DDP must still see the prototypes take part
            w = w.detach() + 0 * w
        w = w.float()
        z = [F.normalize(v.float(), dim=1) for v in online]
        scores = [v @ w.T for v in z]
        n_assign = self.crops_for_assign
        # without a queue the loss makes the codes itself (Sinkhorn on this batch's scores)
        codes = [self._codes(scores[i].detach(), i, w.detach()) for i in range(n_assign)] if self.queue_length \
            else None
        loss = self.criterion(scores, codes)
        if self.queue_length and self.training:
            self._enqueue([v.detach() for v in z[:n_assign]])
        return loss

    def _codes(self, scores: torch.Tensor, i: int, w: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes for view ``i``'s scores with the queued projections in the problem."""
        # the queue is the same on every process: each brings its share, so the global problem holds it once
        world, rank = distributed.world_size(), distributed.rank()
        start, end = rank * self.queue_length // world, (rank + 1) * self.queue_length // world
        queued = self.queue[i, start:end].float() @ w.T
        slots = torch.arange(start, end, device=scores.device)
        valid = torch.cat([slots < self.queue_len, torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)])
        codes = sinkhorn(torch.cat([queued, scores]), self.sinkhorn_epsilon, self.sinkhorn_iterations, valid)
        return codes[-scores.shape[0]:]
