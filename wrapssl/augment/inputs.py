"""Input checks and normalisation: images to checked floats, resizing, per-channel statistics."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..checks import positive_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def _channel_advice(c: int, channels: int) -> str:
    """What to do when images have ``c`` channels and the net takes ``channels``."""
    if channels == 1 and c == 3:
        return ("convert them to grey (torchvision.transforms.v2.functional.rgb_to_grayscale), or wrap a net "
                "whose first layer takes 3 channels")
    fix = f"pass {channels}-channel images"
    if channels == 3:
        fix += " or grey ones (repeated to RGB)"
        if c == 4:
            fix += "; drop an alpha channel with images[:, :3]"
    return (f"{fix}, or wrap a net built for {c}-channel input: the Learner reads the channel count from the "
            "net's first layer")


def to_float(images: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Checked float (B,C,H,W) in [0,1] from uint8 or float images with the net's ``channels`` (grey: repeated to 3)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B,C,H,W), got {type(images).__name__}; "
                        "convert PIL images with torchvision.transforms.functional.pil_to_tensor")
    if images.ndim != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape (B,C,H,W), got {tuple(images.shape)}{hint}")
    c = images.shape[1]
    if c != channels and not (c == 1 and channels == 3):
        raise ValueError(f"images have {c} channel{'s' * (c != 1)} but the net takes {channels}; "
                         f"{_channel_advice(c, channels)}")
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
    if c != channels:
        x = x.expand(-1, channels, -1, -1)
    return x


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize (B,C,H,W) to image_size × image_size unless it already is."""
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


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


def normalization(channels: int, normalize: tuple[Sequence[float], Sequence[float]] | None
                  = (IMAGENET_MEAN, IMAGENET_STD)) -> Normalize:
    """The input normalisation a net of ``channels`` channels is trained with (None: identity).

    ImageNet's RGB statistics serve RGB nets and, averaged, grey ones; any other channel
    count needs its own (mean, std), one value per channel (or one for all).
    """
    if normalize is None:
        return Normalize(None, None)
    try:
        mean, std = (tuple(float(v) for v in s) for s in normalize)
    except (TypeError, ValueError):
        raise TypeError(f"normalize must be (mean, std), two sequences of per-channel floats, or None; "
                        f"got {normalize!r}") from None
    if len(mean) != len(std):
        raise ValueError(f"normalize has {len(mean)} means but {len(std)} stds; give one of each per channel")
    if channels == 1 and len(mean) == 3:  # grey images: the mean of the per-channel statistics
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) not in (1, channels):
        if len(mean) == 3:  # ImageNet's, the default, or other RGB statistics
            raise ValueError(
                f"{channels}-channel images have no default normalisation (ImageNet's statistics are RGB's); pass "
                f"normalize=(mean, std) with {channels} values each, measured on your data with "
                "wrapssl.augment.estimate_normalization(images), or normalize=None to skip it")
        raise ValueError(f"normalize has {len(mean)} values per statistic but the images have {channels} "
                         f"channels; give {channels} means and {channels} stds")
    if min(std) <= 0:
        raise ValueError(f"normalisation stds must be > 0, got {std}; a channel with std 0 is constant: "
                         "drop it, or give it std 1")
    return Normalize(mean, std)


def _image_of(item: object, index: int) -> torch.Tensor:
    """The (C,H,W) image tensor of a dataset item (an image, or a tuple whose first element is one)."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(f"dataset item {index} is not a (C,H,W) image tensor (got {got}); wrap the dataset with "
                        "wrapssl.data.as_uint8_dataset, or pass a (N,C,H,W) tensor of images")
    return image


@torch.no_grad()
def estimate_normalization(images_or_dataset: torch.Tensor | Dataset, max_images: int = 10_000,
                           batch_size: int = 256) -> Stats:
    """Per-channel (mean, std) of images in [0,1] (uint8 counts as /255), from up to ``max_images`` of them.

    Takes a (N,C,H,W) tensor or a dataset of (C,H,W) images (or (image, label) pairs);
    images are taken evenly spaced over the whole set. Pass the result as
    ``Learner(normalize=...)`` for data that is not RGB.
    """
    max_images = positive_int(max_images, "max_images")
    data = images_or_dataset
    if isinstance(data, torch.Tensor) and data.ndim != 4:
        raise ValueError(f"images must have shape (N,C,H,W), got {tuple(data.shape)}")
    n = len(data)
    if n == 0:
        raise ValueError("no images to estimate the normalisation from")
    picks = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique().tolist()
    total = sq = None
    count = 0
    for start in range(0, len(picks), batch_size):
        chunk = picks[start:start + batch_size]
        if isinstance(data, torch.Tensor):
            batches = [data[chunk]]
        else:  # datasets may hold images of different sizes: one at a time
            batches = [_image_of(data[i], i).unsqueeze(0) for i in chunk]
        for b in batches:
            # uint8 divided in float64: the statistics as exact as the pixels
            x = b.double().div_(255) if b.dtype == torch.uint8 else to_float(b, b.shape[1]).double()
            s, s2 = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
            if total is not None and s.shape != total.shape:
                raise ValueError(f"images have different channel counts ({total.numel()} and {s.numel()})")
            total, sq = (s, s2) if total is None else (total + s, sq + s2)
            count += x[:, 0].numel()
    mean = total / count
    std = (sq / count - mean.square()).clamp(min=0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
