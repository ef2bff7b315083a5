"""Image folders as datasets (flat or one subfolder per class), and the listing of their unreadable files."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..checks import int_at_least
from .decode import MAX_PIXELS, _pair, _pil_limit_off, _pil_to_tensor, _resize_tensor, _source_channels
from .values import _array_image, _read_array


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CHANNEL_PEEK = 32  # headers read to decide a folder's channel count


def warn_once(warned: torch.Tensor, message: str) -> None:
    """Warn (RuntimeWarning) unless the shared flag ``warned`` is set, then set it; on a line of its own, clear of
    progress bars, in whichever process (DataLoader worker or not) finds the unreadable data."""
    if warned[0]:
        return
    warned[0] = True
    if torch.utils.data.get_worker_info() is not None:
        # a DataLoader worker cannot clear the main process's progress bar: end its line first
        sys.stderr.write("\n")
    with tqdm.external_write_mode(file=sys.stderr):  # this process's progress bars step aside
        warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of the dataset method that found it


class UnreadableDataError(RuntimeError):
    """Not one file of a folder could be read."""


class ImageFolder(Dataset):
    """Images under a folder: flat (unlabeled) or one subfolder per class.

    Files directly in ``root`` get label -1; files anywhere below a subfolder
    get that subfolder's class. Hidden files and folders (".name") are ignored.
    ``channels``: None decides once per folder (3 if any of up to 32 sampled
    images is colour, else 1) so that a folder never mixes channel counts; 1 or 3
    forces it. Unreadable files are replaced by the next readable one; they are
    counted in ``num_bad`` (shared by DataLoader workers), listed by ``bad_files`` and
    ``unreadable()`` (with the reason) and warned about once. Images of more than
    ``max_pixels`` pixels (default: PIL's decompression-bomb limit, about 179 M) count as
    unreadable; None lifts the limit.
    """

    def __init__(self, root: str | os.PathLike, image_size: int | Sequence[int] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, channels: int | None = None,
                 max_pixels: int | None = MAX_PIXELS) -> None:
        self.root = Path(root).expanduser()
        self.image_size = _pair(image_size)
        self.max_pixels = int_at_least(max_pixels, "max_pixels", 1, allow_none=True,
                                       what="a positive int or None (no limit)")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"{str(self.root)!r} is a file; pass the folder that holds the images")
        extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.files, skipped = self._scan(extensions)
        if not self.files:
            others = f"; found {len(skipped)} other files, e.g. {skipped[0]!r}" if skipped else ""
            raise ValueError(
                f"no images ({', '.join(extensions)}) found in {str(self.root)!r}{others}. Expected images "
                "directly in the folder (unlabeled) or one subfolder per class holding that class's images.")
        tops = [f.split("/", 1)[0] if "/" in f else None for f in self.files]
        self.classes: list[str] = sorted({t for t in tops if t is not None})
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels: list[int] = [-1 if t is None else index[t] for t in tops]
        self.channels = channels or self._peek_channels()
        # shared memory so that files found bad inside DataLoader workers are counted here too
        self._bad = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        self._warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    def _scan(self, extensions: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """Sorted relative paths of images below root, and of other files seen."""
        found, others, seen = [], [], set()
        for folder, subfolders, names in os.walk(self.root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a symlink loop would otherwise walk forever
                subfolders[:] = []
                continue
            seen.add(real)
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            rel = Path(folder).relative_to(self.root)
            for name in sorted(names):
                if name.startswith("."):  # e.g. macOS "._x.jpg" resource forks: not images
                    continue
                path = (rel / name).as_posix()
                (found if os.path.splitext(name)[1].lower() in extensions else others).append(path)
        return found, others

    def _peek_channels(self) -> int:
        """3 if any sampled image header is colour, else 1."""
        step = max(1, len(self.files) // _CHANNEL_PEEK)
        for rel in self.files[::step][:_CHANNEL_PEEK]:
            try:
                with _pil_limit_off(), Image.open(self.root / rel) as image:
                    if _source_channels(image) == 3:
                        return 3
            except Exception:  # unreadable files are dealt with (and reported) when loaded
                continue
        return 1

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_bad(self) -> int:
        """How many unreadable files were found so far (in any worker)."""
        return int(self._bad.sum())

    @property
    def bad_files(self) -> list[str]:
        """The unreadable files found so far (in any worker)."""
        return [self.files[i] for i in self._bad.nonzero().flatten().tolist()]

    def load(self, index: int) -> torch.Tensor:
        """Decode one file; raises whatever PIL raises for a bad file, ValueError above ``max_pixels``."""
        with _pil_limit_off(), Image.open(self.root / self.files[index]) as image:
            pixels = image.width * image.height
            if self.max_pixels is not None and pixels > self.max_pixels:
                raise ValueError(f"{image.width}x{image.height} = {pixels:,} pixels, above the limit of "
                                 f"{self.max_pixels:,}; raise it with max_pixels= (wrapssl train --max-pixels)")
            return _pil_to_tensor(image, self.channels, self.image_size)

    def unreadable(self) -> dict[str, str]:
        """The unreadable files found so far, each with why it failed (decoded again here to say so)."""
        reasons = {}
        for rel in self.bad_files:
            try:
                self.load(self.files.index(rel))
                reasons[rel] = "read now, failed while training (file changed?)"
            except Exception as exc:
                reasons[rel] = f"{type(exc).__name__}: {exc}"
        return reasons

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        error: Exception | None = None
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:
                continue
            try:
                return self.load(i), self.labels[i]
            except Exception as exc:  # any decoder failure: one bad file must not end a long run
                error = exc
                self._bad[i] = True
                self._warn(i, exc)
        raise UnreadableDataError(f"none of the {n} images under {str(self.root)!r} could be read; last error: "
                                  f"{type(error).__name__}: {error}")

    def _warn(self, index: int, error: Exception) -> None:
        """Warn about the first unreadable file of this dataset, in whichever process finds it."""
        warn_once(self._warned, f"{self.num_bad} unreadable image(s) under {str(self.root)!r} so far, e.g. "
                  f"{self.files[index]!r} ({type(error).__name__}: {error}); each is replaced by the next readable "
                  "image. This warning is shown once; dataset.num_bad and dataset.unreadable() list them all.")


class ArrayFolder(ImageFolder):
    """Image arrays of any channel count under a folder (flat or one subfolder per class), e.g. multispectral
    stacks: ``.npy`` files, and ``.tif``/``.tiff`` with tifffile installed (``pip install tifffile``).

    Each file holds one image, (C, H, W), (H, W, C) or (H, W) (see ``_array_image`` for the axis rule and
    the value scaling). The first file sets the channel count; files with another count, or that cannot
    be read, are unreadable (counted and listed like ImageFolder's).
    """

    EXTENSIONS = (".npy", ".tif", ".tiff")

    def __init__(self, root: str | os.PathLike, image_size: int | Sequence[int] | None = None) -> None:
        super().__init__(root, image_size, extensions=self.EXTENSIONS, channels=None, max_pixels=None)

    def _peek_channels(self) -> int:
        """The first file's channel count; its errors (a wrong dtype, floats outside [0, 1]) are raised now."""
        return int(self._read(0).shape[0])

    def _read(self, index: int) -> torch.Tensor:
        path = self.root / self.files[index]
        return _array_image(np.asarray(_read_array(path)), self.files[index])

    def load(self, index: int) -> torch.Tensor:
        """Read one array as (C, H, W), resized to ``image_size``."""
        image = self._read(index)
        if image.shape[0] != self.channels:
            raise ValueError(f"{self.files[index]} has {image.shape[0]} channels, {self.files[0]} has "
                             f"{self.channels}; a folder holds one channel count")
        return _resize_tensor(image, self.image_size)


def unreadable_files(dataset: Any) -> dict[str, str]:
    """{file: reason} for the unreadable files of the image folder or shards behind ``dataset`` (through Subsets
    and wrappers: the first one with an ``unreadable()`` method); empty for data that has no files to fail."""
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        if callable(getattr(dataset, "unreadable", None)):  # ImageFolder, ArrayFolder, TarShards
            return dataset.unreadable()
        dataset = getattr(dataset, "dataset", None)
    return {}
