"""The built-in data sets read from local files: Fashion-MNIST (IDX), digits, CIFAR-10, STL-10."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checks import optional_import
from ..files import atomic_open
from .adapters import TensorImages, _identifiers
from .decode import _pair, _resize_tensor


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_HELP = (
    "Install them with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; "
    f"files land in {FASHION_MNIST_DIR}), or download the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion) into a "
    "folder and pass root=that_folder (--data-root that_folder)."
)


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> torch.Tensor:
    """Read an unsigned-byte IDX file (optionally gzip-compressed) into a uint8 tensor."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: corrupt gzip data ({exc}); download the file again") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] == 0:
        magic = raw[:4].hex() or "empty file"
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic number {magic}, expected 000008 "
                         "followed by the number of dimensions); is it the right, complete file?")
    dims_found = raw[3]
    if ndim is not None and dims_found != ndim:
        raise ValueError(f"{path}: IDX file has {dims_found} dimensions, expected {ndim} "
                         "(images have 3, labels 1); are the file names swapped?")
    header = 4 + 4 * dims_found
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header is truncated; download the file again")
    shape = struct.unpack(f">{dims_found}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header promises {int(np.prod(shape))} bytes of data for shape {shape}, "
                         f"found {len(raw) - header}; download the file again")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


class FashionMNIST(TensorImages):
    """Fashion-MNIST (60k train / 10k test, 1x28x28, 10 classes) from its IDX files."""

    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self, root: str | os.PathLike = FASHION_MNIST_DIR, train: bool = True,
                 image_size: int | Sequence[int] | None = None, limit: int | None = None) -> None:
        root = Path(root).expanduser()
        split = "train" if train else "t10k"
        images = read_idx(self._find(root, f"{split}-images-idx3-ubyte"), ndim=3)
        labels = read_idx(self._find(root, f"{split}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels; "
                             "the files are from different sets or truncated")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        super().__init__(images, labels, image_size, FASHION_MNIST_CLASSES,
                         name=f"fashion-mnist/{'train' if train else 'test'}")
        self.root, self.train = root, train

    @staticmethod
    def _find(root: Path, stem: str) -> Path:
        """The .gz or uncompressed file for stem; FileNotFoundError with install advice."""
        for path in (root / f"{stem}.gz", root / stem):
            if path.is_file():
                return path
        raise FileNotFoundError(f"Fashion-MNIST file {stem}.gz (or {stem}) not found in {str(root)!r}. "
                                + _FASHION_MNIST_HELP)

    @staticmethod
    def download(root: str | os.PathLike, url: str = FASHION_MNIST_URL) -> Path:
        """Fetch the four IDX files into root (needs internet); returns root."""
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        for stem in FashionMNIST.FILES:
            target = root / f"{stem}.gz"
            if target.is_file():
                continue
            try:
                with urllib.request.urlopen(url + target.name, timeout=60) as response:
                    data = response.read()
            except (urllib.error.URLError, OSError) as exc:
                raise ConnectionError(f"could not download {url + target.name}: {exc}. Without internet: "
                                      + _FASHION_MNIST_HELP) from exc
            # write then rename, so an interrupted download never leaves a half file behind
            with atomic_open(target, "wb") as f:
                f.write(data)
        return root


DIGITS_TRAIN = 1297  # the first 1,297 digits train, the last 500 are the test split


class Digits(TensorImages):
    """scikit-learn's 1,797 8x8 handwritten digits as 1x8x8 uint8, labels 0-9.

    The set has no official split: ``split="train"`` is the first DIGITS_TRAIN images,
    ``"test"`` the rest, None all of them.
    """

    def __init__(self, image_size: int | Sequence[int] | None = None, split: str | None = None) -> None:
        load_digits = optional_import("sklearn.datasets", "the 'digits' dataset needs scikit-learn: pip install "
                                                          "scikit-learn").load_digits
        keep = {None: slice(None), "train": slice(None, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None)}
        if split not in keep:
            raise ValueError(f"digits has the splits 'train' and 'test' (or None for all), got {split!r}")
        bunch = load_digits()
        images = np.round(bunch.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # values are 0..16
        super().__init__(torch.from_numpy(images), torch.from_numpy(bunch.target), image_size,
                         [str(d) for d in range(10)], name="digits")
        # item names keep the index in the whole set, so a file name means the same image in every split
        self.images, self.files = self.images[keep[split]], self.files[keep[split]]
        self.labels = self.labels[keep[split]]


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_CIFAR10_HELP = ("Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into DIR "
                 "(it makes DIR/cifar-10-batches-py), or on a machine with internet run "
                 "`python -c \"import torchvision; torchvision.datasets.CIFAR10('DIR', download=True)\"`; "
                 "then pass root=DIR (--data-root DIR).")
_STL10_HELP = ("Download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (2.6 GB) and extract it into "
               "DIR (it makes DIR/stl10_binary), or on a machine with internet run "
               "`python -c \"import torchvision; torchvision.datasets.STL10('DIR', split='unlabeled', "
               "download=True)\"`; then pass root=DIR (--data-root DIR).")


def _named_folder(root: str | os.PathLike | None, folder: str, probe: str, what: str, advice: str) -> Path:
    """torchvision's data folder ``folder`` under ``root`` (or ``root`` itself if it is that folder)."""
    if root is None:
        raise FileNotFoundError(f"{what} needs the folder it was downloaded to. {advice}")
    root = Path(root).expanduser()
    for candidate in (root / folder, root):
        if (candidate / probe).is_file():
            return candidate
    raise FileNotFoundError(f"{what} file {folder}/{probe} not found under {str(root)!r}. {advice}")


class _NumpyOnly(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays and plain containers only (a data file cannot run code)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    """One pickled CIFAR batch as a dict with str keys (files written by Python 2 or 3)."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc}); download the archive again") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (holds a {type(entry).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


class CIFAR10(TensorImages):
    """CIFAR-10 (50k train / 10k test, 3x32x32, 10 classes) from torchvision's folder ``cifar-10-batches-py``."""

    def __init__(self, root: str | os.PathLike | None, train: bool = True,
                 image_size: int | Sequence[int] | None = None) -> None:
        folder = _named_folder(root, "cifar-10-batches-py", "batches.meta", "CIFAR-10", _CIFAR10_HELP)
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        images, labels = [], []
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CIFAR-10 file {name} missing in {str(folder)!r}. {_CIFAR10_HELP}")
            entry = _read_cifar_batch(folder / name)
            data = np.asarray(entry.get("data"), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(entry.get("labels", ())) != len(data):
                raise ValueError(f"{folder / name}: expected 'data' of shape (N, 3072) and N 'labels'")
            images.append(data.reshape(-1, 3, 32, 32))  # rows are the red, green, blue planes in turn
            labels.extend(int(y) for y in entry["labels"])
        meta = _read_cifar_batch(folder / "batches.meta").get("label_names") or CIFAR10_CLASSES
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta]
        super().__init__(torch.from_numpy(np.concatenate(images)), labels, image_size, classes,
                         name=f"cifar10/{'train' if train else 'test'}")
        self.root, self.train = folder, train


class STL10(Dataset):
    """STL-10 (3x96x96, 10 classes) from torchvision's folder ``stl10_binary``, memory-mapped (not read into RAM).

    Splits: "train" (5,000 labelled), "test" (8,000 labelled), "unlabeled" (100,000, label -1;
    SimCLR-style studies pretrain on it) and "train+unlabeled".
    """

    SPLITS = {"train": [("train_X.bin", "train_y.bin")], "test": [("test_X.bin", "test_y.bin")],
              "unlabeled": [("unlabeled_X.bin", None)]}
    SPLITS["train+unlabeled"] = SPLITS["train"] + SPLITS["unlabeled"]

    def __init__(self, root: str | os.PathLike | None, split: str = "train",
                 image_size: int | Sequence[int] | None = None) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"STL-10 split must be one of {sorted(self.SPLITS)}, got {split!r}")
        parts = self.SPLITS[split]
        folder = _named_folder(root, "stl10_binary", parts[0][0], "STL-10", _STL10_HELP)
        self.image_size = _pair(image_size)
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        for images_file, labels_file in parts:
            path = folder / images_file
            if not path.is_file():
                raise FileNotFoundError(f"STL-10 file {images_file} missing in {str(folder)!r}. {_STL10_HELP}")
            if path.stat().st_size % (3 * 96 * 96):
                raise ValueError(f"{path}: size is not a whole number of 3x96x96 images; download it again")
            images = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
            if labels_file is None:
                labels = [-1] * len(images)
            else:
                labels = (np.fromfile(folder / labels_file, dtype=np.uint8).astype(np.int64) - 1).tolist()
                if len(labels) != len(images):
                    raise ValueError(f"{folder}: {len(images)} images in {images_file} but {len(labels)} labels "
                                     f"in {labels_file}; download the archive again")
            self.images.append(images)
            self.labels.extend(labels)
        self._starts = np.cumsum([0] + [len(a) for a in self.images])
        names = folder / "class_names.txt"
        self.classes = names.read_text().split() if names.is_file() else list(STL10_CLASSES)
        self.files = _identifiers(f"stl10/{split}", len(self.labels))
        self.root, self.split = folder, split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.labels)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        # the files store each channel column by column (MATLAB order): transpose to rows
        image = torch.from_numpy(np.ascontiguousarray(self.images[part][index - self._starts[part]].transpose(0, 2, 1)))
        return _resize_tensor(image, self.image_size), self.labels[index]
