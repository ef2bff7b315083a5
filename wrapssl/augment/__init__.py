"""Augmentation on the batch's device: view recipes of kornia augmentations (fused kernels inside) and input checks.

- ``ops``: the random ops, subclasses of kornia's augmentation base classes;
- ``kernels``: their batched arithmetic (torchvision's semantics, a parameter per sample);
- ``views``: the methods' recipes (``Views`` of kornia ``AugmentationSequential`` views);
- ``inputs``: image checks, resizing and per-channel normalisation.
"""
from .inputs import (IMAGENET_MEAN, IMAGENET_STD, Normalize, estimate_normalization, normalization, resize,
                     to_float)
from .ops import ColorJitter, RandomGaussianBlur, RandomGrayscale, RandomOp, RandomResizedCrop, RandomSolarize
from .views import (Views, blur_kernel, byol_views, multicrop_views, runs_on_grey, sequence, set_crop_scale,
                    simclr_views, view_transform)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "estimate_normalization", "normalization", "resize",
           "to_float", "ColorJitter", "RandomGaussianBlur", "RandomGrayscale", "RandomOp", "RandomResizedCrop",
           "RandomSolarize", "Views", "blur_kernel", "byol_views", "multicrop_views", "runs_on_grey", "sequence",
           "set_crop_scale", "simclr_views", "view_transform"]
