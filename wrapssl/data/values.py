"""Image tensors and arrays to the item contract's values: uint8 for grey and colour, float32 in [0, 1] else."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


_FLOAT_TOLERANCE = 1e-4  # float pipelines produce 1.0000001; that is not a user error


def _tensor_to_uint8(image: torch.Tensor, where: str) -> torch.Tensor:
    """Convert an image tensor (uint8, integer 0..255, or float in [0, 1]) to uint8."""
    if image.dtype == torch.uint8:
        return image
    if image.is_floating_point():
        if torch.isnan(image).any():
            raise ValueError(f"{where} contains NaN; expected floats in [0, 1]")
        low, high = image.min().item(), image.max().item()
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(f"{where} has float values in [{low:g}, {high:g}]; expected [0, 1]. "
                             "Divide 0..255 data by 255, undo any normalization, or pass uint8.")
        return image.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    if image.dtype != torch.bool and not image.is_complex():
        low, high = image.min().item(), image.max().item()
        if 0 <= low and high <= 255:
            return image.to(torch.uint8)
        raise ValueError(f"{where} has integer values in [{low}, {high}]; expected 0..255 (uint8)")
    raise TypeError(f"{where} has dtype {image.dtype}; expected uint8 or float in [0, 1]")


def _looks_channels_last(shape: Sequence[int]) -> bool:
    """True for an image shape (..., C, H, W) whose last axis looks like the channels: 1-4 wide after more."""
    return shape[-1] in (1, 3, 4) and shape[-3] > 4


def _check_chw(image: torch.Tensor, where: str) -> torch.Tensor:
    """Return image as (C, H, W), any C; (H, W) becomes (1, H, W). Channels-last shapes are refused."""
    image = image[None] if image.dim() == 2 else image
    if image.dim() != 3 or _looks_channels_last(image.shape):
        hint = " (looks like HWC: use .permute(2, 0, 1))" if image.dim() == 3 else ""
        raise ValueError(f"{where} has shape {tuple(image.shape)}; expected (C, H, W){hint}")
    return image


def _tensor_values(image: torch.Tensor, where: str) -> torch.Tensor:
    """Grey and colour images as uint8 (``_tensor_to_uint8``); other channel counts keep float precision:
    uint8 stays, floats in [0, 1] become float32."""
    if image.shape[-3] in (1, 3) or image.dtype == torch.uint8:
        return _tensor_to_uint8(image, where)
    if not image.is_floating_point():
        return _tensor_to_uint8(image, where)
    if not torch.isfinite(image).all():
        raise ValueError(f"{where} contains NaN or inf; expected floats in [0, 1]")
    low, high = image.min().item(), image.max().item()
    if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
        raise ValueError(f"{where} has float values in [{low:g}, {high:g}]; expected [0, 1]: scale them (e.g. "
                         "reflectances / 10000) or store integers (uint8, uint16)")
    return image.float().clamp(0.0, 1.0)


def _array_image(array: np.ndarray, where: str) -> torch.Tensor:
    """An image array as (C, H, W): (H, W) is one channel; a 3-D array whose last axis is shorter than its
    first is (H, W, C). uint8 stays; other integers are divided by their type's maximum; floats must lie in
    [0, 1] (float32 either way)."""
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] < array.shape[0]:
        array = array.transpose(2, 0, 1)
    elif array.ndim != 3:
        raise ValueError(f"{where} has shape {array.shape}; expected (C, H, W), (H, W, C) or (H, W)")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        top = 1 if array.dtype == np.bool_ else np.iinfo(array.dtype).max
        if array.dtype != np.bool_ and np.iinfo(array.dtype).min < 0 and array.min() < 0:
            raise ValueError(f"{where} has negative values ({array.min()}); store values >= 0 or floats in [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / np.float32(top))
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{where} has dtype {array.dtype}; expected integers or floats in [0, 1]")
    return _tensor_values(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), where) \
        if array.shape[0] not in (1, 3) else _tensor_to_uint8(torch.from_numpy(np.ascontiguousarray(array)), where)


def _read_array(path: Path) -> np.ndarray:
    """One .npy array (never unpickled) or .tif/.tiff image (with tifffile)."""
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        import tifffile
    except ImportError as exc:
        raise ImportError("reading .tif arrays needs tifffile: pip install tifffile (or save them as .npy)") from exc
    return tifffile.imread(path)
