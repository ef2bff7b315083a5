"""What a user passes as data (a set's name, a folder, an array file, shards, a tensor, a dataset) as a dataset."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .adapters import ARRAY_FILES, as_uint8_dataset, load_array_file
from .builtin import CIFAR10, FASHION_MNIST_DIR, STL10, Digits, FashionMNIST
from .decode import MAX_PIXELS
from .folders import IMAGE_EXTENSIONS, ArrayFolder, ImageFolder
from .shard_files import is_shard_spec
from .shards import TarShards


DATASETS = ("fashion-mnist", "digits", "cifar10", "stl10")
_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "stl-10": "stl10"}


def dataset_name(spec: str | os.PathLike) -> str | None:
    """The canonical name of a built-in data set ('CIFAR-10' -> 'cifar10'), or None for a folder path."""
    name = os.fspath(spec).strip().lower().replace("_", "-")
    name = _ALIASES.get(name, name)
    return name if name in DATASETS else None


def load_dataset(spec: str, image_size: int | Sequence[int] | None = None, train: bool = True,
                 root: str | os.PathLike | None = None, channels: int | None = None,
                 split: str | None = None, max_pixels: int | None = MAX_PIXELS) -> Dataset:
    """A named data set (one of DATASETS), an image folder, a folder of arrays (``ArrayFolder``) or an array
    file (``load_array_file``: .npy, .pt, .pth), as a dataset of images.

    ``split`` ("train" or "test"; STL-10 also "unlabeled" and "train+unlabeled") defaults to
    ``train``'s; digits gives all its images unless ``split`` names one; folders have no splits. ``root`` is the folder holding a named set's
    files in torchvision's layout (Fashion-MNIST: the IDX files, default FASHION_MNIST_DIR);
    nothing is downloaded. ``channels`` and ``max_pixels`` apply to folders. Prefix a folder
    named like a built-in with "./". Tar shards (a brace pattern, glob or list ending in .tar) are
    streamed by ``shards.TarShards``.
    """
    if is_shard_spec(spec):
        return TarShards(spec, image_size=image_size, channels=channels, max_pixels=max_pixels)
    name = dataset_name(spec)
    if name == "digits":  # no official split: all images unless a split is asked for by name
        return Digits(image_size=image_size, split=split)
    split = split or ("train" if train else "test")
    if name not in (None, "stl10") and split not in ("train", "test"):
        raise ValueError(f"{name} has the splits 'train' and 'test', got {split!r}")
    if name == "fashion-mnist":
        return FashionMNIST(root if root is not None else FASHION_MNIST_DIR, train=split == "train",
                            image_size=image_size)
    if name == "cifar10":
        return CIFAR10(root, train=split == "train", image_size=image_size)
    if name == "stl10":
        return STL10(root, split=split, image_size=image_size)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in ARRAY_FILES:
        return load_array_file(path, image_size)
    if path.is_dir() and _holds_arrays(path):
        return ArrayFolder(path, image_size)
    if path.exists():
        return ImageFolder(spec, image_size=image_size, channels=channels, max_pixels=max_pixels)
    raise ValueError(f"unknown dataset {spec!r}: expected one of {', '.join(DATASETS)} "
                     "or the path of an existing image folder")


def as_dataset(data: Dataset | torch.Tensor | str | os.PathLike, image_size: int | None = None,
               what: str = "dataset") -> Dataset:
    """A dataset of (uint8 image, label) items from a name or folder, an image tensor or any image dataset."""
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(os.fspath(data), image_size=image_size)
    if isinstance(data, TarShards):
        return data
    if isinstance(data, (list, tuple)) and is_shard_spec(data):
        return TarShards(data, image_size=image_size)
    if isinstance(data, (torch.Tensor, Dataset)) or hasattr(data, "__getitem__"):
        return as_uint8_dataset(data)
    raise TypeError(f"{what} must be a torch Dataset, an image tensor (N,C,H,W), a data set name such as "
                    f"'fashion-mnist', or an image folder path, got {type(data).__name__}")


def _holds_arrays(folder: Path) -> bool:
    """True if the first data file found under ``folder`` (sorted walk) is an array, not an image."""
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            ext = os.path.splitext(name)[1].lower()
            if ext in ArrayFolder.EXTENSIONS and not name.startswith("."):
                return True
            if ext in IMAGE_EXTENSIONS and not name.startswith("."):
                return False
    return False
