"""Label-free health signals against naive NumPy computations, and the collapse verdict."""
import math

import numpy as np
import pytest
import torch

from wrapssl.health import COLLAPSE_RANK, Health, health, normalized_std, rankme


def naive_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    """exp(entropy) of the singular values divided by their sum, from NumPy's SVD."""
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def naive_normalized_std(x: np.ndarray) -> float:
    """Row-normalise in a loop, then the population std of each column, averaged."""
    rows = np.array([r / np.linalg.norm(r) for r in x.astype(np.float64)])
    return float(np.mean([rows[:, j].std() for j in range(rows.shape[1])]))


@pytest.mark.parametrize("n,d,seed", [(64, 8, 0), (200, 32, 1), (16, 64, 2)])
def test_rankme_and_std_match_naive(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3, d)
    assert rankme(x) == pytest.approx(naive_rankme(x.numpy()), rel=1e-6)
    assert normalized_std(x) == pytest.approx(naive_normalized_std(x.numpy()), rel=1e-6)


def test_rankme_limits():
    # equal singular values give the full rank; a rank-one matrix gives 1
    assert rankme(torch.eye(10)) == pytest.approx(10, rel=1e-5)
    u, v = torch.randn(50, 1), torch.randn(1, 20)
    assert rankme(u @ v) == pytest.approx(1.0, abs=1e-3)


def test_constant_embeddings_are_collapsed_and_spread_ones_are_not():
    same = torch.ones(100, 32) * torch.randn(32)
    h = health(same)
    assert h.rank < COLLAPSE_RANK and h.std == pytest.approx(0.0, abs=1e-7)
    assert h.collapsed and "collapsed" in h.warning(step=7) and "step 7" in h.warning(step=7)
    spread = health(torch.randn(100, 32))
    assert not spread.collapsed and spread.warning() is None
    # isotropic embeddings spread over the sphere: std near 1/sqrt(D)
    assert spread.std == pytest.approx(1 / math.sqrt(32), rel=0.15)


def test_dimensional_collapse_is_caught():
    # every image on one line through the origin (a shared direction, only the length varies)
    direction = torch.randn(1, 64)
    line = torch.rand(256, 1) * direction
    assert health(line).collapsed


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="N >= 2"):
        health(torch.randn(1, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        rankme(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_health_verdict_follows_thresholds():
    assert Health(rank=1.5, std=0.1, dim=16).collapsed
    assert not Health(rank=8.0, std=0.1, dim=16).collapsed
