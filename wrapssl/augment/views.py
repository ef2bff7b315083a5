"""View recipes: each view a kornia AugmentationSequential of wrapssl's ops, and the methods' pairs and multi-crops."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from kornia import augmentation as K
from torch import nn

from ..checks import int_at_least, non_negative_int, positive_int
from .ops import ColorJitter, RandomGaussianBlur, RandomGrayscale, RandomOp, RandomResizedCrop, RandomSolarize


def blur_kernel(size: int) -> int:
    """An odd Gaussian kernel about 10% of the image side (23 at 224, as in SimCLR/BYOL)."""
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def sequence(*ops: nn.Module) -> K.AugmentationSequential:
    """``ops`` as a kornia AugmentationSequential that keeps no reference to its last output image."""
    seq = K.AugmentationSequential(*ops)
    seq.disable_features = True  # kornia would otherwise cache the last output for .show(), holding its memory
    return seq


def view_transform(size: int, scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5,
                   jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
                   gray_p: float = 0.2, blur_p: float = 1.0, sigma: tuple[float, float] = (0.1, 2.0),
                   solarize_p: float = 0.0, channels: int = 3) -> K.AugmentationSequential:
    """One view's random transform as a kornia AugmentationSequential; parameters are drawn per sample.

    The first op is the random resized crop (with the horizontal flip folded in). Crop, flip,
    blur and solarize apply to every channel. Colour jitter and random grayscale are RGB ops:
    for ``channels=1`` the jitter acts through brightness and contrast only and there is no
    grayscale (both as torchvision on grey images); other channel counts get neither.
    """
    channels = positive_int(channels, "channels (the images' channel count)")
    ops: list[nn.Module] = [RandomResizedCrop(size, scale=scale, flip_p=flip_p)]
    if jitter_p > 0 and channels in (1, 3):
        ops.append(ColorJitter(*jitter, p=jitter_p))
    if gray_p > 0 and channels == 3:
        ops.append(RandomGrayscale(p=gray_p))
    if blur_p > 0:
        ops.append(RandomGaussianBlur(blur_kernel(size), sigma, p=blur_p))
    if solarize_p > 0:  # fixed threshold 0.5, as in BYOL
        ops.append(RandomSolarize(0.5, p=solarize_p))
    return sequence(*ops)


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


def runs_on_grey(views: nn.Module) -> bool:
    """True if grey images may go through ``views`` at one channel and be repeated after, for the same views.

    wrapssl's own ops treat a grey image as torchvision treats its RGB repetition and draw
    the same parameters at any channel count; a recipe made only of them (in any containers)
    qualifies, one with another op or a plain callable does not.
    """
    return all(isinstance(m, (RandomOp, nn.Sequential, nn.ModuleList, Views)) for m in views.modules())


def byol_views(image_size: int, channels: int = 3, scale: tuple[float, float] = (0.08, 1.0)) -> Views:
    """BYOL's asymmetric pair: blur p=1.0 / 0.1, solarize p=0 / 0.2 (Grill et al. 2020, table 6).

    ``scale`` is the area range of the random resized crops (raise the minimum for small images).
    """
    return Views([view_transform(image_size, scale=scale, blur_p=1.0, solarize_p=0.0, channels=channels),
                  view_transform(image_size, scale=scale, blur_p=0.1, solarize_p=0.2, channels=channels)])


def simclr_views(image_size: int, strength: float = 1.0, channels: int = 3,
                 scale: tuple[float, float] = (0.08, 1.0), n_views: int = 2, n_local: int = 0,
                 local_size: int | None = None, local_scale: tuple[float, float] = (0.05, 0.4)) -> Views:
    """SimCLR's symmetric views: colour jitter 0.8s/0.8s/0.8s/0.2s at p=0.8, blur p=0.5 (Chen et al. 2020).

    ``scale`` is the area range of the random resized crops (raise the minimum for small images).
    ``n_views`` global views (2: SimCLR's pair; more as in FastSiam) and ``n_local`` small crops of
    ``local_size`` (default 96/224 of ``image_size``) over ``local_scale`` of the area, with the same
    colour recipe; the global views come first (``Views.n_global``).
    """
    n_views = int_at_least(n_views, "n_views", 1, what="a whole number >= 1 (2 is SimCLR's pair)")
    n_local = non_negative_int(n_local, "n_local")
    s = strength
    one = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), blur_p=0.5, channels=channels)
    local_size = local_size or max(8, round(image_size * 96 / 224))
    return Views([view_transform(image_size, scale=scale, **one) for _ in range(n_views)]
                 + [view_transform(local_size, scale=local_scale, **one) for _ in range(n_local)], n_global=n_views)


def multicrop_views(image_size: int, n_local: int = 6, local_size: int | None = None,
                    global_scale: tuple[float, float] = (0.4, 1.0),
                    local_scale: tuple[float, float] = (0.05, 0.4), channels: int = 3) -> Views:
    """Two BYOL-style global crops plus ``n_local`` small crops (Caron et al. 2021, DINO)."""
    local_size = local_size or max(8, round(image_size * 96 / 224))
    g = [view_transform(image_size, scale=global_scale, blur_p=1.0, solarize_p=0.0, channels=channels),
         view_transform(image_size, scale=global_scale, blur_p=0.1, solarize_p=0.2, channels=channels)]
    loc = [view_transform(local_size, scale=local_scale, blur_p=0.5, channels=channels) for _ in range(n_local)]
    return Views(g + loc, n_global=2)


def set_crop_scale(views: Views, scale: tuple[float, float], global_only: bool = True) -> None:
    """Set the area range of the random resized crops of ``views`` (of the global views only by default).

    Local crops of multi-crop recipes keep their own, smaller range unless ``global_only=False``.
    """
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise TypeError(f"crop scale must be a pair (min, max) of area fractions such as (0.25, 1.0), "
                        f"got {scale!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must be (min, max) area fractions with 0 < min <= max <= 1, such as "
                         f"(0.25, 1.0) (torchvision's default is (0.08, 1.0)), got {tuple(scale)}")
    chosen = list(views.transforms)[:views.n_global] if global_only else list(views.transforms)
    crops = [op for view in chosen for op in view.modules() if isinstance(op, RandomResizedCrop)]
    if not crops:
        raise ValueError("these views have no wrapssl RandomResizedCrop to set the crop scale of; "
                         "set the scale inside your own augmentation instead")
    for op in crops:
        op.scale = (lo, hi)
