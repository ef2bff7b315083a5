"""Embedding maps: 2-D projections (t-SNE, PCA, UMAP) of embeddings, coloured by label or cluster, with thumbnails."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from ..checks import positive_int
from .render import PathLike, as_numpy, figure_class, need_sklearn, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["embedding_map", "embedding_map_figure", "project_2d"]

METHOD_NAMES = {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}


def _embedding_matrix(embeddings: Any) -> np.ndarray:
    """Checked (N, D) float64 array of finite embeddings."""
    x = as_numpy(embeddings)
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
    need_sklearn("method='tsne'")
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
    y = as_numpy(labels)
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
    t = as_numpy(thumbnails)
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
    """k-means cluster of every row of x (wrapssl.kmeans, fixed seed)."""
    from ..kmeans import kmeans

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
    Figure = figure_class()
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
    return save(fig, path)
