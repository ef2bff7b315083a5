"""Argument checks shared by the package, and optional dependencies: one home for each, so every message reads the
same."""
from __future__ import annotations

import argparse
import importlib
import math
from typing import Any, Callable

import numpy as np

__all__ = ["positive_int", "non_negative_int", "int_at_least", "positive_float", "non_negative_float",
           "positive_int_arg", "non_negative_int_arg", "positive_float_arg", "non_negative_float_arg", "fraction_arg",
           "arg_type", "optional_import"]


def int_at_least(value: Any, name: str, minimum: int, allow_none: bool = False, what: str | None = None
                 ) -> int | None:
    """``value`` as an int if it is an integer >= ``minimum`` (or None when ``allow_none``), else a ValueError
    naming it: "<name> must be <what>, got <value>" (``what`` defaults to "an int >= <minimum>")."""
    if value is None and allow_none:
        return None
    # bool is an int subclass, but True as a batch size is a mistake, not a 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be {what or f'an int >= {minimum}'}, got {value!r}")
    return int(value)


def positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """``value`` as an int if it is an integer >= 1 (or None when ``allow_none``), else a ValueError naming it."""
    return int_at_least(value, name, 1, allow_none, "a positive int")


def non_negative_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """``value`` as an int if it is an integer >= 0 (or None when ``allow_none``), else a ValueError naming it."""
    return int_at_least(value, name, 0, allow_none, "a whole number >= 0")


def _real(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def positive_float(value: Any, name: str, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is finite and > 0 (or None when ``allow_none``), else a ValueError naming it."""
    if value is None and allow_none:
        return None
    real = _real(value)
    if real is None or real <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return real


def non_negative_float(value: Any, name: str, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is finite and >= 0 (or None when ``allow_none``), else a ValueError naming it."""
    if value is None and allow_none:
        return None
    real = _real(value)
    if real is None or real < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return real


def arg_type(parse: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses the text and accepts it when ``ok``; otherwise a one-line usage error."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    convert.__name__ = expected  # argparse names the type in some messages
    return convert


positive_int_arg = arg_type(int, lambda v: v >= 1, "a positive whole number")
positive_int_arg.__doc__ = "An argparse ``type=``: the text as an int >= 1, else argparse's one-line usage error."
non_negative_int_arg = arg_type(int, lambda v: v >= 0, "a whole number >= 0")
positive_float_arg = arg_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float_arg = arg_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction_arg = arg_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def optional_import(module: str, missing: str) -> Any:
    """``module`` imported, or an ImportError saying ``missing`` (what needs it and how to install it)."""
    try:
        importlib.import_module(module.partition(".")[0])  # the package first, even when the module is cached
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(missing) from e
