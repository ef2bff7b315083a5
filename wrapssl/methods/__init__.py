"""Self-supervised methods, one per file; importing this package registers them all."""
from .barlow_twins import BarlowTwins
from .base import EncoderSpec, Method, TeacherRequest, available_methods, get_method, register_method
from .byol import BYOL as BYOLMethod
from .dino import DINO
from .distill import Distill
from .mae import MAE
from .moco import MoCo
from .nnclr import NNCLR
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV
from .vicreg import VICReg

__all__ = ["Method", "EncoderSpec", "TeacherRequest", "available_methods", "get_method", "register_method", "BYOLMethod", "SimSiam",
           "SimCLR", "MoCo", "BarlowTwins", "VICReg", "DINO", "NNCLR", "SwAV", "MAE", "Distill"]
