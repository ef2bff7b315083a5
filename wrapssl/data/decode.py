"""Decode images to uint8 (C, H, W) tensors at a size: PIL (with the reduced-size JPEG decode) and resizing.

``image_size`` (everywhere): ``None`` keeps the source size; an int ``s`` or a pair ``(h, w)`` scales the
image (antialiased, bilinear) until it covers ``h x w`` while keeping its aspect ratio, then crops the
centre. For an int this is "shorter side to ``s``, centre crop to a square".
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Images with more pixels are refused (PIL's decompression-bomb limit: twice its warning threshold).
MAX_PIXELS = 2 * 89_478_485


@contextlib.contextmanager
def _pil_limit_off() -> Iterator[None]:
    """PIL's own pixel limit switched off inside (ImageFolder applies its ``max_pixels`` instead)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


Size = tuple[int, int]


def _pair(image_size: int | Sequence[int] | None) -> Size | None:
    """Return image_size as (h, w), or None."""
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or a pair (height, width) of them, got {image_size!r}")
    return size  # type: ignore[return-value]


def _cover_scale(height: int, width: int, size: Size) -> float:
    """Scale factor at which a height x width image just covers size."""
    return max(size[0] / height, size[1] / width)


def _resize_tensor(image: torch.Tensor, size: Size | None) -> torch.Tensor:
    """Resize a (C, H, W) tensor (uint8, or float32 in [0, 1]) to cover size, then centre-crop it."""
    if size is None or tuple(image.shape[1:]) == size:
        return image
    _, height, width = image.shape
    scale = _cover_scale(height, width, size)
    new_h, new_w = max(size[0], round(height * scale)), max(size[1], round(width * scale))
    if (new_h, new_w) != (height, width):
        if image.dtype == torch.uint8:
            # torchvision's uint8 kernel: no float round trip, 1.0-3.5x faster here, within one grey level of it
            # (benchmarks/bench_resize.py); imported here, as torchvision takes seconds to import
            from torchvision.transforms.v2.functional import resize
            image = resize(image, [new_h, new_w], antialias=True)
        else:
            image = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)
    top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
    return image[:, top:top + size[0], left:left + size[1]].contiguous()


def _source_channels(image: Image.Image) -> int:
    """1 for grayscale PIL modes, 3 for everything else."""
    return 1 if image.mode in _GRAY_MODES or image.mode.startswith("I;16") else 3


def _pil_to_tensor(image: Image.Image, channels: int | None = None, size: Size | None = None) -> torch.Tensor:
    """Decode a PIL image to a uint8 (C, H, W) tensor with the given channel count and size."""
    channels = channels or _source_channels(image)
    # phone photos store their rotation in EXIF (tag 0x0112); 5-8 swap height and width
    turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    if size is not None and image.format == "JPEG":
        # let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers size: much faster
        scale = _cover_scale(image.height, image.width, size[::-1] if turned else size)
        image.draft(None, (int(np.ceil(image.width * scale)), int(np.ceil(image.height * scale))))
    ImageOps.exif_transpose(image, in_place=True)
    mode = "L" if channels == 1 else "RGB"
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels carry arbitrary colours; show them on white as a viewer would
        rgba = image.convert("RGBA")
        flat = Image.new(mode, image.size, 255 if channels == 1 else (255, 255, 255))
        flat.paste(rgba.convert(mode), mask=rgba.getchannel("A"))
        image = flat
    elif image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit grayscale; PIL's convert("L") would clip at 255 instead of scaling.
        # Mode "I" does not say its depth: treat it as 16-bit once a value exceeds 255.
        deep = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or deep.max(initial=0) > 255:
            deep = deep * (255 / 65535)
        image = Image.fromarray(np.clip(np.round(deep), 0, 255).astype(np.uint8)).convert(mode)
    elif image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        scale = _cover_scale(image.height, image.width, size)
        crop_w, crop_h = size[1] / scale, size[0] / scale
        # float rounding can put the centred box a hair outside the image (left = -7e-15 for 98x284 at
        # 64 px), which Pillow refuses: clamp it to the image
        left, top = max(0.0, (image.width - crop_w) / 2), max(0.0, (image.height - crop_h) / 2)
        box = (left, top, min(float(image.width), left + crop_w), min(float(image.height), top + crop_h))
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
