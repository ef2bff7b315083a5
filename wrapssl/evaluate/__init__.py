"""Judge and export learned representations: embeddings, metrics, the report's rows, label budgets.

The rooms: ``embeddings`` (embed a dataset, export npz/csv), ``metrics`` (kNN, linear probe, clustering,
retrieval), ``report`` (a representation beside the trivial baselines: raw pixels, random init) and
``budgets`` (accuracy with few labels, against the net from scratch; ``wrapssl.evaluate.budgets``).
"""
from __future__ import annotations

from .embeddings import Embeddings, embed_dataset
from .metrics import (PROBE_WEIGHT_DECAYS, adjusted_mutual_info, choose_weight_decay, cluster_scores, fit_logistic,
                      kmeans, knn_accuracy, knn_predict, linear_probe, linear_probe_cv, normalized_mutual_info,
                      retrieval_scores)
from .scores import ROW_NAMES, baseline_scores, evaluate, format_scores, probe_scores, raw_pixels

__all__ = [
    "Embeddings", "embed_dataset", "knn_predict", "knn_accuracy", "linear_probe", "linear_probe_cv", "fit_logistic",
    "choose_weight_decay", "PROBE_WEIGHT_DECAYS", "kmeans", "raw_pixels", "probe_scores", "baseline_scores",
    "format_scores", "ROW_NAMES", "normalized_mutual_info", "adjusted_mutual_info", "cluster_scores",
    "retrieval_scores", "evaluate",
]
