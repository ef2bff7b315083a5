"""Training curves of a run: the loss (raw and smoothed), kNN accuracy and health, one panel each, against the step."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .render import PathLike, figure_class, save, sorted_pairs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["loss_curve", "loss_curve_figure", "History"]

History = Mapping[str, Sequence[tuple[int, float]]]
FAMILIES = ("loss", "knn", "health")  # panels in this order; other families follow by name
HEALTH_KEYS = ("rank", "embedding_std")  # the health panel: effective rank, spread of normalised embeddings
# logged to metrics.csv and TensorBoard, not drawn: the schedules are known and the speed is printed
NOT_DRAWN = ("lr", "momentum", "images_per_s", "train_minutes")
Y_LABELS = {"loss": "loss", "knn": "kNN accuracy (%)", "health": "effective rank"}
MIN_SPAN = 0.2  # a loss axis spans at least this fraction of the loss: a 2% change must not fill the panel


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
    return sorted_pairs(points, f"history[{key!r}] must be a list of (step, value) pairs, e.g. [(0, 1.3), (10, 1.1)]")


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
    Figure = figure_class()
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
    from ..health import COLLAPSE_RANK, COLLAPSE_STD

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
    return save(loss_curve_figure(history, title, dim), path)
