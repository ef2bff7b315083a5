"""Figures of a training run: loss curve, augmentation grid, MAE reconstructions, 2-D embedding map, bar chart.

matplotlib is an optional extra (``pip install wrapssl[plots]``) imported only inside these
functions. Figures are built with the object-oriented ``matplotlib.figure.Figure`` and never
through pyplot, so the user's selected backend and open windows are left alone; PNGs are
rendered by Agg and written atomically. Each ``*_figure`` function builds the figure without
saving it (for notebooks and tests); the plain-named function saves it and returns the path.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .augment import to_float
from .checks import positive_int
from .files import atomic_open

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .learner import Learner

__all__ = [
    "loss_curve", "loss_curve_figure", "augmentation_grid", "augmentation_grid_figure",
    "embedding_map", "embedding_map_figure", "project_2d", "bar_chart", "bar_chart_figure",
    "learning_curve", "learning_curve_figure", "reconstruction_grid", "reconstruction_grid_figure",
]

History = Mapping[str, Sequence[tuple[int, float]]]
PathLike = str | os.PathLike
FAMILIES = ("loss", "knn", "health")  # panels in this order; other families follow by name
HEALTH_KEYS = ("rank", "embedding_std")  # the health panel: effective rank, spread of normalised embeddings
# logged to metrics.csv and TensorBoard, not drawn: the schedules are known and the speed is printed
NOT_DRAWN = ("lr", "momentum", "images_per_s", "train_minutes")
Y_LABELS = {"loss": "loss", "knn": "kNN accuracy (%)", "health": "effective rank"}
MIN_SPAN = 0.2  # a loss axis spans at least this fraction of the loss: a 2% change must not fill the panel
METHOD_NAMES = {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}
DPI = 110


# ----------------------------------------------------------------------------- plumbing

def _figure_class() -> type:
    """matplotlib's Figure class, or an ImportError that says how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("wrapssl.plots needs matplotlib: pip install matplotlib "
                          "(or pip install wrapssl[plots])") from e
    return Figure


def _sklearn(what: str) -> None:
    """Raise an ImportError that says how to install scikit-learn, if it is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs scikit-learn: pip install scikit-learn "
                          "(or pip install wrapssl[eval])") from e


def _save(fig: "Figure", path: PathLike) -> Path:
    """Render ``fig`` as PNG and move it over ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        # Figure.savefig renders with Agg for PNG without touching pyplot's backend
        fig.savefig(f, format="png", dpi=DPI)
    return Path(path)


def _numpy(x: Any) -> np.ndarray:
    """A NumPy copy of a tensor, array or nested sequence (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- loss curve

def _family(key: str) -> str | None:
    """The panel a history key belongs to (``loss``, ``loss/val`` and ``loss_ema`` share ``loss``; ``rank`` and
    ``embedding_std`` make ``health``); None for what is not drawn."""
    if key in HEALTH_KEYS:
        return "health"
    if key in NOT_DRAWN:
        return None
    for fam in FAMILIES:
        if key == fam or key.startswith((f"{fam}/", f"{fam}_")):
            return fam
    return key.split("/")[0]


def _series(key: str, points: Sequence[tuple[int, float]]) -> np.ndarray:
    """(n, 2) float array of (step, value) rows sorted by step; a ValueError on malformed input."""
    try:
        arr = np.array([(float(s), float(v)) for s, v in points], dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"history[{key!r}] must be a list of (step, value) pairs, e.g. [(0, 1.3), (10, 1.1)]: "
                         f"{e}") from e
    return arr[np.argsort(arr[:, 0], kind="stable")]


def _smooth(values: np.ndarray) -> np.ndarray:
    """Bias-corrected EMA over a window of about 1/20 of the run (at least 1, at most 200 points)."""
    window = min(200.0, max(1.0, len(values) / 20))
    beta = 1.0 - 1.0 / window
    out = np.empty_like(values)
    avg = 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))  # undo the pull towards the initial 0
    return out


def loss_curve_figure(history: History, title: str = "Training", dim: int | None = None) -> "Figure":
    """The training-curves figure, x = step: the loss (raw and smoothed), kNN accuracy in %, and health (effective
    rank and spread, with the collapse thresholds of ``wrapssl.health``; ``dim``: the embedding width, which
    the spread's threshold needs). Learning rate, momentum and speed are not drawn."""
    Figure = _figure_class()
    from matplotlib.ticker import MaxNLocator

    if not isinstance(history, Mapping):
        raise TypeError(f"history must be a dict of name -> [(step, value), ...], got {type(history).__name__}")
    series = {k: _series(k, v) for k, v in history.items()}
    series = {k: v for k, v in series.items() if len(v) and _family(k) is not None}
    if not series:
        raise ValueError("history is empty: nothing to plot; log at least one (step, value) pair, "
                         "e.g. {'loss': [(0, 1.3), (10, 1.1)]}")
    groups: dict[str, list[str]] = {}
    for key in series:
        groups.setdefault(_family(key), []).append(key)
    order = [f for f in FAMILIES if f in groups] + sorted(f for f in groups if f not in FAMILIES)

    fig = Figure(figsize=(8, 2.8 * len(order) + 0.6), layout="constrained")
    axes = fig.subplots(len(order), 1, sharex=True, squeeze=False)[:, 0]
    for ax, fam in zip(axes, order):
        panel = {k: series[k] for k in groups[fam]}
        if fam == "health":
            _draw_health(ax, panel, dim)
        else:
            _draw_family(ax, fam, panel)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    fig.suptitle(title)
    return fig


def _finite(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values) of the finite rows of a (step, value) array, and the steps whose value is not finite."""
    ok = np.isfinite(arr).all(axis=1)
    return arr[ok, 0], arr[ok, 1], arr[~ok & np.isfinite(arr[:, 0]), 0]


def _loss_limits(values: np.ndarray) -> tuple[float, float]:
    """y limits that show the loss's trend without turning its noise into cliffs: the central 98% of the values,
    widened to at least MIN_SPAN of their size, never below 0 for a loss that is never negative."""
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    need = MIN_SPAN * max(abs(lo), abs(hi), 1e-12)
    if hi - lo < need:
        mid = (lo + hi) / 2
        lo, hi = mid - need / 2, mid + need / 2
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if float(values.min()) >= 0 and lo < 0:
        lo, hi = 0.0, hi - lo
    return lo, hi


def _percent_limits(values: np.ndarray) -> tuple[float, float]:
    """y limits in % on a grid of 10 points: at least 5 points of room around the values and 20 points in all."""
    lo = max(0.0, math.floor((float(values.min()) - 5) / 10) * 10)
    hi = min(100.0, math.ceil((float(values.max()) + 5) / 10) * 10)
    if hi - lo < 20:
        lo = max(0.0, hi - 20)
        hi = max(hi, lo + 20)
    return lo, hi


def _draw_family(ax: Any, family: str, series: dict[str, np.ndarray]) -> None:
    """Draw one panel; non-finite values are left out and marked under the axis."""
    skipped, drawn = 0, []
    scale = 100.0 if family == "knn" else 1.0  # accuracy in %
    for i, (key, arr) in enumerate(series.items()):
        colour = f"C{i}"
        steps, values, bad = _finite(arr)
        values = scale * values
        skipped += int(len(arr) - len(values))
        drawn.append(values)
        if family == "loss" and len(values) >= 5:
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, label=f"{key} (raw)")
            ax.plot(steps, _smooth(values), color=colour, linewidth=1.8, label=f"{key} (smoothed)")
        else:
            marker = "o" if family == "knn" or len(values) < 30 else None
            ax.plot(steps, values, color=colour, marker=marker, markersize=3.5, linewidth=1.5, label=key)
        if len(bad):
            # x in data coordinates, y in axes coordinates: a rug just above the x axis
            ax.plot(bad, np.full(len(bad), 0.03), "x", color="crimson", markersize=5,
                    transform=ax.get_xaxis_transform(), label=f"{key}: non-finite (skipped)")
    name = Y_LABELS.get(family, family)
    ax.set_title(name + (f" — {skipped} non-finite value{'s' * (skipped != 1)} skipped" if skipped else ""))
    ax.set_ylabel(name)
    ax.grid(True, alpha=0.3)
    values = np.concatenate(drawn)
    if len(values) and family == "knn":
        ax.set_ylim(*_percent_limits(values))
    elif len(values) and family == "loss":
        ax.set_ylim(*_loss_limits(values))
    ax.ticklabel_format(axis="y", useOffset=False)  # 1.90 ... 1.94, not +1.9 and 0.00 ... 0.04
    ax.legend(loc="best", fontsize="small")


def _draw_health(ax: Any, series: dict[str, np.ndarray], dim: int | None) -> None:
    """Effective rank (left axis) and spread (right axis) from 0, each with its collapse threshold dashed."""
    from .health import COLLAPSE_RANK, COLLAPSE_STD

    handles = []
    rank, spread = series.get("rank"), series.get("embedding_std")
    if rank is not None:
        steps, values, _ = _finite(rank)
        handles += ax.plot(steps, values, "o-", color="C0", markersize=3.5, label="effective rank")
        handles.append(ax.axhline(COLLAPSE_RANK, color="C0", linestyle="--", linewidth=1,
                                  label=f"collapsed below rank {COLLAPSE_RANK:g}"))
        ax.set_ylim(0, max(1.15 * float(values.max(initial=0)), 3 * COLLAPSE_RANK))
        ax.set_ylabel("effective rank", color="C0")
    if spread is not None:
        right = ax.twinx() if rank is not None else ax
        steps, values, _ = _finite(spread)
        handles += right.plot(steps, values, "s-", color="C1", markersize=3.5, label="spread")
        top = 1.15 * float(values.max(initial=0))
        if dim:
            threshold = COLLAPSE_STD / math.sqrt(dim)
            handles.append(right.axhline(threshold, color="C1", linestyle=":", linewidth=1,
                                         label=f"collapsed below spread {threshold:.2g}"))
            top = max(top, 3 * threshold)
        right.set_ylim(0, top or 1.0)
        right.set_ylabel("spread of normalised embeddings", color="C1")
    ax.set_title("health (no labels needed): far above the dashed lines is healthy")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="center right", fontsize="small")


def loss_curve(history: History, path: PathLike, title: str = "Training", dim: int | None = None) -> Path:
    """Save the training curves (loss raw and smoothed; kNN and health when logged) as a PNG."""
    return _save(loss_curve_figure(history, title, dim), path)


# ----------------------------------------------------------------------------- augmentation grid

@contextlib.contextmanager
def _seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Run with a private RNG stream, so a plot neither consumes nor depends on the training's."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _as_image(x: torch.Tensor) -> np.ndarray:
    """(C,H,W) float in [0,1] as an (H,W) or (H,W,3) array for imshow."""
    a = x.detach().float().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def _view_names(n_views: int, n_global: int) -> list[str]:
    """Column labels: global crops first (they also feed the target), then local ones."""
    return [f"global {i + 1}" if i < n_global else f"local {i - n_global + 1}" for i in range(n_views)]


def _check_views(views: Any, batch: int) -> None:
    """A ValueError unless a recipe returned a list of (B,C,H,W) tensors for this batch."""
    ok = isinstance(views, (list, tuple)) and all(
        isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[0] == batch for v in views)
    if not ok:
        got = ([tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in views]
               if isinstance(views, (list, tuple)) else type(views).__name__)
        raise ValueError(f"learner.views must return a list of (B,C,H,W) tensors for a batch of {batch}, got {got}")


@torch.no_grad()
def augmentation_grid_figure(learner: "Learner", images: torch.Tensor, n: int = 8, seed: int | None = 0) -> "Figure":
    """The grid figure: one row per image, the original then each view of the learner's recipe."""
    Figure = _figure_class()
    n = positive_int(n, "n")
    if isinstance(images, torch.Tensor):
        images = images[:n]
    x = to_float(images, learner.channels)
    with _seeded(x.device, seed):
        views = learner.views(x)
    _check_views(views, x.shape[0])
    names = _view_names(len(views), getattr(learner.views, "n_global", len(views)))

    # each column as wide as its images, so local crops show smaller than global ones
    widths = [max(v.shape[-1] for v in views)] + [v.shape[-1] for v in views]
    inch = 1.3 / max(widths)
    rows = x.shape[0]
    fig = Figure(figsize=(max(4.0, inch * sum(widths) + 0.6 + 0.1 * len(widths)), 1.45 * rows + 0.8),
                 layout="constrained")
    axes = fig.subplots(rows, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})
    columns = [x, *views]
    titles = ["original"] + [f"{name}\n{v.shape[-2]}×{v.shape[-1]}" for name, v in zip(names, views)]
    for r in range(rows):
        for c, batch in enumerate(columns):
            ax = axes[r, c]
            img = _as_image(batch[r])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize="small")
        axes[r, 0].set_ylabel(f"image {r}", fontsize="small")
    method = type(getattr(learner, "method", None)).__name__
    # two short lines: one long line is wider than a grid of two or three narrow columns
    fig.suptitle(f"Augmented views of the learner's recipe\n({method}, {len(views)} views)", fontsize="medium")
    return fig


def augmentation_grid(learner: "Learner", images: torch.Tensor, path: PathLike, n: int = 8,
                      seed: int | None = 0) -> Path:
    """Save a grid of n images beside their augmented views (the learner's own recipe) as a PNG.

    Runs the recipe on the images' device without gradients and with a private RNG stream,
    so the learner and the training's random numbers are untouched; ``seed=None`` draws fresh views.
    """
    return _save(augmentation_grid_figure(learner, images, n, seed), path)


# ----------------------------------------------------------------------------- masked-image reconstructions

@torch.no_grad()
def reconstruction_grid_figure(learner: "Learner", images: torch.Tensor, n: int = 8, seed: int | None = 0
                               ) -> "Figure":
    """The figure of a masked-image-modeling learner (``method="mae"``): one column per image, rows original,
    masked (hidden patches grey) and reconstruction (predicted patches, visible ones as they were)."""
    from .augment import resize
    from .hidden import eval_mode
    from .learner import standardized_to_unit

    Figure = _figure_class()
    n = positive_int(n, "n")
    if not callable(getattr(learner.method, "reconstruct", None)):
        raise ValueError(f"a reconstruction grid needs a masked-image-modeling learner (method='mae'), "
                         f"not {type(learner.method).__name__}")
    x = resize(to_float(images[:n], learner.channels), learner.image_size)
    norm = learner.normalize
    with _seeded(x.device, seed), eval_mode(learner):
        masked, recon = learner.method.reconstruct(norm(x))
    recon = standardized_to_unit(recon, norm.mean, norm.std)
    rows = {"original": x, "masked": torch.where(masked, torch.full_like(x, 0.5), x), "reconstruction": recon}
    cols = x.shape[0]
    fig = Figure(figsize=(max(4.0, 1.2 * cols + 0.8), 1.3 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (name, batch) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r, c]
            img = _as_image(batch[c])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize="small")
    share = masked.float().mean().item()
    fig.suptitle(f"Masked-image reconstructions\n({share:.0%} of the pixels masked)", fontsize="medium")
    return fig


def reconstruction_grid(learner: "Learner", images: torch.Tensor, path: PathLike, n: int = 8,
                        seed: int | None = 0) -> Path:
    """Save n images, their random masks and the learner's reconstructions (``method="mae"``) as a PNG.

    Runs in eval mode without gradients and with a private RNG stream (``seed=None`` draws fresh
    masks), so the learner and the training's random numbers are untouched.
    """
    return _save(reconstruction_grid_figure(learner, images, n, seed), path)


# ----------------------------------------------------------------------------- embedding map

def _embedding_matrix(embeddings: Any) -> np.ndarray:
    """Checked (N, D) float64 array of finite embeddings."""
    x = _numpy(embeddings)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (N, D) with N >= 2 points, got {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"embeddings must be numeric, got {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf; check the model (a diverged run?) before plotting")
    return x


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    """The first k principal-component coordinates of x, signs fixed for reproducibility."""
    xt = torch.from_numpy(x - x.mean(0))
    _, _, vh = torch.linalg.svd(xt, full_matrices=False)
    vh = vh[:k]
    # a component's sign is arbitrary: make its largest-magnitude loading positive
    signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    coords = (xt @ (vh * signs).T).numpy()
    if coords.shape[1] < k:  # fewer components than asked (D or N too small): pad with zeros
        coords = np.pad(coords, ((0, 0), (0, k - coords.shape[1])))
    return coords


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    """scikit-learn t-SNE after a PCA to 50 dimensions (the usual speed-up; drops only noise)."""
    _sklearn("method='tsne'")
    from sklearn.manifold import TSNE

    if x.shape[1] > 50:
        x = _pca(x, min(50, x.shape[0]))
    n = x.shape[0]
    perplexity = min(30.0, max(1.0, (n - 1) / 3))  # t-SNE needs perplexity < N
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x).astype(np.float64)


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    """umap-learn's 2-D map, or an ImportError that says how to get it."""
    try:
        import umap
    except ImportError as e:
        raise ImportError("method='umap' needs umap-learn: pip install umap-learn "
                          "(or use method='tsne' or 'pca')") from e
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), random_state=seed)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def project_2d(embeddings: Any, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates (N, 2) of embeddings (N, D) by ``"tsne"``, ``"pca"`` or ``"umap"``."""
    x = _embedding_matrix(embeddings)
    key = str(method).lower().replace("-", "")
    if key == "pca":
        return _pca(x, 2)
    if key == "tsne":
        return _tsne(x, seed)
    if key == "umap":
        return _umap(x, seed)
    raise ValueError(f"method must be one of 'tsne', 'pca', 'umap', got {method!r}")


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most max_points of n points, the same for the same seed."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _labels(labels: Any, n: int) -> np.ndarray | None:
    """Checked (N,) int64 labels (-1 = unknown), or None when there are none."""
    if labels is None:
        return None
    y = _numpy(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the embeddings, got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating)
                                                   and np.array_equal(y, np.round(y)))):
        raise ValueError(f"labels must be integer class indices (-1 = unknown), got {y.dtype}")
    y = y.astype(np.int64)
    if (y < -1).any():
        raise ValueError(f"labels must be >= 0, or -1 for unknown; got {y.min()}")
    return y


def _thumbnails(thumbnails: Any, n: int) -> np.ndarray | None:
    """Checked thumbnails as (N,H,W) or (N,H,W,3) float arrays in [0,1] for OffsetImage."""
    if thumbnails is None:
        return None
    t = _numpy(thumbnails)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[0] != n or t.shape[1] not in (1, 3):
        raise ValueError(f"thumbnails must be images of shape ({n},C,H,W) or ({n},H,W) with C in (1, 3), "
                         f"got {t.shape}")
    if t.dtype == np.uint8:
        t = t.astype(np.float32) / 255
    elif np.issubdtype(t.dtype, np.floating):
        t = np.clip(t.astype(np.float32), 0, 1)
    else:
        raise TypeError(f"thumbnails must be uint8 or float in [0,1], got {t.dtype}")
    return t[:, 0] if t.shape[1] == 1 else t.transpose(0, 2, 3, 1)


def _spread(xy: np.ndarray, k: int) -> np.ndarray:
    """k indices of points far apart in the map (farthest-point order), so thumbnails overlap little."""
    k = min(k, len(xy))
    chosen = [int(np.argmin(xy[:, 0]))]  # deterministic start: the left-most point
    d = np.linalg.norm(xy - xy[chosen[0]], axis=1)
    for _ in range(1, k):
        i = int(np.argmax(d))
        chosen.append(i)
        d = np.minimum(d, np.linalg.norm(xy - xy[i], axis=1))
    return np.array(chosen, dtype=np.int64)


def _kmeans(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """k-means cluster of every row of x (wrapssl.evaluate's, fixed seed)."""
    from .evaluate import kmeans

    return kmeans(torch.as_tensor(x, dtype=torch.float32), min(n_clusters, len(x)), seed=seed)[1].numpy()


def _class_name(c: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    """The display name of class c."""
    if class_names is None:
        return f"class {c}"
    if isinstance(class_names, Mapping):
        return str(class_names.get(c, f"class {c}"))
    return str(class_names[c]) if 0 <= c < len(class_names) else f"class {c}"


def embedding_map_figure(embeddings: Any, labels: Any = None, method: str = "tsne", thumbnails: Any = None,
                         class_names: Sequence[str] | Mapping[int, str] | None = None, max_points: int = 5000,
                         seed: int = 0, *, n_clusters: int = 10, n_thumbnails: int = 64,
                         normalize: bool = True, title: str | None = None) -> "Figure":
    """The embedding-map figure (see ``embedding_map``)."""
    Figure = _figure_class()
    x = _embedding_matrix(embeddings)
    n_all = x.shape[0]
    y = _labels(labels, n_all)
    thumbs = _thumbnails(thumbnails, n_all)
    max_points = positive_int(max_points, "max_points")
    n_clusters = positive_int(n_clusters, "n_clusters")
    n_thumbnails = positive_int(n_thumbnails, "n_thumbnails")

    idx = _subsample(n_all, max(2, max_points), seed)
    x = x[idx]
    if normalize:  # SSL embeddings are compared by cosine: map directions, not lengths
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    xy = project_2d(x, method, seed)

    if y is None or (y[idx] < 0).all():
        colour_ids, how = _kmeans(x, n_clusters, seed), "k-means cluster"
        names = {int(c): f"cluster {c}" for c in np.unique(colour_ids)}
    else:
        colour_ids, how = y[idx], "label"
        names = {int(c): _class_name(int(c), class_names) for c in np.unique(colour_ids) if c >= 0}

    fig = Figure(figsize=(9.5, 8), layout="constrained")
    ax = fig.subplots()
    colours = _draw_points(fig, ax, xy, colour_ids, names, how)
    if thumbs is not None:
        _draw_thumbnails(ax, xy, thumbs[idx], colours, n_thumbnails)
    label = METHOD_NAMES.get(str(method).lower().replace("-", ""), str(method))
    ax.set_xlabel(f"{label} 1")
    ax.set_ylabel(f"{label} 2")
    shown = f"{len(xy)} of {n_all} points" if len(xy) < n_all else f"{n_all} points"
    ax.set_title(title or f"Embedding map ({label}, {shown}, coloured by {how})")
    return fig


def _draw_points(fig: "Figure", ax: Any, xy: np.ndarray, colour_ids: np.ndarray, names: dict[int, str],
                 how: str) -> np.ndarray:
    """Scatter the map coloured by class (grey for unknown); returns each point's RGBA colour."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    classes = sorted(names)
    colours = np.tile(np.array([0.8, 0.8, 0.8, 1.0]), (len(xy), 1))  # unknown: light grey
    size = float(np.clip(3000 / math.sqrt(len(xy)), 4, 40))  # big dots for few points, small for many
    unknown = colour_ids < 0
    if unknown.any():
        ax.scatter(*xy[unknown].T, s=size / 2, color=colours[unknown], label="unlabelled", linewidths=0)
    if len(classes) <= 20:  # a legend stays readable; more classes get a colour bar
        cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for j, c in enumerate(classes):
            mask = colour_ids == c
            colours[mask] = cmap(j)
            ax.scatter(*xy[mask].T, s=size, color=cmap(j), label=names[c], alpha=0.8, linewidths=0)
        ax.legend(title=how, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2, fontsize="small")
    else:
        norm = Normalize(min(classes), max(classes))
        colours[~unknown] = colormaps["turbo"](norm(colour_ids[~unknown]))
        sc = ax.scatter(*xy[~unknown].T, s=size, c=colour_ids[~unknown], cmap="turbo", norm=norm, alpha=0.8,
                        linewidths=0)
        fig.colorbar(sc, ax=ax, label=how)
    return colours


def _draw_thumbnails(ax: Any, xy: np.ndarray, thumbs: np.ndarray, colours: np.ndarray, n_thumbnails: int) -> None:
    """Draw a spread-out subsample of thumbnails at their points, framed in their point's colour."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    side = max(thumbs.shape[1], thumbs.shape[2])
    zoom = 28 / side  # about 28 screen pixels whatever the image size
    for i in _spread(xy, n_thumbnails):
        img = thumbs[i]
        box = OffsetImage(img, zoom=zoom, cmap="gray" if img.ndim == 2 else None)
        if img.ndim == 2:
            box.get_children()[0].set_clim(0, 1)
        ax.add_artist(AnnotationBbox(box, tuple(xy[i]), frameon=True, pad=0.15,
                                     bboxprops={"edgecolor": colours[i], "linewidth": 1.5}))


def embedding_map(embeddings: Any, labels: Any = None, path: PathLike = "embedding_map.png", method: str = "tsne",
                  thumbnails: Any = None, class_names: Sequence[str] | Mapping[int, str] | None = None,
                  max_points: int = 5000, seed: int = 0, **kwargs: Any) -> Path:
    """Save a 2-D map of embeddings (t-SNE, PCA or UMAP) coloured by label or k-means cluster as a PNG.

    Args:
        embeddings: (N, D) tensor or array; rows are L2-normalised first (``normalize=False`` to skip).
        labels: (N,) class indices, -1 for unknown (drawn grey). None or all -1: coloured by
            k-means with ``n_clusters`` (default 10) clusters.
        method: ``"tsne"`` (scikit-learn), ``"pca"``, or ``"umap"`` (needs umap-learn).
        thumbnails: optional (N,C,H,W) or (N,H,W) uint8 images; ``n_thumbnails`` (default 64)
            spread-out points get theirs drawn.
        class_names: names indexed by label (a list or a dict) for the legend.
        max_points: a seeded random subsample of this many points is mapped (t-SNE is O(N log N)).
        seed: seeds the subsample, t-SNE/UMAP and k-means; the same seed gives the same map.
    """
    fig = embedding_map_figure(embeddings, labels, method, thumbnails, class_names, max_points, seed, **kwargs)
    return _save(fig, path)


# ----------------------------------------------------------------------------- learning curve

def learning_curve_figure(points: Sequence[tuple[float, float]], baselines: Mapping[str, float] | None = None,
                          title: str = "Did pretraining pay off?", ylabel: str = "kNN accuracy") -> "Figure":
    """Accuracy against minutes of training, with each baseline (raw pixels, random init) as a level line."""
    Figure = _figure_class()
    try:
        arr = np.array([(float(t), float(v)) for t, v in points], dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"points must be (minutes, accuracy) pairs, e.g. [(0, 0.78), (5, 0.86)]: {e}") from e
    if not len(arr):
        raise ValueError("points is empty: evaluate at least once, e.g. [(0.0, 0.78)]")
    arr = arr[np.argsort(arr[:, 0], kind="stable")]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(arr[:, 0], 100 * arr[:, 1], "o-", color="C0", linewidth=2, label="pretrained backbone")
    ax.annotate(f"{100 * arr[-1, 1]:.1f}%", arr[-1] * (1, 100), textcoords="offset points", xytext=(4, 6),
                color="C0", fontweight="bold")
    styles = iter([("C3", "--"), ("C7", ":"), ("C2", "-.")])
    for name, value in (baselines or {}).items():
        colour, dash = next(styles, ("C4", "--"))
        ax.axhline(100 * float(value), color=colour, linestyle=dash, linewidth=1.5,
                   label=f"{name}: {100 * float(value):.1f}%")
    ax.set_xlabel("minutes of training")
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.1, y=0.12)  # room for the final value's label
    ax.set_xlim(left=0)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def learning_curve(points: Sequence[tuple[float, float]], path: PathLike, baselines: Mapping[str, float] | None = None,
                   title: str = "Did pretraining pay off?", ylabel: str = "kNN accuracy") -> Path:
    """Save accuracy against minutes of training, with the baselines' levels drawn as lines, as a PNG."""
    return _save(learning_curve_figure(points, baselines, title, ylabel), path)


# ----------------------------------------------------------------------------- bar chart

def bar_chart_figure(values: Mapping[str, float], title: str = "", ylabel: str = "value") -> "Figure":
    """The bar-chart figure: one labelled bar per entry, in the given order."""
    Figure = _figure_class()
    if not isinstance(values, Mapping) or not values:
        raise ValueError(f"values must be a non-empty dict of name -> number, got {values!r}")
    try:
        heights = [float(v) for v in values.values()]
    except (TypeError, ValueError) as e:
        raise ValueError(f"values must map names to numbers: {e}") from e
    names = [str(k) for k in values]
    fig = Figure(figsize=(max(4.5, 0.9 * len(names) + 1.5), 4.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), np.nan_to_num(heights, nan=0.0, posinf=0.0, neginf=0.0),
                  color=[f"C{i % 10}" for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{h:.4g}" for h in heights], padding=2, fontsize="small")
    long = max(len(s) for s in names) > 10 or len(names) > 8
    ax.set_xticks(range(len(names)), names, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    return fig


def bar_chart(values: Mapping[str, float], path: PathLike, title: str = "", ylabel: str = "value") -> Path:
    """Save labelled bars (e.g. kNN accuracy before/after pretraining, or benchmark timings) as a PNG."""
    return _save(bar_chart_figure(values, title, ylabel), path)


# ----------------------------------------------------------------------------- label budgets

BUDGET_STYLES = {"raw_pixels_linear": ("C7", ":", "s"), "scratch_finetuned": ("C3", "--", "v"),
                 "pretrained_linear": ("C0", "-", "o"), "pretrained_finetuned": ("C2", "-", "D"),
                 "selected_linear": ("C1", "-.", "^")}


def budget_curve_figure(result: Mapping[str, Any], title: str = "What pretraining buys with few labels") -> "Figure":
    """Test accuracy against the number of labels (log axis): one line per row of ``wrapssl.budgets.label_budgets``'s
    result, the mean over draws with their min-max range as a band."""
    from .budgets import ROW_TITLES

    Figure = _figure_class()
    budgets = list(result.get("budgets") or [])
    if not budgets:
        raise ValueError("the result holds no label budgets; run label_budgets with at least one budget")
    rows = [r for r in dict.fromkeys((*BUDGET_STYLES, *ROW_TITLES)) if any(r in b["rows"] for b in budgets)]
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.subplots()
    ends: list[tuple[float, float, str]] = []
    for row in rows:
        points = sorted((b["labels"], b["rows"][row]) for b in budgets if row in b["rows"])
        x = np.array([p[0] for p in points], dtype=float)
        mean = np.array([100 * p[1]["mean"] for p in points])
        lo = np.array([100 * p[1]["min"] for p in points])
        hi = np.array([100 * p[1]["max"] for p in points])
        colour, dash, marker = BUDGET_STYLES.get(row, ("C4", "-", "o"))
        ax.plot(x, mean, linestyle=dash, marker=marker, color=colour, linewidth=2, label=ROW_TITLES.get(row, row))
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
        ends.append((mean[-1], x[-1], colour))
    _label_ends(ax, ends)
    ax.set_xscale("log")
    ticks = sorted({b["labels"] for b in budgets})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    draws = (result.get("protocol") or {}).get("draws")
    ax.set_xlabel("labelled training images (log scale)" + (f"; mean of {draws} draws, band: min-max" if draws else ""))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.08)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _label_ends(ax: Any, ends: list[tuple[float, float, str]]) -> None:
    """Each line's last value as text beside its end, moved apart where values are too close to read."""
    if not ends:
        return
    values = [v for v, _, _ in ends]
    gap = max(0.6, (max(values) - min(values)) * 0.045)  # in points of accuracy
    placed: list[float] = []
    for value, x, colour in sorted(ends, key=lambda e: e[0]):
        y = max(value, placed[-1] + gap) if placed else value
        placed.append(y)
        ax.annotate(f"{value:.1f}%", (x, value), xytext=(x * 1.06, y), textcoords="data", va="center",
                    color=colour, fontsize="small")


def budget_curve(result: Mapping[str, Any], path: PathLike, title: str = "What pretraining buys with few labels"
                 ) -> Path:
    """Save accuracy against labels (log axis), one line per row (raw pixels, from scratch, pretrained), as a PNG."""
    return _save(budget_curve_figure(result, title), path)
