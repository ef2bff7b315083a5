"""What every figure needs: matplotlib on demand, atomic PNG writing, arrays from tensors, (x, y) pairs checked.

matplotlib is an optional extra (``pip install wrapssl[plots]``) imported only when a figure
is built. Figures are built with the object-oriented ``matplotlib.figure.Figure`` and never
through pyplot, so the user's selected backend and open windows are left alone; PNGs are
rendered by Agg and written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from ..checks import optional_import
from ..files import atomic_open

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PathLike = str | os.PathLike
DPI = 110


def figure_class() -> type:
    """matplotlib's Figure class, or an ImportError that says how to install matplotlib."""
    return optional_import("matplotlib.figure", "wrapssl.plots needs matplotlib: pip install matplotlib (or pip "
                                                "install wrapssl[plots])").Figure


def need_sklearn(what: str) -> None:
    """Raise an ImportError that says how to install scikit-learn, if it is missing."""
    optional_import("sklearn", f"{what} needs scikit-learn: pip install scikit-learn (or pip install wrapssl[eval])")


def save(fig: "Figure", path: PathLike) -> Path:
    """Render ``fig`` as PNG and move it over ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        # Figure.savefig renders with Agg for PNG without touching pyplot's backend
        fig.savefig(f, format="png", dpi=DPI)
    return Path(path)


def as_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of a tensor, array or nested sequence (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def sorted_pairs(points: Iterable[tuple[float, float]], what: str) -> np.ndarray:
    """(n, 2) float array of (x, y) rows sorted by x (stable); a ValueError that starts with ``what`` otherwise."""
    try:
        arr = np.array([(float(s), float(v)) for s, v in points], dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from e
    return arr[np.argsort(arr[:, 0], kind="stable")]
