"""Datasets that decode images to uint8 tensors for the trainer.

Every item is ``(image, label)``: ``image`` a ``torch.uint8`` tensor of shape
(C, H, W) with C = 1 (grayscale source) or 3 (colour source), ``label`` an
``int`` (-1 when unknown). Other channel counts (multispectral stacks: ``.npy``
or ``.tif`` arrays, tensors) keep their precision: uint8 data stays uint8, other
data becomes float32 in [0, 1] (integers divided by their type's maximum). Every dataset has ``.files`` (one identifier per
item) and ``.classes`` (class names, empty when unlabeled). Workers only decode
and resize; random augmentation happens later, on the device.

``image_size`` (everywhere): ``None`` keeps the source size; an int ``s`` or a
pair ``(h, w)`` scales the image (antialiased, bilinear) until it covers
``h x w`` while keeping its aspect ratio, then crops the centre. For an int
this is "shorter side to ``s``, centre crop to a square".
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import struct
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

from .files import atomic_open

__all__ = [
    "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "ImageFolder", "FashionMNIST", "Digits", "CIFAR10", "STL10",
    "DATASETS",
    "ArrayFolder", "load_array_file", "TensorImages", "as_uint8_dataset", "as_dataset", "load_dataset", "collate", "read_idx", "unreadable_files",
    "UnreadableDataError",
    "MAX_PIXELS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
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
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_FLOAT_TOLERANCE = 1e-4  # float pipelines produce 1.0000001; that is not a user error
_CHANNEL_PEEK = 32  # headers read to decide a folder's channel count
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
    """Resize a uint8 (C, H, W) tensor to cover size, then centre-crop it."""
    if size is None or tuple(image.shape[1:]) == size:
        return image
    _, height, width = image.shape
    scale = _cover_scale(height, width, size)
    new_h, new_w = max(size[0], round(height * scale)), max(size[1], round(width * scale))
    if (new_h, new_w) != (height, width):
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                                antialias=True, align_corners=False)[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else \
            resized.clamp_(0.0, 1.0)
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


def _identifiers(prefix: str, n: int) -> list[str]:
    """Zero-padded item names like 'prefix/00042'."""
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{prefix}/{i:0{width}d}" for i in range(n)]


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
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive int or None (no limit), got {max_pixels!r}")
        self.max_pixels = max_pixels
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
        if self._warned[0]:
            return
        self._warned[0] = True
        if torch.utils.data.get_worker_info() is not None:
            # a DataLoader worker cannot clear the main process's progress bar: end its line first
            sys.stderr.write("\n")
        with tqdm.external_write_mode(file=sys.stderr):  # this process's progress bars step aside
            warnings.warn(
                f"{self.num_bad} unreadable image(s) under {str(self.root)!r} so far, e.g. {self.files[index]!r} "
                f"({type(error).__name__}: {error}); each is replaced by the next readable image. "
                "This warning is shown once; dataset.num_bad and dataset.unreadable() list them all.",
                RuntimeWarning, stacklevel=3)


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
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from exc
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


def as_dataset(data: Dataset | torch.Tensor | str | os.PathLike, image_size: int | None = None,
               what: str = "dataset") -> Dataset:
    """A dataset of (uint8 image, label) items from a name or folder, an image tensor or any image dataset."""
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(os.fspath(data), image_size=image_size)
    from .shards import TarShards, is_shard_spec
    if isinstance(data, TarShards):
        return data
    if isinstance(data, (list, tuple)) and is_shard_spec(data):
        return TarShards(data, image_size=image_size)
    if isinstance(data, (torch.Tensor, Dataset)) or hasattr(data, "__getitem__"):
        return as_uint8_dataset(data)
    raise TypeError(f"{what} must be a torch Dataset, an image tensor (N,C,H,W), a data set name such as "
                    f"'fashion-mnist', or an image folder path, got {type(data).__name__}")


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
    from .shards import TarShards, is_shard_spec
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


def unreadable_files(dataset: Any) -> dict[str, str]:
    """{file: reason} for the unreadable files of the image folder behind ``dataset`` (through Subsets and
    wrappers); empty for data that has no files to fail."""
    from .shards import TarShards
    seen = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        if isinstance(dataset, (ImageFolder, TarShards)):
            return dataset.unreadable()
        dataset = getattr(dataset, "dataset", None)
    return {}


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
