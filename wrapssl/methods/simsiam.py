"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He, 2021, arXiv:2011.10566)."""
from __future__ import annotations

import torch

from ..augment import Views, simclr_views
from ..heads import mlp
from ..losses import NegativeCosineLoss
from .base import Method, register_method


@register_method("simsiam")
class SimSiam(Method):
    """Siamese views, a predictor and a stop-gradient: no negatives, no EMA target.

    Knobs: ``projection_size`` (2048, 3-layer projector ending in a BN without
    affine) and ``prediction_hidden_size`` (512, the bottleneck that the paper
    finds important against collapse). Paper: SGD lr 0.05·B/256, wd 1e-4,
    momentum 0.9, batch 512; the predictor's lr is best kept fixed.
    """

    uses_target = False

    def __init__(self, projection_size: int = 2048, prediction_hidden_size: int = 512):
        super().__init__()
        self.projection_size, self.prediction_hidden_size = projection_size, prediction_hidden_size
        self.criterion = NegativeCosineLoss()

    def build(self, dim: int) -> None:
        d = self.projection_size
        self.projector = mlp([dim, d, d, d], last_bn=True, last_bn_affine=False)
        self.predictor = mlp([d, self.prediction_hidden_size, d])

    def default_views(self, image_size: int, channels: int = 3, scale: tuple[float, float] = (0.2, 1.0)) -> Views:
        """SimCLR's pair at half strength: jitter 0.4/0.4/0.4/0.1 at p=0.8, blur p=0.5; crops of area
        ``scale``, (0.2, 1.0) as in the paper's code (SimCLR's and BYOL's recipes use (0.08, 1.0))."""
        return simclr_views(image_size, strength=0.5, channels=channels, scale=scale)

    def loss(self, online, target, step=0):
        z1, z2 = online[0], online[1]
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        # symmetric negative cosine, each side against the other's stop-gradient projection
        return (self.criterion(p1, z2.detach()) + self.criterion(p2, z1.detach())) / 2
