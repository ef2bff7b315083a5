"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers.

Chen, Xie & He, 2021, arXiv:2104.02057.
"""
from __future__ import annotations

import torch

from ..augment import Views, byol_views
from ..heads import mlp
from ..losses import InfoNCELoss
from .base import Method, register_method


@register_method("moco")
class MoCo(Method):
    """MoCo v3: an online query (projector + predictor) must identify its EMA key among the batch's keys.

    Knobs: ``temperature`` (1.0 for ResNets; use 0.2 for ViTs); the loss is
    scaled by 2τ as in the paper, so its size barely depends on τ.
    ``projection_hidden_size`` (4096), ``projection_size`` (256) and
    ``projection_layers`` (3; the official ResNet recipe uses 2) size the
    projector, which ends in a BN without affine; ``prediction_hidden_size``
    (4096) sizes the 2-layer predictor. The key encoder momentum starts at 0.99
    and rises to 1.0 on a cosine when the Learner knows ``total_steps``. Keys
    are gathered from every process, so negatives cover the global batch.
    Paper: batch 4096; ResNet: LARS lr 0.6·B/256 for 100 epochs (0.3 for longer
    runs), wd 1e-6; ViT: AdamW lr 1.5e-4·B/256, wd 0.1, τ 0.2. For many
    processes convert the heads' BatchNorms to SyncBatchNorm.
    """

    uses_target = True
    momentum = 0.99

    def __init__(self, temperature: float = 1.0, projection_size: int = 256, projection_hidden_size: int = 4096,
                 projection_layers: int = 3, prediction_hidden_size: int = 4096):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; MoCo v3 uses 1.0 (ResNet) or 0.2 (ViT)")
        if projection_layers < 2:
            raise ValueError(f"projection_layers must be at least 2, got {projection_layers}")
        self.temperature = float(temperature)
        self.criterion = InfoNCELoss(self.temperature)
        self.projection_size, self.projection_hidden_size = projection_size, projection_hidden_size
        self.projection_layers, self.prediction_hidden_size = projection_layers, prediction_hidden_size

    def build(self, dim: int) -> None:
        hidden = [self.projection_hidden_size] * (self.projection_layers - 1)
        self.projector = mlp([dim, *hidden, self.projection_size], last_bn=True, last_bn_affine=False)
        self.predictor = mlp([self.projection_size, self.prediction_hidden_size, self.projection_size])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    def loss(self, online, target, step=0):
        if target is None:
            raise ValueError("MoCo needs the momentum encoder's keys; keep uses_target=True")
        if len(online) < 2:
            raise ValueError(f"MoCo needs at least two views, got {len(online)}")
        queries = self.predictor(torch.cat(online)).chunk(len(online))
        # every online view queries every other global view's key: ctr(q1,k2) + ctr(q2,k1) for two views
        pairs = [(i, j) for i in range(len(queries)) for j in range(len(target)) if i != j]
        total = sum(self.criterion(queries[i], target[j]) for i, j in pairs)
        return total * (2 * self.temperature) * 2 / len(pairs)
