"""Tests for wrapssl.data: folders, IDX files, tensors, collate; each against a naive reference."""

from __future__ import annotations

import gzip
import os
import struct
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features
from torch.utils.data import DataLoader, Dataset

from wrapssl.data import (
    FASHION_MNIST_CLASSES, Digits, FashionMNIST, ImageFolder, TensorImages, as_uint8_dataset,
    collate, load_dataset, read_idx,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return array


def chw(array: np.ndarray) -> torch.Tensor:
    """The naive expectation: HWC/HW numpy to a CHW uint8 tensor."""
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write an unsigned-byte IDX file by hand (gzip when the name ends in .gz)."""
    magic = 0x0800 + array.ndim if magic is None else magic
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def naive_idx(path: Path) -> np.ndarray:
    """A second IDX reader: gzip + numpy, no validation."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fake_fashion(root: Path, n: int = 6, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    ext = ".gz" if gz else ""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", labels)
    return images.astype(np.uint8), labels


# ---------------------------------------------------------------- folders

def test_flat_folder_is_unlabeled_and_lossless(tmp_path):
    arrays = {f"img{i}.png": save(tmp_path / f"img{i}.png", rgb(12, 10 + i, i)) for i in range(3)}
    ds = ImageFolder(tmp_path)
    assert ds.files == sorted(arrays) and ds.classes == [] and len(ds) == 3
    for i, name in enumerate(ds.files):
        image, label = ds[i]
        assert label == -1 and image.dtype == torch.uint8
        assert torch.equal(image, chw(arrays[name]))


def test_nested_folder_labels_root_images_and_hidden_files(tmp_path):
    save(tmp_path / "dog" / "a.png", rgb(8, 8, 0))
    save(tmp_path / "cat" / "b.png", rgb(8, 8, 1))
    save(tmp_path / "dog" / "deeper" / "c.png", rgb(8, 8, 2))
    save(tmp_path / "loose.png", rgb(8, 8, 3))
    save(tmp_path / ".cache" / "d.png", rgb(8, 8, 4))
    (tmp_path / "cat" / "._b.png").write_bytes(b"macOS resource fork, not an image")
    (tmp_path / "empty").mkdir()
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"]
    expected = {"cat/b.png": 0, "dog/a.png": 1, "dog/deeper/c.png": 1, "loose.png": -1}
    assert dict(zip(ds.files, ds.labels)) == expected
    assert {f: ds[i][1] for i, f in enumerate(ds.files)} == expected
    assert ds.num_bad == 0


def test_mixed_formats_and_case_insensitive_extensions(tmp_path):
    lossless = {
        "a.png": save(tmp_path / "a.png", rgb(16, 16, 0)),
        "b.BMP": save(tmp_path / "b.BMP", rgb(16, 16, 1)),
    }
    if features.check("webp"):
        lossless["c.webp"] = save(tmp_path / "c.webp", rgb(16, 16, 2), lossless=True)
    smooth = np.kron(rgb(2, 2, 3), np.ones((8, 8, 1), dtype=np.uint8))  # JPEG-friendly 8x8 blocks
    lossy = {"d.JPG": save(tmp_path / "d.JPG", smooth, quality=95, subsampling=0),
             "e.jpeg": save(tmp_path / "e.jpeg", smooth, quality=95, subsampling=0)}
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert sorted(ds.files) == sorted([*lossless, *lossy])
    for i, name in enumerate(ds.files):
        image = ds[i][0]
        if name in lossless:
            assert torch.equal(image, chw(lossless[name])), name
        else:
            assert (image.float() - chw(lossy[name]).float()).abs().mean() < 3, name
            assert torch.equal(image, chw(np.asarray(Image.open(tmp_path / name)))), name


def test_rgba_is_composited_on_white(tmp_path):
    colour = rgb(6, 6, 0)
    alpha = np.random.default_rng(1).integers(0, 256, (6, 6), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    save(tmp_path / "x.png", np.dstack([colour, alpha]))
    image = ImageFolder(tmp_path)[0][0]
    a = alpha[:, :, None] / 255.0
    expected = colour * a + 255 * (1 - a)
    assert image.shape == (3, 6, 6)
    assert (image.float() - chw(expected.astype(np.float32))).abs().max() <= 1
    assert image[:, 0, 0].tolist() == [255, 255, 255]
    assert image[:, 0, 1].tolist() == colour[0, 1].tolist()


def test_grayscale_sources_keep_one_channel(tmp_path):
    gray = save(tmp_path / "g.png", rgb(10, 12, 0)[:, :, 0])
    deep = (np.arange(120).reshape(10, 12) * 500).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "h16.png")
    la = np.dstack([gray, np.full_like(gray, 255)])
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    ds = ImageFolder(tmp_path)
    assert ds.channels == 1
    images = {f: ds[i][0] for i, f in enumerate(ds.files)}
    assert torch.equal(images["g.png"], chw(gray))
    assert torch.equal(images["la.png"], chw(gray))
    assert torch.equal(images["h16.png"], chw(np.round(deep / 65535 * 255).astype(np.uint8)))


def test_palette_and_cmyk_become_rgb(tmp_path):
    Image.fromarray(rgb(8, 8, 0)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb(8, 8, 1)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    ds = ImageFolder(tmp_path)
    for i, name in enumerate(ds.files):
        expected = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert torch.equal(ds[i][0], chw(expected)), name


def test_folder_mixing_gray_and_colour_gives_three_channels(tmp_path):
    gray = save(tmp_path / "a.png", rgb(8, 8, 0)[:, :, 0])
    save(tmp_path / "b.png", rgb(8, 8, 1))
    ds = ImageFolder(tmp_path)
    assert ds.channels == 3
    assert torch.equal(ds[0][0], chw(np.dstack([gray] * 3)))
    assert ImageFolder(tmp_path, channels=1)[1][0].shape == (1, 8, 8)


def test_exif_rotation_is_applied(tmp_path):
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(array).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = ImageFolder(tmp_path)[0][0]
    assert image.shape == (3, 20, 10)
    assert image[:, :10].float().mean() > 200 and image[:, 10:].float().mean() < 50  # white went to the top


@pytest.mark.parametrize("size, shape", [(32, (32, 32)), ((16, 24), (16, 24)), ([16, 48], (16, 48))])
def test_resize_matches_pil_resize_then_centre_crop(tmp_path, size, shape):
    array = save(tmp_path / "a.png", rgb(40, 60, 0))
    image = ImageFolder(tmp_path, image_size=size)[0][0]
    assert image.dtype == torch.uint8 and image.shape == (3, *shape)
    h, w = shape
    scale = max(h / 40, w / 60)
    big_w, big_h = max(w, round(60 * scale)), max(h, round(40 * scale))
    ref = np.asarray(Image.fromarray(array).resize((big_w, big_h), Image.Resampling.BILINEAR))
    top, left = (big_h - h) // 2, (big_w - w) // 2
    assert (image.int() - chw(ref[top:top + h, left:left + w]).int()).abs().max() <= 1


def test_large_jpeg_resize_is_close_to_full_decode(tmp_path):
    # smooth 480 x 640 ramps: the reduced-scale JPEG decode must keep the geometry
    # (a one-pixel shift costs ~4.7 mean error here; the draft decode ~0.4)
    y, x = np.mgrid[0:480, 0:640]
    ramps = np.dstack([x * 255 / 639, y * 255 / 479, 128 + 100 * np.sin(x / 30) * np.cos(y / 40)])
    save(tmp_path / "big.jpg", ramps.round().astype(np.uint8), quality=95)
    image = ImageFolder(tmp_path, image_size=60)[0][0]
    full = np.asarray(Image.open(tmp_path / "big.jpg").resize((80, 60), Image.Resampling.BILINEAR))[:, 10:70]
    assert image.shape == (3, 60, 60)
    assert (image.float() - chw(full).float()).abs().mean() < 1.5


@pytest.mark.parametrize("bad", [0, -5, (1, 2, 3), (0, 4), True, "32", 2.5])
def test_bad_image_size_is_rejected(tmp_path, bad):
    save(tmp_path / "a.png", rgb(4, 4, 0))
    with pytest.raises(ValueError, match="image_size"):
        ImageFolder(tmp_path, image_size=bad)


def test_corrupt_files_are_skipped_counted_and_warned_once(tmp_path):
    good = {f"{i}.png": save(tmp_path / f"{i}.png", rgb(8, 8, i)) for i in (0, 2, 4, 5)}
    (tmp_path / "1.jpg").write_bytes(b"<html>not an image</html>")
    full = (tmp_path / "x.png")
    save(full, rgb(64, 64, 9))
    (tmp_path / "3.png").write_bytes(full.read_bytes()[:300])  # truncated PNG
    full.unlink()
    ds = ImageFolder(tmp_path)
    assert ds.files == ["0.png", "1.jpg", "2.png", "3.png", "4.png", "5.png"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i][0] for i in range(len(ds))] + [ds[i][0] for i in range(len(ds))]
    ours = [w for w in caught if "unreadable" in str(w.message)]
    assert len(ours) == 1 and "1.jpg" in str(ours[0].message)
    assert ds.num_bad == 2 and ds.bad_files == ["1.jpg", "3.png"]
    # a bad item is replaced by the next good one
    expected = [good[n] for n in ("0.png", "2.png", "2.png", "4.png", "4.png", "5.png")]
    for image, array in zip(items, expected * 2):
        assert torch.equal(image, chw(array))


def test_folder_of_only_corrupt_files_raises_clearly(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    ds = ImageFolder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="could be read"):
            ds[0]


def test_empty_missing_and_imageless_folders_raise(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="readme.txt"):
        ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        ImageFolder(tmp_path / "readme.txt")
    save(tmp_path / "a.png", rgb(4, 4, 0))
    with pytest.raises(IndexError):
        ImageFolder(tmp_path)[1]


# ---------------------------------------------------------------- IDX / Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_handwritten_idx(tmp_path, gz):
    images, labels = fake_fashion(tmp_path, gz=gz)
    ds = FashionMNIST(tmp_path, train=False)
    assert len(ds) == len(images) and ds.classes == FASHION_MNIST_CLASSES
    assert ds.files[2] == "fashion-mnist/test/00002"
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and isinstance(label, int)
        assert torch.equal(image[0], torch.from_numpy(images[i])) and label == labels[i]
    resized = FashionMNIST(tmp_path, image_size=32, limit=3)
    assert len(resized) == 3 and resized[0][0].shape == (1, 32, 32)


def test_wrong_magic_and_truncated_idx_raise(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    write_idx(bad, np.zeros((2, 3, 3)), magic=0x0903)
    with pytest.raises(ValueError, match="magic number 00000903"):
        read_idx(bad)
    write_idx(bad, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2 dimensions, expected 3"):
        read_idx(bad, ndim=3)
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ValueError, match="promises 6 bytes"):
        read_idx(bad)
    fake_fashion(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(4), magic=0x0801)  # labels where images belong
    with pytest.raises(ValueError, match="1 dimensions, expected 3"):
        FashionMNIST(tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST(tmp_path)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "zalandoresearch/fashion-mnist" in message and "train-images-idx3-ubyte" in message


def test_download_failure_is_explained_and_leaves_no_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ConnectionError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST.download(tmp_path / "fm")
    assert list((tmp_path / "fm").iterdir()) == []


@pytest.mark.parametrize("train, stem, n", [(True, "train", 60000), (False, "t10k", 10000)])
def test_real_fashion_mnist_matches_naive_read(train, stem, n):
    if not (FMNIST / f"{stem}-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST} (apt-get install -y dataset-fashion-mnist)")
    ds = FashionMNIST(train=train)
    images = naive_idx(FMNIST / f"{stem}-images-idx3-ubyte.gz")
    labels = naive_idx(FMNIST / f"{stem}-labels-idx1-ubyte.gz")
    assert len(ds) == n == len(images)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images.copy()))
    assert ds.labels == labels.tolist()
    image, label = ds[n - 1]
    assert image.shape == (1, 28, 28) and label == int(labels[-1])


# ---------------------------------------------------------------- digits, tensors, wrappers

def test_digits_match_sklearn():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    ds = Digits()
    assert len(ds) == 1797 and ds.classes == [str(d) for d in range(10)]
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    assert images.max() == 255
    np.testing.assert_array_equal(images[:, 0].numpy(), np.round(bunch.images / 16 * 255))  # 0..16 -> 0..255
    assert [ds[i][1] for i in range(len(ds))] == bunch.target.tolist()
    assert Digits(image_size=16)[0][0].shape == (1, 16, 16)


def test_digits_splits_are_disjoint_and_in_order():
    whole, train, test = Digits(), Digits(split="train"), Digits(split="test")
    assert (len(train), len(test)) == (1297, 500)
    assert train.files + test.files == whole.files and train.labels + test.labels == whole.labels
    assert torch.equal(torch.cat([train.images, test.images]), whole.images)
    assert load_dataset("digits", split="test").files == test.files and len(load_dataset("digits")) == 1797
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        Digits(split="unlabeled")


def test_tensor_images_float_conversion_and_labels():
    x = torch.rand(5, 3, 4, 6)
    ds = TensorImages(x, labels=torch.arange(5))
    for i in range(5):
        image, label = ds[i]
        expected = [round(v * 255) for v in x[i].flatten().tolist()]
        assert image.flatten().tolist() == expected and label == i
    assert TensorImages(torch.zeros(2, 7, 7, dtype=torch.uint8))[1][0].shape == (1, 7, 7)
    assert TensorImages(torch.zeros(2, 1, 7, 7))[0][1] == -1


@pytest.mark.parametrize("value, match", [(1.5, r"\[0, 1\]"), (-0.2, r"\[0, 1\]"), (float("nan"), "NaN"),
                                          (255.0, "Divide")])
def test_float_out_of_range_is_rejected(value, match):
    x = torch.rand(3, 1, 4, 4)
    x[1, 0, 2, 2] = value
    with pytest.raises(ValueError, match=match):
        TensorImages(x)
    with pytest.raises(ValueError, match=match):
        as_uint8_dataset([x[1]])[0]


class Mixed(Dataset):
    """Items in every accepted form."""

    def __init__(self):
        self.float_image = torch.rand(3, 5, 5)
        self.pil = Image.fromarray(rgb(5, 5, 0))
        self.gray = torch.randint(0, 256, (5, 5), dtype=torch.uint8)
        self.classes = ["a", "b", "c"]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return [(self.float_image, 2), (self.pil, torch.tensor(1)), self.gray, (self.pil, "caption")][i]


def test_as_uint8_dataset_wraps_tensors_and_pil():
    src = Mixed()
    ds = as_uint8_dataset(src)
    assert len(ds) == 4 and ds.classes == ["a", "b", "c"] and ds.files[0] == "Mixed/00000"
    image, label = ds[0]
    assert label == 2 and torch.equal(image, (src.float_image * 255).round().to(torch.uint8))
    image, label = ds[1]
    assert label == 1 and torch.equal(image, chw(np.asarray(src.pil)))
    image, label = ds[2]
    assert label == -1 and torch.equal(image, src.gray[None])
    assert ds[3][1] == -1
    resized = as_uint8_dataset(src, image_size=(3, 4))
    assert all(resized[i][0].shape[1:] == (3, 4) for i in range(4))
    with pytest.raises(ValueError, match="permute"):
        as_uint8_dataset([torch.zeros(5, 5, 3)])[0]
    with pytest.raises(TypeError, match="PIL"):
        as_uint8_dataset([np.zeros((3, 5, 5))])[0]


@pytest.mark.parametrize("channels", [1, 3, 13])
def test_tensor_resize_matches_float_resize_then_centre_crop(channels):
    """uint8 tensors are resized in uint8 (torchvision's kernel): within one grey level of the float computation."""
    x = torch.randint(0, 256, (4, channels, 30, 50), dtype=torch.uint8)
    ds = TensorImages(x, image_size=20)
    for i in range(4):
        big = torch.nn.functional.interpolate(x[i][None].float(), size=(20, 33), mode="bilinear", antialias=True,
                                              align_corners=False)[0].round().clamp(0, 255)
        ref = big[:, :, 6:26]  # (33 - 20) // 2 columns cut on the left
        assert ds[i][0].dtype == torch.uint8 and ds[i][0].shape == (channels, 20, 20)
        assert (ds[i][0].int() - ref.int()).abs().max() <= 1


# ---------------------------------------------------------------- load_dataset and loaders

def test_load_dataset_specs(tmp_path):
    assert len(load_dataset("digits")) == 1797
    fake_fashion(tmp_path / "fm")
    ds = load_dataset("Fashion_MNIST", root=tmp_path / "fm", train=False, image_size=14)
    assert isinstance(ds, FashionMNIST) and not ds.train and ds[0][0].shape == (1, 14, 14)
    save(tmp_path / "imgs" / "a.png", rgb(6, 6, 0))
    assert isinstance(load_dataset(str(tmp_path / "imgs")), ImageFolder)
    with pytest.raises(ValueError, match="expected one of fashion-mnist, digits, cifar10, stl10"):
        load_dataset("imagenet-typo")


def test_dataloader_collate_single_process(tmp_path):
    for i in range(5):
        save(tmp_path / ("a" if i % 2 else "b") / f"{i}.png", rgb(10 + i, 12, i))
    ds = ImageFolder(tmp_path, image_size=8)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate))
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert batches[0][0].shape == (2, 3, 8, 8) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(5)]))
    assert labels.tolist() == ds.labels


def test_mixed_sizes_without_image_size_fail_at_collate(tmp_path):
    save(tmp_path / "a.png", rgb(8, 8, 0))
    save(tmp_path / "b.png", rgb(8, 9, 1))
    with pytest.raises(ValueError, match="image_size"):
        next(iter(DataLoader(ImageFolder(tmp_path), batch_size=2, collate_fn=collate)))
    with pytest.raises(ValueError, match="channels"):
        collate([(torch.zeros(1, 4, 4, dtype=torch.uint8), 0), (torch.zeros(3, 4, 4, dtype=torch.uint8), 0)])
    images, _ = next(iter(DataLoader(ImageFolder(tmp_path, image_size=8), batch_size=2, collate_fn=collate)))
    assert images.shape == (2, 3, 8, 8)


def collate_in_worker(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    return (*collate(batch), os.getpid())


def test_dataloader_with_two_workers_shares_bad_file_count(tmp_path):
    for i in range(12):
        save(tmp_path / f"{i:02d}.png", rgb(9, 9, i))
    (tmp_path / "05.png").write_bytes(b"broken")
    ds = ImageFolder(tmp_path, image_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_in_worker))
    assert os.getpid() not in {b[2] for b in batches}  # items were decoded in other processes
    # the bad file was only ever opened inside a worker, yet the parent sees it
    assert ds.num_bad == 1 and ds.bad_files == ["05.png"]
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (12, 3, 6, 6)
    fresh = ImageFolder(tmp_path, image_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(images, torch.stack([fresh[i][0] for i in range(12)]))


ODD_SIZES = [(98, 284), (284, 98), (1, 500), (500, 1), (37, 1001), (1001, 37), (55, 57), (94, 99), (97, 283),
             (49, 50), (3, 7), (301, 77)]  # (width, height); each of 28, 64, 96, 224 once left a box at -1e-15


def test_folder_reads_every_odd_sized_photo(tmp_path):
    """No valid JPEG or PNG of an odd size or mode is reported unreadable, at any image size."""
    rng = np.random.default_rng(0)
    kinds = [("L", "jpg"), ("RGB", "jpg"), ("RGB", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png")]
    for i, (w, h) in enumerate(ODD_SIZES):
        for mode, ext in kinds:
            if mode == "I;16":
                image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
            else:
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
            image.save(tmp_path / f"{i}_{w}x{h}_{mode.replace(';', '')}.{ext}")
    for size in (28, 64, 96, 224):
        dataset = ImageFolder(tmp_path, image_size=size, channels=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = {tuple(dataset[i][0].shape) for i in range(len(dataset))}
        assert dataset.unreadable() == {}, size
        assert shapes == {(3, size, size)}
