"""Image grids: a batch beside its augmented views, and masked-image reconstructions.

The learner is only called, never imported: anything with the attributes these functions
use (``views``, ``channels``; for reconstructions ``method.reconstruct``, ``image_size``,
``normalize``) will do.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checks import positive_int
from ..nnutil import eval_mode, private_rng
from .render import PathLike, figure_class, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["augmentation_grid", "augmentation_grid_figure", "reconstruction_grid", "reconstruction_grid_figure"]


def _show(ax: Any, image: torch.Tensor) -> None:
    """Draw one (C,H,W) float image in [0,1] (grey or RGB) on ``ax``, without ticks."""
    a = image.detach().float().clamp(0, 1).cpu().numpy()
    img = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


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
def augmentation_grid_figure(learner: Any, images: torch.Tensor, n: int = 8, seed: int | None = 0) -> "Figure":
    """The grid figure: one row per image, the original then each view of the learner's recipe."""
    from ..augment import to_float  # kornia loads only for the grids, not for every figure
    Figure = figure_class()
    n = positive_int(n, "n")
    if isinstance(images, torch.Tensor):
        images = images[:n]
    x = to_float(images, learner.channels)
    with private_rng(x.device, seed):
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
            _show(axes[r, c], batch[r])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize="small")
        axes[r, 0].set_ylabel(f"image {r}", fontsize="small")
    method = type(getattr(learner, "method", None)).__name__
    # two short lines: one long line is wider than a grid of two or three narrow columns
    fig.suptitle(f"Augmented views of the learner's recipe\n({method}, {len(views)} views)", fontsize="medium")
    return fig


def augmentation_grid(learner: Any, images: torch.Tensor, path: PathLike, n: int = 8,
                      seed: int | None = 0) -> Path:
    """Save a grid of n images beside their augmented views (the learner's own recipe) as a PNG.

    Runs the recipe on the images' device without gradients and with a private RNG stream,
    so the learner and the training's random numbers are untouched; ``seed=None`` draws fresh views.
    """
    return save(augmentation_grid_figure(learner, images, n, seed), path)


@torch.no_grad()
def reconstruction_grid_figure(learner: Any, images: torch.Tensor, n: int = 8, seed: int | None = 0
                               ) -> "Figure":
    """The figure of a masked-image-modeling learner (``method="mae"``): one column per image, rows original,
    masked (hidden patches grey) and reconstruction (predicted patches, visible ones as they were)."""
    from ..augment import resize, to_float
    Figure = figure_class()
    n = positive_int(n, "n")
    if not callable(getattr(learner.method, "reconstruct", None)):
        raise ValueError(f"a reconstruction grid needs a masked-image-modeling learner (method='mae'), "
                         f"not {type(learner.method).__name__}")
    x = resize(to_float(images[:n], learner.channels), learner.image_size)
    norm = learner.normalize
    with private_rng(x.device, seed), eval_mode(learner):
        masked, recon = learner.method.reconstruct(norm(x))
    recon = torch.addcmul(norm.mean, recon, norm.std).clamp_(0.0, 1.0)  # x·std + mean: back to [0, 1]
    rows = {"original": x, "masked": torch.where(masked, torch.full_like(x, 0.5), x), "reconstruction": recon}
    cols = x.shape[0]
    fig = Figure(figsize=(max(4.0, 1.2 * cols + 0.8), 1.3 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (name, batch) in enumerate(rows.items()):
        for c in range(cols):
            _show(axes[r, c], batch[c])
        axes[r, 0].set_ylabel(name, fontsize="small")
    share = masked.float().mean().item()
    fig.suptitle(f"Masked-image reconstructions\n({share:.0%} of the pixels masked)", fontsize="medium")
    return fig


def reconstruction_grid(learner: Any, images: torch.Tensor, path: PathLike, n: int = 8,
                        seed: int | None = 0) -> Path:
    """Save n images, their random masks and the learner's reconstructions (``method="mae"``) as a PNG.

    Runs in eval mode without gradients and with a private RNG stream (``seed=None`` draws fresh
    masks), so the learner and the training's random numbers are untouched.
    """
    return save(reconstruction_grid_figure(learner, images, n, seed), path)
