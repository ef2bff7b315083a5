"""Data for the trainer: datasets whose items are (uint8 image, label), from folders, built-in sets, shards, tensors.

Every item is ``(image, label)``: ``image`` a ``torch.uint8`` tensor of shape
(C, H, W) with C = 1 (grayscale source) or 3 (colour source), ``label`` an
``int`` (-1 when unknown). Other channel counts (multispectral stacks: ``.npy``
or ``.tif`` arrays, tensors) keep their precision: uint8 data stays uint8, other
data becomes float32 in [0, 1] (integers divided by their type's maximum). Every
dataset has ``.files`` (one identifier per item) and ``.classes`` (class names,
empty when unlabeled). Workers only decode and resize; random augmentation
happens later, on the device. ``image_size`` is read as in ``decode``.

The rooms: ``decode`` (PIL, the reduced-size JPEG decode, resizing), ``values``
(tensor and array values), ``folders`` (image folders, unreadable files),
``builtin`` (Fashion-MNIST, digits, CIFAR-10, STL-10), ``adapters`` (tensors,
array files, other datasets, collate), ``shard_files``/``shards``/``shard_writer``
(tar shards), and ``load`` (a name, path or object to a dataset).
"""
from __future__ import annotations

from .adapters import ARRAY_FILES, TensorImages, as_uint8_dataset, collate, load_array_file
from .builtin import (CIFAR10, CIFAR10_CLASSES, DIGITS_TRAIN, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR,
                      FASHION_MNIST_URL, STL10, STL10_CLASSES, Digits, FashionMNIST, read_idx)
from .decode import MAX_PIXELS
from .folders import IMAGE_EXTENSIONS, ArrayFolder, ImageFolder, UnreadableDataError, unreadable_files
from .load import DATASETS, as_dataset, dataset_name, load_dataset
from .shard_files import INDEX_NAME, ShardError, expand_braces, is_shard_spec, shard_paths
from .shard_writer import reading_pattern, write_shards
from .shards import TarShards

__all__ = [
    "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_URL", "CIFAR10_CLASSES",
    "STL10_CLASSES", "DIGITS_TRAIN", "ImageFolder", "FashionMNIST", "Digits", "CIFAR10", "STL10", "DATASETS",
    "ArrayFolder", "ARRAY_FILES", "load_array_file", "TensorImages", "as_uint8_dataset", "as_dataset",
    "load_dataset", "dataset_name", "collate", "read_idx", "unreadable_files", "UnreadableDataError", "MAX_PIXELS",
    "TarShards", "ShardError", "INDEX_NAME", "expand_braces", "is_shard_spec", "shard_paths", "write_shards",
    "reading_pattern",
]
