"""CIFAR-10 and STL-10 read from torchvision's on-disk formats: small files written here, read back item by item
against torchvision's own readers (their checksum test, meant for the real archives, switched off)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from wrapssl.data import CIFAR10, STL10, load_dataset

CIFAR_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, per_batch: int = 4, seed: int = 0) -> Path:
    """cifar-10-batches-py as torchvision expects it: five train batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_vis": 3072}, f, protocol=2)
    return folder


def write_stl(root: Path, n: dict[str, int], seed: int = 0) -> Path:
    """stl10_binary as torchvision expects it: column-major 3x96x96 images, 1-based uint8 labels."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, count in n.items():
        rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            rng.integers(1, 11, count, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return folder


def as_chw(pil_image) -> torch.Tensor:
    """torchvision's PIL item as a CHW uint8 tensor (the naive conversion)."""
    return torch.from_numpy(np.array(pil_image)).permute(2, 0, 1)


@pytest.mark.parametrize("train", [True, False])
def test_cifar10_matches_torchvision(tmp_path, monkeypatch, train):
    write_cifar(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    theirs = torchvision.datasets.CIFAR10(str(tmp_path), train=train)
    ours = load_dataset("CIFAR-10", root=tmp_path, train=train)
    assert isinstance(ours, CIFAR10) and len(ours) == len(theirs) == (20 if train else 4)
    assert ours.classes == CIFAR_NAMES
    for i in range(len(theirs)):
        image, label = ours[i]
        assert image.dtype == torch.uint8 and torch.equal(image, as_chw(theirs[i][0]))
        assert label == theirs[i][1]


@pytest.mark.parametrize("split", ["train", "test", "unlabeled", "train+unlabeled"])
def test_stl10_matches_torchvision(tmp_path, monkeypatch, split):
    write_stl(tmp_path, {"train": 3, "test": 2, "unlabeled": 4})
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    theirs = torchvision.datasets.STL10(str(tmp_path), split=split)
    ours = load_dataset("stl10", root=tmp_path / "stl10_binary", split=split)  # the folder itself works too
    assert isinstance(ours, STL10) and len(ours) == len(theirs)
    assert ours.classes == [f"class{i}" for i in range(10)]
    for i in range(len(theirs)):
        image, label = ours[i]
        assert torch.equal(image, as_chw(theirs[i][0])), i
        assert label == theirs[i][1]  # torchvision also gives -1 to unlabeled images


def test_stl10_resizes_and_reads_lazily(tmp_path):
    write_stl(tmp_path, {"train": 2})
    full = STL10(tmp_path, "train")
    small = STL10(tmp_path, "train", image_size=48)
    expected = torch.nn.functional.interpolate(full[1][0][None].float(), size=(48, 48), mode="bilinear",
                                               antialias=True, align_corners=False)[0].round().clamp(0, 255)
    assert small[1][0].dtype == torch.uint8  # resized in uint8: within one grey level of the float computation
    assert (small[1][0].int() - expected.int()).abs().max() <= 1
    assert isinstance(full.images[0], np.memmap)  # a 2.6 GB unlabeled split stays on disk


def test_missing_or_broken_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="needs the folder it was downloaded to"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="stl10_binary.tar.gz"):
        load_dataset("stl10", root=tmp_path, split="unlabeled")
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_dataset("cifar10", root=tmp_path, split="unlabeled")
    folder = write_stl(tmp_path / "s", {"train": 2})
    with open(folder / "train_X.bin", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="download it again"):
        load_dataset("stl10", root=tmp_path / "s")


def test_cifar_batches_cannot_run_code(tmp_path):
    folder = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="print is not part of a CIFAR-10 batch"):
        load_dataset("cifar10", root=tmp_path, train=False)
