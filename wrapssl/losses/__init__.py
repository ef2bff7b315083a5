"""Self-supervised losses as plain modules, one per file, each usable alone.

>>> from wrapssl.losses import NTXentLoss
>>> loss = NTXentLoss(temperature=0.1)(z1, z2)

Losses over the global batch (NT-Xent, InfoNCE, Barlow Twins, VICReg, DINO's center, SwAV's
Sinkhorn) gather across torch.distributed processes with correct gradients, so W processes at
batch N compute what one process computes at batch W·N.
"""
from .barlow_twins import BarlowTwinsLoss
from .dino import DINOLoss
from .infonce import InfoNCELoss
from .koleo import KoLeoLoss
from .mae import MAELoss
from .negative_cosine import NegativeCosineLoss, RegressionLoss
from .ntxent import NTXentLoss
from .swav import SwAVLoss, sinkhorn
from .vicreg import VICRegLoss

__all__ = ["BarlowTwinsLoss", "DINOLoss", "InfoNCELoss", "KoLeoLoss", "MAELoss", "NegativeCosineLoss",
           "NTXentLoss", "RegressionLoss", "SwAVLoss", "VICRegLoss", "sinkhorn"]
