"""Images held in memory (a tensor, an array file, any dataset of tensors or PIL images) as items, and collate."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import Size, _pair, _pil_to_tensor, _resize_tensor
from .values import _array_image, _check_chw, _looks_channels_last, _tensor_values


def _identifiers(prefix: str, n: int) -> list[str]:
    """Zero-padded item names like 'prefix/00042'."""
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{prefix}/{i:0{width}d}" for i in range(n)]


class TensorImages(Dataset):
    """Images held in one tensor (N, C, H, W) or (N, H, W), uint8 or float in [0, 1]; any channel count
    (grey and colour are kept as uint8, others keep float precision)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | torch.Tensor | None = None,
                 image_size: int | Sequence[int] | None = None, classes: Sequence[str] = (),
                 name: str = "tensor") -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
        images = images[:, None] if images.dim() == 3 else images
        if images.dim() != 4 or _looks_channels_last(images.shape):
            raise ValueError(f"images has shape {tuple(images.shape)}; expected (N, C, H, W), or (N, H, W) for "
                             "grayscale (channels last? use .permute(0, 3, 1, 2))")
        self.images = _tensor_values(images.detach().cpu(), "images").contiguous()
        n = len(self.images)
        if labels is None:
            self.labels = [-1] * n
        else:
            self.labels = [int(y) for y in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
            if len(self.labels) != n:
                raise ValueError(f"got {len(self.labels)} labels for {n} images; pass one label per image")
        self.image_size = _pair(image_size)
        self.classes = list(classes)
        self.files = _identifiers(name, n)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _resize_tensor(self.images[index], self.image_size), self.labels[index]


ARRAY_FILES = (".pt", ".pth", ".npy")


def load_array_file(path: str | os.PathLike, image_size: int | Sequence[int] | None = None) -> "TensorImages":
    """Images (N, C, H, W) from one file: ``.npy``, or ``.pt``/``.pth`` holding a tensor or a dict with
    "images" (and optional "labels", "classes"); loaded without unpickling code."""
    path = Path(path).expanduser()
    labels, classes = None, ()
    if path.suffix.lower() == ".npy":
        images = np.load(path, allow_pickle=False)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable tensor file ({type(exc).__name__}: {exc}); save images "
                             "with torch.save(tensor, path) or torch.save({'images': ..., 'labels': ...}, path)"
                             ) from exc
        if isinstance(loaded, dict):
            images, labels, classes = loaded.get("images"), loaded.get("labels"), loaded.get("classes", ())
        else:
            images = loaded
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{path} holds no image tensor: save a tensor (N, C, H, W) or a dict with 'images'")
        images = images.numpy()
    if images.ndim not in (3, 4):
        raise ValueError(f"{path} holds an array of shape {images.shape}; expected (N, C, H, W) or (N, H, W)")
    stack = torch.stack([_array_image(np.asarray(a), f"{path.name}[{i}]") for i, a in enumerate(images)]) \
        if images.ndim == 4 and (_looks_channels_last(images.shape) or images.dtype != np.uint8) else \
        torch.from_numpy(np.ascontiguousarray(images))
    if labels is not None and not classes:  # labels without names: the label numbers name the classes
        labels = torch.as_tensor(labels)
        classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.numel() else []
    return TensorImages(stack, labels, image_size, [str(c) for c in classes], name=path.stem)


class _Uint8View(Dataset):
    """Any map-style dataset of tensors or PIL images, seen through the item contract."""

    def __init__(self, dataset: Dataset, image_size: Size | None) -> None:
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TypeError(f"{type(dataset).__name__} has no __len__; wrap a map-style dataset") from exc
        self.dataset, self.image_size = dataset, image_size
        files = getattr(dataset, "files", None)
        self.files = list(files) if isinstance(files, (list, tuple)) and len(files) == n \
            else _identifiers(type(dataset).__name__, n)
        classes = getattr(dataset, "classes", None)
        self.classes = [str(c) for c in classes] if isinstance(classes, (list, tuple)) else []

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[index]
        image, label = item, -1
        if isinstance(item, (tuple, list)):
            if not item:
                raise ValueError(f"item {index} is an empty {type(item).__name__}; expected an image first")
            image = item[0]
            if len(item) > 1:
                label = _as_label(item[1])
        where = f"item {index} of {type(self.dataset).__name__}"
        if isinstance(image, Image.Image):
            return _pil_to_tensor(image, size=self.image_size), label
        if isinstance(image, torch.Tensor):
            image = _tensor_values(_check_chw(image.detach().cpu(), where), where)
            return _resize_tensor(image, self.image_size), label
        raise TypeError(f"{where} is a {type(image).__name__}; expected a (C, H, W) tensor or a PIL image, "
                        "alone or first in a tuple")


def _as_label(value: Any) -> int:
    """An int label from an int or an integer scalar tensor; -1 for anything else."""
    if isinstance(value, bool):
        return -1
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return -1


def as_uint8_dataset(dataset: Dataset | torch.Tensor, image_size: int | Sequence[int] | None = None) -> Dataset:
    """A dataset following the item contract, from a tensor or any dataset of tensors/PIL images."""
    if isinstance(dataset, torch.Tensor):
        return TensorImages(dataset, image_size=image_size)
    return _Uint8View(dataset, _pair(image_size))


def collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) items into uint8 images (B, C, H, W) and int64 labels (B,)."""
    images = [item[0] for item in batch]
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:
        what = "channel counts" if len({s[0] for s in shapes}) > 1 else "sizes"
        advice = ("pass channels=3 (or 1) to the dataset" if what == "channel counts"
                  else "pass image_size=... (an int or (height, width)) to the dataset")
        raise ValueError(f"images in this batch have different {what}: {shapes[:3]}; {advice}")
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return torch.stack(images), labels
