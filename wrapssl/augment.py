"""Augmentation recipes on the batch's device (kornia, random parameters per sample) and input checks."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from kornia import augmentation as K
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(images: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Checked float (B,C,H,W) in [0,1] with ``channels`` channels from uint8 or float images."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B,C,H,W), got {type(images).__name__}; "
                        "convert PIL images with torchvision.transforms.functional.pil_to_tensor")
    if images.ndim != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape (B,C,H,W), got {tuple(images.shape)}{hint}")
    c = images.shape[1]
    if c not in (1, channels):
        raise ValueError(f"images have {c} channels but the net takes {channels}; pass 1-channel or "
                         f"{channels}-channel images (drop an alpha channel with images[:, :3]), or set "
                         f"Learner(channels={c}) if the net was built for {c}")
    if images.dtype == torch.uint8:
        x = images.float().div_(255)
    elif images.is_floating_point():
        x = images.float()
        # one host sync for both checks; uint8 input (the Trainer's path) never pays it
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError("images contain NaN or inf; check the data loader and any preprocessing")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0,1], got values in [{lo:.3g}, {hi:.3g}]; "
                             "remove Normalize from your loader (wrapssl normalises itself) or pass uint8")
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    if c == 1 and channels != 1:
        x = x.expand(-1, channels, -1, -1)
    return x


class Normalize(nn.Module):
    """Per-channel (x - mean) / std; an identity when mean is None."""

    def __init__(self, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD):
        super().__init__()
        self.enabled = mean is not None
        m = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"normalisation has {self.mean.shape[1]} channels, images have {x.shape[1]}")
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation (for showing views)."""
        return x * self.std + self.mean if self.enabled else x


def blur_kernel(size: int) -> int:
    """An odd Gaussian kernel about 10% of the image side (23 at 224, as in SimCLR/BYOL)."""
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def view_transform(size: int, scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5,
                   jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
                   gray_p: float = 0.2, blur_p: float = 1.0, sigma: tuple[float, float] = (0.1, 2.0),
                   solarize_p: float = 0.0, channels: int = 3) -> nn.Sequential:
    """One view's random transform; every random parameter is drawn per sample."""
    ops: list[nn.Module] = [K.RandomResizedCrop((size, size), scale=scale, p=1.0)]
    if flip_p > 0:
        ops.append(K.RandomHorizontalFlip(p=flip_p))
    if channels == 3 and jitter_p > 0:
        ops.append(K.ColorJitter(*jitter, p=jitter_p))
    if channels == 3 and gray_p > 0:
        ops.append(K.RandomGrayscale(p=gray_p))
    if blur_p > 0:
        k = blur_kernel(size)
        ops.append(K.RandomGaussianBlur((k, k), sigma, p=blur_p))
    if solarize_p > 0:  # fixed threshold 0.5, as in BYOL
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))
    return nn.Sequential(*ops)


class Views(nn.Module):
    """A list of view transforms; the first ``n_global`` views are global (they also feed the target)."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]], n_global: int | None = None):
        super().__init__()
        if len(transforms) < 2:
            raise ValueError("a self-supervised recipe needs at least two views")
        self.transforms = nn.ModuleList(t if isinstance(t, nn.Module) else _Fn(t) for t in transforms)
        self.n_global = len(transforms) if n_global is None else n_global
        if not 1 <= self.n_global <= len(transforms):
            raise ValueError(f"n_global must be in 1..{len(transforms)}, got {n_global}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [t(x) for t in self.transforms]


class _Fn(nn.Module):
    """Wraps a plain callable so it can sit in a ModuleList."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def byol_views(image_size: int, channels: int = 3) -> Views:
    """BYOL's asymmetric pair: blur p=1.0 / 0.1, solarize p=0 / 0.2 (Grill et al. 2020, table 6)."""
    return Views([view_transform(image_size, blur_p=1.0, solarize_p=0.0, channels=channels),
                  view_transform(image_size, blur_p=0.1, solarize_p=0.2, channels=channels)])


def simclr_views(image_size: int, strength: float = 1.0, channels: int = 3) -> Views:
    """SimCLR's symmetric pair: colour jitter 0.8s/0.8s/0.8s/0.2s at p=0.8, blur p=0.5 (Chen et al. 2020)."""
    s = strength
    one = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), blur_p=0.5, channels=channels)
    return Views([view_transform(image_size, **one), view_transform(image_size, **one)])


def multicrop_views(image_size: int, n_local: int = 6, local_size: int | None = None,
                    global_scale: tuple[float, float] = (0.4, 1.0),
                    local_scale: tuple[float, float] = (0.05, 0.4), channels: int = 3) -> Views:
    """Two BYOL-style global crops plus ``n_local`` small crops (Caron et al. 2021, DINO)."""
    local_size = local_size or max(8, round(image_size * 96 / 224))
    g = [view_transform(image_size, scale=global_scale, blur_p=1.0, solarize_p=0.0, channels=channels),
         view_transform(image_size, scale=global_scale, blur_p=0.1, solarize_p=0.2, channels=channels)]
    loc = [view_transform(local_size, scale=local_scale, blur_p=0.5, channels=channels) for _ in range(n_local)]
    return Views(g + loc, n_global=2)


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize (B,C,H,W) to image_size × image_size unless it already is."""
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
