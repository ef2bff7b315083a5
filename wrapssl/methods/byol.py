"""BYOL: Bootstrap Your Own Latent (Grill et al., 2020, arXiv:2006.07733)."""
from __future__ import annotations

import torch

from ..augment import Views, byol_views
from ..heads import mlp
from ..losses import RegressionLoss
from .base import Method, register_method


@register_method("byol")
class BYOL(Method):
    """An online network predicts an EMA target's projection of another view.

    Knobs: ``projection_size`` (256) and ``projection_hidden_size`` (4096) size the
    projector and predictor MLPs; ``use_momentum=False`` drops the EMA target and
    regresses onto the online network's own stop-gradient projection (the
    SimSiam variant, less memory, needs a predictor to avoid collapse). The
    target momentum starts at 0.996 and rises to 1.0 on a cosine when the Learner
    knows ``total_steps``; lower it (0.99) for short runs or small datasets.
    Paper batch 4096 with LARS lr 0.2·B/256; Adam 3e-4 works for small batches.
    """

    uses_target = True
    momentum = 0.996

    def __init__(self, projection_size: int = 256, projection_hidden_size: int = 4096, use_momentum: bool = True):
        super().__init__()
        self.projection_size, self.projection_hidden_size = projection_size, projection_hidden_size
        self.uses_target = bool(use_momentum)
        self.criterion = RegressionLoss()

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, self.projection_hidden_size, self.projection_size])
        self.predictor = mlp([self.projection_size, self.projection_hidden_size, self.projection_size])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    def loss(self, online, target, step=0):
        n = len(target) if target is not None else len(online)
        preds = self.predictor(torch.cat(online)).chunk(len(online))
        target = target if target is not None else [z.detach() for z in online[:n]]
        # every online view predicts every other global view's target
        pairs = [(i, j) for i in range(len(preds)) for j in range(n) if i != j]
        return sum(self.criterion(preds[i], target[j]) for i, j in pairs) * 2 / len(pairs)
