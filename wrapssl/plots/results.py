"""Result charts: accuracy against minutes of training, labelled bars, and accuracy against the number of labels."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .render import PathLike, figure_class, save, sorted_pairs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["learning_curve", "learning_curve_figure", "bar_chart", "bar_chart_figure", "budget_curve",
           "budget_curve_figure"]


def learning_curve_figure(points: Sequence[tuple[float, float]], baselines: Mapping[str, float] | None = None,
                          title: str = "Did pretraining pay off?", ylabel: str = "kNN accuracy") -> "Figure":
    """Accuracy against minutes of training, with each baseline (raw pixels, random init) as a level line."""
    Figure = figure_class()
    arr = sorted_pairs(points, "points must be (minutes, accuracy) pairs, e.g. [(0, 0.78), (5, 0.86)]")
    if not len(arr):
        raise ValueError("points is empty: evaluate at least once, e.g. [(0.0, 0.78)]")
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
    return save(learning_curve_figure(points, baselines, title, ylabel), path)


def bar_chart_figure(values: Mapping[str, float], title: str = "", ylabel: str = "value") -> "Figure":
    """The bar-chart figure: one labelled bar per entry, in the given order."""
    Figure = figure_class()
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
    return save(bar_chart_figure(values, title, ylabel), path)


BUDGET_STYLES = {"raw_pixels_linear": ("C7", ":", "s"), "scratch_finetuned": ("C3", "--", "v"),
                 "pretrained_linear": ("C0", "-", "o"), "pretrained_finetuned": ("C2", "-", "D"),
                 "selected_linear": ("C1", "-.", "^")}


def budget_curve_figure(result: Mapping[str, Any], title: str = "What pretraining buys with few labels") -> "Figure":
    """Test accuracy against the number of labels (log axis): one line per row of ``wrapssl.evaluate.budgets.label_budgets``'s
    result, the mean over draws with their min-max range as a band; the legend names each row by the result's
    ``titles`` (its key where there is none)."""
    Figure = figure_class()
    budgets = list(result.get("budgets") or [])
    if not budgets:
        raise ValueError("the result holds no label budgets; run label_budgets with at least one budget")
    titles = dict(result.get("titles") or {})
    order = dict.fromkeys((*BUDGET_STYLES, *titles, *(row for b in budgets for row in b["rows"])))
    rows = [r for r in order if any(r in b["rows"] for b in budgets)]
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
        ax.plot(x, mean, linestyle=dash, marker=marker, color=colour, linewidth=2, label=titles.get(row, row))
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
    return save(budget_curve_figure(result, title), path)
