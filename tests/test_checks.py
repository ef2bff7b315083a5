"""The one positive-int check: what it accepts, what it refuses, and the same message from every caller."""
import argparse

import numpy as np
import pytest

from wrapssl.checks import int_at_least, non_negative_int, positive_int, positive_int_arg
from wrapssl.evaluate import knn_accuracy
from wrapssl.select import near_duplicates


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(2)])
def test_accepts_positive_integers_as_plain_ints(value):
    out = positive_int(value, "n")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [0, -2, True, 2.0, "3", None, np.float32(1)])
def test_refuses_everything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int, got "):
        positive_int(value, "batch_size")


def test_none_only_when_allowed():
    assert positive_int(None, "eval_every", allow_none=True) is None


@pytest.mark.parametrize("value", [0, 5, np.int32(2)])
def test_non_negative_int_accepts_zero_and_up(value):
    out = non_negative_int(value, "n_local")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [-1, False, 0.0, "0"])
def test_non_negative_int_refuses_the_rest(value):
    with pytest.raises(ValueError, match=r"^n_local must be a whole number >= 0, got "):
        non_negative_int(value, "n_local")


@pytest.mark.parametrize("minimum", [-3, 0, 2, 10])
def test_int_at_least_draws_the_line_at_its_minimum(minimum):
    for value in range(minimum - 2, minimum + 3):  # the naive rule, value by value
        if value >= minimum:
            assert int_at_least(value, "n_clusters", minimum) == value
        else:
            with pytest.raises(ValueError, match=f"^n_clusters must be an int >= {minimum}, got {value}$"):
                int_at_least(value, "n_clusters", minimum)
    assert int_at_least(None, "n_clusters", minimum, allow_none=True) is None
    with pytest.raises(ValueError, match="^n_clusters must be at least two clusters, got True$"):
        int_at_least(True, "n_clusters", minimum, what="at least two clusters")


def test_callers_in_different_rooms_give_the_same_message():
    import torch
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="^k must be a positive int, got 0$"):
        knn_accuracy(x, torch.zeros(6, dtype=torch.long), x, torch.zeros(6, dtype=torch.long), k=0)
    with pytest.raises(ValueError, match="^block_size must be a positive int, got 0$"):
        near_duplicates(x, 0.9, block_size=0)


def test_command_line_type_gives_a_usage_error():
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    parser.add_argument("--n", type=positive_int_arg)
    assert parser.parse_args(["--n", "4"]).n == 4
    for bad in ("0", "-1", "2.5", "x"):
        with pytest.raises(argparse.ArgumentError, match="expected a positive whole number"):
            parser.parse_args(["--n", bad])
