"""Plots: valid non-blank PNGs, the grid's layout, untouched learner, projections against NumPy."""
from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import matplotlib.image  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402  (a scikit-learn dependency)

import wrapssl  # noqa: E402
from wrapssl import plots  # noqa: E402

from conftest import small_cnn  # noqa: E402


@pytest.fixture(autouse=True)
def one_openmp_thread():
    """scikit-learn's OpenMP t-SNE and k-means spin-wait badly on a busy 2-core CI box; one thread is faster."""
    with threadpool_limits(1):
        yield


def assert_png(path, min_side: int = 200) -> np.ndarray:
    """``path`` is a real PNG of a sensible size that is not one flat colour; returns its pixels."""
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and min(img.shape[:2]) >= min_side
    colours = np.unique(img[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20, "the image is (nearly) blank"
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")], "a temp file was left behind"
    return img


def make_learner(channels: int = 3, views=None) -> wrapssl.Learner:
    return wrapssl.Learner(small_cnn(channels), image_size=16, hidden_layer=-2, projection_hidden_size=32,
                           projection_size=8, channels=channels, views=views)


def sample_images(n: int, channels: int, size: int = 20) -> torch.Tensor:
    """uint8 images with structure (gradients and a square), so views differ visibly."""
    g = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 255, size)
    base = (ramp[None, :] + ramp[:, None]) / 2
    imgs = base.expand(n, channels, size, size).clone()
    imgs[:, :, 4:10, 6:14] = torch.randint(0, 256, (n, channels, 1, 1), generator=g).float()
    return imgs.round().to(torch.uint8)


def planted(n_per: int = 50, k: int = 4, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian clusters in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 10
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    return x, np.repeat(np.arange(k), n_per)


def nn_agreement(xy: np.ndarray, y: np.ndarray) -> float:
    """Fraction of points whose nearest other point in the map has the same label."""
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((y[d.argmin(1)] == y).mean())


# ----------------------------------------------------------------------------- loss curve

def history_with_nan() -> dict[str, list[tuple[int, float]]]:
    loss = [(i, 2 * math.exp(-i / 60) + 0.05 * math.sin(i)) for i in range(200)]
    loss[50] = (50, float("nan"))
    loss[120] = (120, float("inf"))
    return {"loss": loss, "knn": [(i, 0.2 + i / 400) for i in range(0, 200, 25)],
            "lr": [(i, 1e-3 * min(1.0, i / 20)) for i in range(200)],
            "momentum": [(i, 0.99 + 0.01 * i / 199) for i in range(200)]}


def test_loss_curve_png_panels_and_skipped_nan(tmp_path):
    history = history_with_nan()
    out = plots.loss_curve(history, tmp_path / "loss.png", title="demo")
    assert out == tmp_path / "loss.png"
    assert_png(out)

    fig = plots.loss_curve_figure(history)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 2 and "2 non-finite values skipped" in titles[0]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "kNN accuracy (%)"]  # lr and momentum: metrics.csv
    raw, smooth = fig.axes[0].get_lines()[:2]
    for line in (raw, smooth):
        assert np.isfinite(line.get_ydata()).all() and len(line.get_ydata()) == 198
    assert 50 not in raw.get_xdata() and 120 not in raw.get_xdata()
    # the smoothed line is a bias-corrected EMA: its first point is the first value, and it is smoother
    assert smooth.get_ydata()[0] == pytest.approx(history["loss"][0][1])
    assert np.abs(np.diff(smooth.get_ydata(), 2)).mean() < np.abs(np.diff(raw.get_ydata(), 2)).mean() / 3


def test_loss_curve_only_loss_and_bad_input(tmp_path):
    fig = plots.loss_curve_figure({"loss": [(0, 1.0), (1, 0.5)]})
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="empty"):
        plots.loss_curve({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plots.loss_curve({"loss": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="pairs"):
        plots.loss_curve({"loss": [1.0, 2.0]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- augmentation grid

def learner_state(learner: wrapssl.Learner) -> dict:
    return {"tensors": {k: v.clone() for k, v in learner.state_dict().items() if isinstance(v, torch.Tensor)},
            "step": learner.step, "modes": [m.training for m in learner.modules()],
            "grads": [p.grad for p in learner.parameters()], "rng": torch.get_rng_state()}


@pytest.mark.parametrize("learner_channels,image_channels,multicrop", [(3, 3, True), (1, 1, False), (3, 1, False)])
def test_augmentation_grid(tmp_path, learner_channels, image_channels, multicrop):
    views = wrapssl.multicrop_views(16, n_local=2, local_size=8, channels=learner_channels) if multicrop else None
    learner = make_learner(learner_channels, views)
    images = sample_images(6, image_channels)
    before = learner_state(learner)

    out = plots.augmentation_grid(learner, images, tmp_path / "grid.png", n=4)
    assert_png(out)
    fig = plots.augmentation_grid_figure(learner, images, n=4)

    after = learner_state(learner)
    assert after["step"] == before["step"] and after["modes"] == before["modes"]
    assert all(g is None for g in after["grads"])
    assert all(torch.equal(before["tensors"][k], v) for k, v in after["tensors"].items())
    assert torch.equal(after["rng"], before["rng"]), "plotting consumed the training's random numbers"

    n_views = len(learner.views.transforms)
    assert n_views == (4 if multicrop else 2)
    assert len(fig.axes) == 4 * (1 + n_views)
    titles = [ax.get_title() for ax in fig.axes[:1 + n_views]]
    assert titles[0] == "original" and titles[1].startswith("global 1")
    assert any(t.startswith("local") for t in titles) == multicrop
    # every cell shows its own image at its own size: originals 20 px, globals 16, locals 8
    sides = [ax.get_images()[0].get_array().shape[0] for ax in fig.axes[:1 + n_views]]
    assert sides == [20, 16, 16] + ([8, 8] if multicrop else [])
    fig.draw_without_rendering()  # run the layout: local crops must show smaller than global ones
    widths = [ax.get_window_extent().width for ax in fig.axes[:1 + n_views]]
    assert widths[1] == pytest.approx(widths[0], rel=0.05)
    assert all(w == pytest.approx(widths[1] / 2, rel=0.1) for w in widths[3:])
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.ndim == (2 if learner_channels == 1 else 3)
    assert np.allclose(np.asarray(shown)[..., 0] if shown.ndim == 3 else shown, images[0, 0].numpy() / 255)


def test_augmentation_grid_seeded_and_fewer_images():
    learner = make_learner()
    images = sample_images(3, 3)
    a = plots.augmentation_grid_figure(learner, images, n=8, seed=5)
    b = plots.augmentation_grid_figure(learner, images, n=8, seed=5)
    assert len(a.axes) == 3 * 3  # only 3 images exist
    arrays = [[np.asarray(ax.get_images()[0].get_array()) for ax in f.axes] for f in (a, b)]
    assert all(np.array_equal(p, q) for p, q in zip(*arrays))
    with pytest.raises(ValueError, match="positive int"):
        plots.augmentation_grid_figure(learner, images, n=0)


# ----------------------------------------------------------------------------- projections

def test_project_2d_pca_matches_numpy_eigendecomposition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 12)) * np.linspace(5, 0.5, 12) + 3.0
    xy = plots.project_2d(torch.from_numpy(x).float(), method="pca")
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(xc.T @ xc)  # a second route: covariance eigenvectors, not an SVD
    ref = xc @ evecs[:, np.argsort(evals)[::-1][:2]]
    assert xy.shape == (100, 2)
    for j in range(2):
        sign = np.sign(xy[:, j] @ ref[:, j])
        np.testing.assert_allclose(xy[:, j], sign * ref[:, j], rtol=1e-4, atol=1e-3)


def test_tsne_shape_and_determinism():
    x, _ = planted(n_per=30, k=3, dim=64)
    a = plots.project_2d(x, method="tsne", seed=3)
    b = plots.project_2d(x, method="tsne", seed=3)
    assert a.shape == (90, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_planted_clusters_stay_separated(method):
    x, y = planted()
    xy = plots.project_2d(x, method=method, seed=0)
    assert nn_agreement(xy, y) > 0.97
    shuffled = np.random.default_rng(0).permutation(y)  # the check itself can fail
    assert nn_agreement(xy, shuffled) < 0.5


def test_project_2d_bad_input():
    with pytest.raises(ValueError, match="method"):
        plots.project_2d(np.zeros((5, 3)), method="isomap")
    with pytest.raises(ValueError, match="NaN"):
        plots.project_2d(np.full((5, 3), np.nan), method="pca")
    with pytest.raises(ValueError, match="shape"):
        plots.project_2d(np.zeros(5), method="pca")


def test_umap_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match="pip install umap-learn"):
        plots.project_2d(np.random.rand(10, 4), method="umap")


# ----------------------------------------------------------------------------- embedding map

def test_embedding_map_labels_names_thumbnails(tmp_path):
    x, y = planted(n_per=60, k=4, dim=16)
    thumbs = torch.randint(0, 256, (len(x), 1, 12, 12), dtype=torch.uint8)
    names = ["ant", "bee", "cat", "dog"]
    out = plots.embedding_map(x, y, tmp_path / "map.png", method="tsne", thumbnails=thumbs, class_names=names,
                              max_points=200, n_thumbnails=10)
    assert_png(out)

    fig = plots.embedding_map_figure(x, y, "pca", thumbs, names, max_points=200, n_thumbnails=10)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
    assert sum(len(c.get_offsets()) for c in ax.collections) == 200  # subsampled to max_points
    assert sum(isinstance(a, AnnotationBbox) for a in ax.artists) == 10
    assert "200 of 240" in ax.get_title() and ax.get_xlabel() == "PCA 1"


def test_embedding_map_subsample_is_deterministic():
    x, y = planted(n_per=60, k=4, dim=16)
    offsets = [np.concatenate([c.get_offsets() for c in
                               plots.embedding_map_figure(x, y, "pca", max_points=100, seed=s).axes[0].collections])
               for s in (0, 0, 1)]
    np.testing.assert_array_equal(offsets[0], offsets[1])
    assert not np.array_equal(offsets[0], offsets[2])


def test_embedding_map_without_labels_uses_kmeans(tmp_path):
    x, y = planted(n_per=40, k=3, dim=16)
    fig = plots.embedding_map_figure(torch.from_numpy(x), None, "pca", n_clusters=3)
    ax = fig.axes[0]
    assert ax.get_legend().get_title().get_text() == "k-means cluster"
    # each k-means colour should be one planted cluster: every scatter holds points of one label
    assert len(ax.collections) == 3 and all(len(c.get_offsets()) == 40 for c in ax.collections)
    # all -1 labels behave like no labels; some -1 are drawn as "unlabelled"
    fig = plots.embedding_map_figure(x, np.full(len(x), -1), "pca", n_clusters=3)
    assert fig.axes[0].get_legend().get_title().get_text() == "k-means cluster"
    partial = y.copy()
    partial[:10] = -1
    fig = plots.embedding_map_figure(x, partial, "pca")
    assert "unlabelled" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert_png(plots.embedding_map(x, None, tmp_path / "km.png", method="pca"))


def test_embedding_map_bad_labels():
    x, _ = planted(n_per=5, k=2, dim=4)
    with pytest.raises(ValueError, match="labels must have shape"):
        plots.embedding_map_figure(x, np.zeros(3, dtype=int), "pca")
    with pytest.raises(ValueError, match="thumbnails"):
        plots.embedding_map_figure(x, None, "pca", thumbnails=np.zeros((10, 5, 8, 8), np.uint8))


# ----------------------------------------------------------------------------- bar chart

def test_bar_chart(tmp_path):
    values = {"kNN before": 0.41, "kNN after": 0.73, "linear probe": 0.8}
    assert_png(plots.bar_chart(values, tmp_path / "bar.png", "kNN accuracy", "accuracy"))
    ax = plots.bar_chart_figure(values, "kNN accuracy", "accuracy").axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx(list(values.values()))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(values)
    assert ax.get_ylabel() == "accuracy" and ax.get_title() == "kNN accuracy"
    with pytest.raises(ValueError, match="non-empty"):
        plots.bar_chart({}, tmp_path / "empty.png")


# ----------------------------------------------------------------------------- plumbing

def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "bar.png"
    path.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.bar_chart({"a": 1.0}, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["bar.png"]


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import name` raise ImportError
    learner = make_learner()
    calls = [lambda: plots.loss_curve({"loss": [(0, 1.0)]}, tmp_path / "a.png"),
             lambda: plots.augmentation_grid(learner, sample_images(2, 3), tmp_path / "b.png"),
             lambda: plots.embedding_map(np.random.rand(5, 3), None, tmp_path / "c.png", method="pca"),
             lambda: plots.bar_chart({"a": 1.0}, tmp_path / "d.png")]
    for call in calls:
        with pytest.raises(ImportError, match=r"pip install matplotlib.*wrapssl\[plots\]"):
            call()
    assert not os.listdir(tmp_path)


def test_learning_curve_draws_points_and_baseline_levels(tmp_path):
    points = [(5.0, 0.86), (0.0, 0.78), (2.5, 0.83)]  # unsorted on purpose
    fig = plots.learning_curve_figure(points, {"raw pixels": 0.7885, "random init": 0.779})
    ax = fig.axes[0]
    curve, *levels = ax.get_lines()
    assert list(curve.get_xdata()) == [0.0, 2.5, 5.0]
    assert np.allclose(curve.get_ydata(), [78.0, 83.0, 86.0])
    assert sorted(float(line.get_ydata()[0]) for line in levels) == pytest.approx([77.9, 78.85])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "raw pixels: 78.8%" in legend and "random init: 77.9%" in legend
    path = plots.learning_curve(points, tmp_path / "curve.png", {"raw pixels": 0.7885})
    assert matplotlib.image.imread(path).ndim == 3


def test_learning_curve_bad_input():
    with pytest.raises(ValueError, match="points is empty"):
        plots.learning_curve_figure([])
    with pytest.raises(ValueError, match="minutes, accuracy"):
        plots.learning_curve_figure([(0, "high")])


def test_reconstruction_grid_shows_the_image_its_mask_and_the_reconstruction(tmp_path):
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    learner = wrapssl.Learner(vit, image_size=16, method="mae", decoder_dim=16, decoder_depth=1, decoder_heads=2)
    images = sample_images(3, 3, size=16)
    state = {k: v.clone() for k, v in learner.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    fig = plots.reconstruction_grid_figure(learner, images, n=8, seed=0)
    assert torch.equal(torch.get_rng_state(), rng) and learner.training  # the learner and the RNG untouched
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in state.items())
    axes = np.array(fig.axes).reshape(3, 3)  # rows original, masked, reconstruction; one column per image
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["original", "masked", "reconstruction"]
    for c in range(3):
        original, masked, recon = (np.asarray(ax.get_images()[0].get_array()) for ax in axes[:, c])
        assert np.allclose(original, images[c].permute(1, 2, 0).numpy() / 255, atol=1e-6)
        hidden = np.all(masked == 0.5, axis=-1) & ~np.all(original == 0.5, axis=-1)
        # 12 of the 16 4x4 patches are masked; the reconstruction keeps the visible pixels as they were
        assert hidden.sum() == 12 * 16
        assert np.allclose(recon[~hidden], original[~hidden], atol=1e-5)
        assert not np.allclose(recon[hidden], original[hidden], atol=1e-2)
    assert "75%" in fig.get_suptitle()
    assert_png(plots.reconstruction_grid(learner, images, tmp_path / "mae.png"))
    with pytest.raises(ValueError, match="method='mae'"):
        plots.reconstruction_grid_figure(make_learner(), images)


class HideLeftHalf(torch.nn.Module):
    """A stand-in for a masked-image learner: hides the left half and predicts standardised 0 there (the mean)."""

    def __init__(self, mean, std):
        super().__init__()
        self.channels, self.image_size = 3, 16
        self.method = SimpleNamespace(reconstruct=self.reconstruct)  # what the plot calls: learner.method.reconstruct
        self.normalize = wrapssl.augment.Normalize(mean, std)
        self.seen_training = None

    def reconstruct(self, x):
        self.seen_training = self.training
        masked = torch.zeros_like(x, dtype=torch.bool)
        masked[..., :8] = True
        return masked, torch.where(masked, torch.zeros_like(x), x)


def test_reconstruction_grid_takes_any_learner_like_object_and_undoes_its_normalisation():
    mean, std = (0.2, 0.5, 0.8), (0.5, 0.25, 0.1)
    stand_in = HideLeftHalf(mean, std)
    images = sample_images(2, 3, size=16)
    fig = plots.reconstruction_grid_figure(stand_in, images, n=2)
    assert stand_in.seen_training is False and stand_in.training  # reconstructed in eval mode, mode restored
    axes = np.array(fig.axes).reshape(3, 2)
    for c in range(2):
        recon = np.asarray(axes[2, c].get_images()[0].get_array())
        expected = images[c].permute(1, 2, 0).numpy() / 255
        expected[:, :8] = mean  # a standardised 0 is the mean in [0, 1]
        np.testing.assert_allclose(recon, expected, atol=1e-6)


def test_plots_is_a_leaf_that_imports_no_learner_trainer_or_data():
    """Every import in wrapssl/plots stays below it: no Learner, Trainer, methods, data loaders, evaluation, selection or app."""
    import ast
    import pathlib

    root = pathlib.Path(plots.__file__).parent
    above = ("learner", "trainer", "methods", "data", "compat", "app", "cli", "train", "finetune", "backbone",
             "evaluate", "select")
    found = []
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:  # from ..x import y
                found.append(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("wrapssl"):
                found.append((node.module.split(".") + [""])[1])
            elif isinstance(node, ast.Import):
                found += [a.name.split(".")[1] for a in node.names if a.name.startswith("wrapssl.")]
    assert found and not set(found) & set(above), sorted(set(found) & set(above))
