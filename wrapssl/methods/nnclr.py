"""NNCLR: Nearest-Neighbor Contrastive Learning of Visual Representations (Dwibedi et al., 2021, arXiv:2104.14548)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed
from ..augment import Views, byol_views
from ..heads import mlp
from ..losses import InfoNCELoss
from .base import Method, register_method


@register_method("nnclr")
class NNCLR(Method):
    """Contrastive learning whose positive is the nearest neighbour of a view in a support set of past embeddings.

    For views a and b, the nearest neighbour NN(z_a) in the support set (a FIFO
    queue of L2-normalised projections from earlier steps) must pick the
    prediction p_b of the same image among the global batch's predictions, and
    p_b must pick NN(z_a) among all neighbours (the paper's symmetrised loss);
    both view orders are averaged. After the loss, the queue receives view 0's
    projections of the global batch (gathered across processes), so a batch
    never finds its own positives in it.

    Early steps: while the queue is empty a view's own projection stands in for
    its neighbour (SimCLR with a predictor); while it is partly filled, only the
    filled slots are searched, so no all-zero slot is ever a neighbour.

    Knobs: ``queue_size`` (98304; larger gives semantically closer neighbours,
    it must hold far more than one global batch), ``temperature`` (0.1),
    ``projection_size`` (256) / ``projection_hidden_size`` (2048) for the 3-layer
    projector, ``prediction_hidden_size`` (4096) for the predictor. Memory: the
    queue is ``queue_size × projection_size`` floats (100 MB by default).
    Paper: batch 4096 with LARS and a cosine schedule; as for SimCLR, start
    from lr 0.3·B/256 (LARS) or Adam 1e-3 for small batches.
    """

    uses_target = False

    def __init__(self, temperature: float = 0.1, queue_size: int = 98304, projection_size: int = 256,
                 projection_hidden_size: int = 2048, prediction_hidden_size: int = 4096):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; NNCLR uses 0.1")
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive (the paper uses 98304), got {queue_size}")
        self.temperature, self.queue_size = float(temperature), int(queue_size)
        self.criterion = InfoNCELoss(self.temperature)
        self.projection_size, self.projection_hidden_size = projection_size, projection_hidden_size
        self.prediction_hidden_size = prediction_hidden_size
        self.register_buffer("queue", torch.zeros(self.queue_size, projection_size))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))   # next slot to write
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))   # filled slots

    def build(self, dim: int) -> None:
        h, d = self.projection_hidden_size, self.projection_size
        self.projector = mlp([dim, h, h, d], last_bn=True)
        self.predictor = mlp([d, self.prediction_hidden_size, d])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    @torch.no_grad()
    def nearest_neighbours(self, z: torch.Tensor) -> torch.Tensor:
        """Each row's nearest filled queue entry by cosine similarity (zeros if the queue is empty)."""
        sims = F.normalize(z.float(), dim=1) @ self.queue.float().T
        filled = torch.arange(self.queue_size, device=z.device) < self.queue_len
        idx = sims.masked_fill(~filled, float("-inf")).argmax(1)
        return self.queue[idx].to(z.dtype)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write L2-normalised ``keys`` of the global batch into the FIFO queue."""
        keys = F.normalize(distributed.gather(keys.float()), dim=1)[-self.queue_size:]
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.queue_size
        self.queue.index_copy_(0, slots, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.queue_size)
        self.queue_len.copy_(torch.clamp(self.queue_len + keys.shape[0], max=self.queue_size))

    def loss(self, online, target, step=0):
        if len(online) < 2:
            raise ValueError("NNCLR needs at least two views")
        preds = self.predictor(torch.cat(online)).chunk(len(online))
        # no host sync: the empty-queue fallback is chosen on the device
        have_queue = self.queue_len > 0
        neighbours = [torch.where(have_queue, self.nearest_neighbours(z), F.normalize(z, dim=1)) for z in online]
        pairs = [(i, j) for i in range(len(online)) for j in range(len(online)) if i != j]
        nce = self.criterion
        total = sum(nce(neighbours[i], preds[j]) + nce(preds[j], neighbours[i]) for i, j in pairs)
        loss = total / (2 * len(pairs))
        if self.training:
            self.enqueue(online[0].detach())
        return loss
