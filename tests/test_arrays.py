"""Data that is not grey or RGB: folders of .npy (or .tif) stacks and tensor files of any channel count, read at
full precision, and the app training on them with normalisation statistics given or estimated."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import reset_accelerate
from wrapssl import app
from wrapssl.data import ArrayFolder, load_array_file, load_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def stacks(folder, bands: int = 13, per_class: int = 12, size: int = 16, dtype=np.uint16, seed: int = 0):
    """Two classes of random multispectral stacks (C, H, W); class b is brighter. Returns {relative path: array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for c, name in enumerate("ab"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            top = 3000 + 4000 * c
            array = rng.integers(0, top, (bands, size, size)).astype(dtype)
            np.save(folder / name / f"{i:02d}.npy", array)
            written[f"{name}/{i:02d}.npy"] = array
    return written


def test_npy_stacks_are_read_at_full_precision(tmp_path):
    written = stacks(tmp_path)
    ds = load_dataset(str(tmp_path))
    assert isinstance(ds, ArrayFolder) and ds.channels == 13 and ds.classes == ["a", "b"]
    for i, name in enumerate(ds.files):
        image, label = ds[i]
        assert image.dtype == torch.float32 and label == "ab".index(name[0])
        assert torch.equal(image, torch.from_numpy(written[name].astype(np.float32) / 65535))  # no uint8 rounding


def test_channels_last_floats_and_bad_values(tmp_path):
    hwc = np.random.default_rng(1).random((10, 10, 5)).astype(np.float32)
    (tmp_path / "ok").mkdir()
    np.save(tmp_path / "ok" / "x.npy", hwc)
    ds = ArrayFolder(tmp_path / "ok")
    assert torch.equal(ds[0][0], torch.from_numpy(hwc.transpose(2, 0, 1).copy()))
    (tmp_path / "raw").mkdir()
    np.save(tmp_path / "raw" / "x.npy", hwc * 10000)  # raw reflectances: not in [0, 1]
    with pytest.raises(ValueError, match=r"float values in \[.*\]; expected \[0, 1\]: scale them"):
        ArrayFolder(tmp_path / "raw")


def test_a_stack_with_another_band_count_is_unreadable_not_mixed(tmp_path):
    stacks(tmp_path, per_class=2)
    np.save(tmp_path / "b" / "zz.npy", np.zeros((4, 16, 16), dtype=np.uint16))
    ds = ArrayFolder(tmp_path)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        items = [ds[i][0] for i in range(len(ds))]
    assert {tuple(x.shape) for x in items} == {(13, 16, 16)}
    assert "has 4 channels, a/00.npy has 13" in ds.unreadable()["b/zz.npy"]


def test_tensor_files_with_labels(tmp_path):
    images = torch.rand(20, 6, 8, 8)
    torch.save({"images": images, "labels": torch.arange(20) % 2, "classes": ["x", "y"]}, tmp_path / "data.pt")
    ds = load_array_file(tmp_path / "data.pt")
    assert len(ds) == 20 and ds.classes == ["x", "y"] and ds[3][1] == 1
    assert torch.equal(ds[3][0], images[3])  # six bands keep float precision
    np.save(tmp_path / "data.npy", (images.numpy() * 255).astype(np.uint8))
    assert torch.equal(load_dataset(str(tmp_path / "data.npy"))[5][0], (images[5] * 255).to(torch.uint8))


def test_tif_stacks_with_tifffile(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    array = np.random.default_rng(2).integers(0, 65535, (7, 12, 12)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "x.tif", array)
    ds = load_dataset(str(tmp_path))
    assert torch.equal(ds[0][0], torch.from_numpy(array.astype(np.float32) / 65535))


def naive_stats(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std over every pixel of every stack, in float64, scaled as the reader scales."""
    x = np.stack([a.astype(np.float64) / 65535 for a in arrays])
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def test_the_app_trains_on_13_bands_with_estimated_statistics(tmp_path, capsys):
    written = stacks(tmp_path / "data")
    metrics = app.main(["--data", str(tmp_path / "data"), "--image-size", "16", "--batch-size", "8", "--steps", "2",
                        "--knn-k", "3", "--no-plots", "--labels", "none", "--out", str(tmp_path / "run")])
    config = torch.load(tmp_path / "run" / "checkpoint-00000002.pt", weights_only=True)["config"]
    assert config["channels"] == 13
    mean, std = naive_stats(list(written.values()))
    printed = capsys.readouterr().out.split("--normalize ", 1)[1].split()[:2]
    got_mean, got_std = (np.array([float(v) for v in part.split(",")]) for part in printed)
    np.testing.assert_allclose(got_mean, mean, atol=6e-5)  # printed to 4 decimals
    np.testing.assert_allclose(got_std, std, atol=6e-5)
    assert 0 <= metrics["knn_after"] <= 1 and metrics["health"]["dim"] == 128


def test_the_app_takes_statistics_given_by_the_user(tmp_path):
    stacks(tmp_path / "data", bands=4)
    means, stds = "0.05,0.05,0.05,0.05", "0.03,0.03,0.03,0.03"
    app.main(["--data", str(tmp_path / "data"), "--image-size", "16", "--batch-size", "8", "--steps", "1",
              "--knn-k", "3", "--no-plots", "--labels", "none", "--normalize", means, stds,
              "--out", str(tmp_path / "run")])
    config = torch.load(tmp_path / "run" / "checkpoint-00000001.pt", weights_only=True)["config"]
    assert config["method.normalize"] == repr(((0.05,) * 4, (0.03,) * 4))
    reset_accelerate()
    with pytest.raises(SystemExit, match="--normalize gives 3 means and stds, and the net takes 4 channels"):
        app.main(["--data", str(tmp_path / "data"), "--image-size", "16", "--batch-size", "8", "--steps", "1",
                  "--no-plots", "--normalize", "0.5,0.5,0.5", "0.2,0.2,0.2", "--out", str(tmp_path / "bad")])


def test_the_app_trains_on_a_tensor_file(tmp_path):
    images = torch.rand(24, 5, 8, 8)
    torch.save({"images": images, "labels": torch.arange(24) % 3}, tmp_path / "bands.pt")
    metrics = app.main(["--data", str(tmp_path / "bands.pt"), "--image-size", "8", "--batch-size", "8", "--steps",
                        "2", "--knn-k", "3", "--no-plots", "--labels", "none", "--out", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 2 and metrics["knn_memory"] > 0


def test_wrapssl_embed_uses_the_runs_statistics(tmp_path):
    """`wrapssl embed` on a 13-band run: the embeddings are the net's pre-logits (pooled features through its
    BN-neck) of images normalised with the statistics the run estimated (recorded in metrics.json), computed
    here by hand."""
    from wrapssl import cli
    from wrapssl.archs import SmallResNet
    from wrapssl.evaluate import Embeddings

    stacks(tmp_path / "data", per_class=6)
    app.main(["--data", str(tmp_path / "data"), "--image-size", "16", "--batch-size", "8", "--steps", "1",
              "--knn-k", "3", "--no-plots", "--labels", "none", "--out", str(tmp_path / "run")])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in
                 json.loads((tmp_path / "run" / "metrics.json").read_text())["args"]["normalize"])
    cli.main(["embed", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--device", "cpu",
              "--out", str(tmp_path / "e.npz")])
    got = Embeddings.load_npz(tmp_path / "e.npz")
    net = SmallResNet(channels=13, num_classes=2)
    net.load_state_dict(torch.load(tmp_path / "run" / "backbone.pt", weights_only=True))
    ds = load_dataset(str(tmp_path / "data"))
    x = (torch.stack([ds[i][0] for i in range(len(ds))]) - mean) / std
    with torch.no_grad():
        net.eval()
        features = net.neck(torch.flatten(net.avgpool(net.layers(net.relu(net.bn1(net.conv1(x))))), 1))
    torch.testing.assert_close(got.embeddings, features, rtol=1e-4, atol=1e-5)
