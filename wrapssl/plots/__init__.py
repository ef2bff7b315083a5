"""Figures of a training run: training curves, image grids, embedding maps and result charts.

matplotlib is an optional extra (``pip install wrapssl[plots]``) imported only inside these
functions; figures never go through pyplot, so the user's backend and windows are left alone,
and PNGs are written atomically. Each ``*_figure`` function builds the figure without saving it
(for notebooks and tests); the plain-named function saves it and returns the path. Nothing here
imports the Learner, the Trainer or the data loaders: the functions take tensors, arrays,
histories and objects to call.
"""
from __future__ import annotations

from .grids import augmentation_grid, augmentation_grid_figure, reconstruction_grid, reconstruction_grid_figure
from .maps import embedding_map, embedding_map_figure, project_2d
from .results import (bar_chart, bar_chart_figure, budget_curve, budget_curve_figure, learning_curve,
                      learning_curve_figure)
from .training import loss_curve, loss_curve_figure

__all__ = [
    "loss_curve", "loss_curve_figure", "augmentation_grid", "augmentation_grid_figure",
    "embedding_map", "embedding_map_figure", "project_2d", "bar_chart", "bar_chart_figure",
    "learning_curve", "learning_curve_figure", "reconstruction_grid", "reconstruction_grid_figure", "budget_curve",
    "budget_curve_figure",
]
