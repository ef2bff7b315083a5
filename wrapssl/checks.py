"""Argument checks shared by the package: one home for each, so every message reads the same."""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np

__all__ = ["positive_int", "positive_int_arg"]


def positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """``value`` as an int if it is an integer >= 1 (or None when ``allow_none``), else a ValueError naming it."""
    if value is None and allow_none:
        return None
    # bool is an int subclass, but True as a batch size is a mistake, not a 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def positive_int_arg(text: str) -> int:
    """An argparse ``type=``: the text as an int >= 1, else argparse's one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value
