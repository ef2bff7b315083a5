"""Choose what to label: typical (TypiClust), covering (ProbCover) or diverse (k-center) subsets; near-duplicates.

All work in cosine geometry: rows are L2-normalised, and the distance between
two rows is the Euclidean distance of the unit vectors, sqrt(2 - 2·cos).
One room per purpose: ``picks`` (``select``, one call for every method),
``typical`` (TypiClust), ``coverage`` (ProbCover, k-center), ``weights``,
``duplicates`` (near-duplicates), ``versus_random`` (picks scored against
random ones), beside their shared ``geometry`` and ``kmeans``.
"""
from __future__ import annotations

from .coverage import coverage_radius, probcover, probcover_radius
from .duplicates import near_duplicates, nearest_neighbour_distance, relative_threshold
from .picks import DEFAULT_METHOD, METHODS, Selection, select
from .typical import typicality, typiclust
from .versus_random import compare_with_random
from .weights import density_weights, uncertainty_weights

__all__ = ["Selection", "select", "compare_with_random", "typiclust", "probcover", "typicality", "probcover_radius",
           "density_weights", "uncertainty_weights", "coverage_radius", "near_duplicates",
           "nearest_neighbour_distance", "relative_threshold", "METHODS", "DEFAULT_METHOD"]
