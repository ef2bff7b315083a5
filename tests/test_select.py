"""Subset selection and near-duplicate search against brute force."""
import importlib
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wrapssl.evaluate import Embeddings

# the module, not the function: wrapssl exports select(), which shadows the submodule attribute
sel = importlib.import_module("wrapssl.select")


def unit(x: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, float64."""
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def radius(u: np.ndarray, centres) -> float:
    """k-center objective by brute force: farthest row from its nearest centre."""
    d = np.sqrt(np.clip(2 - 2 * u @ u[list(centres)].T, 0, None))
    return float(d.min(axis=1).max())


def naive_greedy(x: torch.Tensor, n: int, first: int, w=None) -> list[int]:
    """Textbook weighted greedy k-center in float64, one full distance pass per pick."""
    u = unit(x)
    w = np.ones(len(u)) if w is None else w.double().numpy() / float(w.max())
    d = np.full(len(u), np.inf)
    chosen = [first]
    while True:
        d = np.minimum(d, np.sqrt(np.clip(2 - 2 * u @ u[chosen[-1]], 0, None)))
        if len(chosen) == n:
            return chosen
        score = w * d
        score[chosen] = -1
        chosen.append(int(np.argmax(score)))


def clustered(n: int, dim: int, k: int, noise: float, seed: int, decay: float = 0.0) -> torch.Tensor:
    """Rows around k random centres; ``decay`` > 0 gives a power-law spectrum like learned features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g)
    x = centres[torch.randint(k, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)
    return x * torch.arange(1, dim + 1).float().pow(-decay / 2)


# ----------------------------------------------------------------------------- k-center

@pytest.mark.parametrize("size,n", [(6, 2), (8, 3), (10, 3), (12, 4), (12, 2), (9, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcenter_within_twice_the_optimal_radius(size, n, seed):
    x = torch.randn(size, 3, generator=torch.Generator().manual_seed(100 * seed + size))
    u = unit(x)
    optimum = min(radius(u, c) for c in itertools.combinations(range(size), n))
    s = sel.select(x, n, seed=seed)
    assert radius(u, s.indices.tolist()) <= 2 * optimum + 1e-6
    assert sel.coverage_radius(x, s.indices) == pytest.approx(radius(u, s.indices.tolist()), abs=1e-5)


@pytest.mark.parametrize("data", ["isotropic", "tight-clusters", "power-law"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kcenter_pruning_equals_naive_greedy(data, weighted):
    # the pruned search must pick exactly what the textbook greedy picks; dim > 64 uses the PCA bound too
    x = {"isotropic": torch.randn(1000, 80, generator=torch.Generator().manual_seed(0)),
         "tight-clusters": clustered(1000, 80, 12, 0.2, seed=1),
         "power-law": clustered(1000, 96, 30, 1.0, seed=2, decay=1.0)}[data]
    w = torch.rand(1000, generator=torch.Generator().manual_seed(3)) if weighted else None
    s = sel.select(x, 100, weights=w, seed=4)
    assert s.indices.tolist() == naive_greedy(x, 100, int(s.indices[0]), w)


def test_indices_unique_in_range_and_deterministic():
    x = clustered(300, 16, 5, 0.5, seed=0)
    a = sel.select(x, 50, seed=7)
    assert a.indices.dtype == torch.long and len(a.indices) == 50
    assert len(set(a.indices.tolist())) == 50
    assert 0 <= int(a.indices.min()) and int(a.indices.max()) < 300
    assert torch.equal(a.indices, sel.select(x, 50, seed=7).indices)
    assert sorted(sel.select(x, 300, seed=1).indices.tolist()) == list(range(300))
    r = sel.select(x, 50, method="random", seed=7)
    assert len(set(r.indices.tolist())) == 50
    assert torch.equal(r.indices, sel.select(x, 50, method="random", seed=7).indices)


def test_duplicate_rows_still_give_unique_indices():
    x = torch.ones(10, 4)
    x[5:] = -1  # two distinct points, five copies each
    s = sel.select(x, 8)
    assert len(set(s.indices.tolist())) == 8
    assert {int(i) < 5 for i in s.indices[:2]} == {True, False}  # the two distinct points come first


def test_files_follow_the_indices():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    files = [f"f{i}.png" for i in range(20)]
    s = sel.select(x, 4, files=files)
    assert s.files == [files[i] for i in s.indices.tolist()]
    e = Embeddings(x, torch.zeros(20, dtype=torch.long), files)
    assert sel.select(e, 4).files == s.files
    assert sel.select(x, 4).files == []


# ----------------------------------------------------------------------------- weights

def test_zero_weight_rows_wait_until_positive_rows_are_chosen():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    w = torch.zeros(40)
    w[::2] = torch.rand(20, generator=torch.Generator().manual_seed(1)) + 0.1
    for method in ("kcenter", "random"):
        s = sel.select(x, 15, method=method, weights=w, seed=2)
        assert all(w[i] > 0 for i in s.indices), method
    with pytest.raises(ValueError, match="positive weight"):
        sel.select(x, 25, method="random", weights=w)


def test_weights_scale_the_greedy_score():
    # after row 0, two candidates: row 1 far (distance 2) but light, row 2 nearer (sqrt 2) but heavy
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    for w1, expected in [(0.6, 2), (0.8, 1)]:  # 0.6·2 < 1·1.41 < 0.8·2
        w = torch.tensor([1.0, w1, 1.0])
        runs = [sel.select(x, 2, weights=w, seed=seed).indices.tolist() for seed in range(30)]
        after_zero = [r[1] for r in runs if r[0] == 0]
        assert after_zero and set(after_zero) == {expected}


def dense_core_with_outliers():
    """400 rows in a tight cap around one direction, 40 scattered outliers (rows 400..439)."""
    g = torch.Generator().manual_seed(0)
    core = torch.tensor([1.0] + [0.0] * 15) + 0.15 * torch.randn(400, 16, generator=g)
    return torch.cat([core, torch.randn(40, 16, generator=g)])


def test_density_weights_prefer_dense_regions():
    x = dense_core_with_outliers()
    dens = sel.density_weights(x, k=5, sample=200)
    assert dens[:400].min() > dens[400:].max()
    assert ((0 <= dens) & (dens <= 1)).all()
    plain = sel.select(x, 30, seed=0).indices
    dense = sel.select(x, 30, weights="density", seed=0).indices
    assert (dense < 400).sum() > (plain < 400).sum()  # fewer outliers once density counts


def test_uncertainty_weights_prefer_rows_between_clusters():
    g = torch.Generator().manual_seed(0)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    blob_a = a + 0.05 * torch.randn(150, 4, generator=g)
    blob_b = b + 0.05 * torch.randn(150, 4, generator=g)
    t = torch.rand(30, 1, generator=g) * 0.3 + 0.35
    bridge = (1 - t) * a + t * b + 0.02 * torch.randn(30, 4, generator=g)  # rows 300..329, between the blobs
    x = torch.cat([blob_a, blob_b, bridge])
    unc = sel.uncertainty_weights(x, n_clusters=2)
    assert unc[300:].mean() > 0.5 > unc[:300].mean()
    assert ((0 <= unc) & (unc <= 1)).all()
    plain = sel.select(x, 12, seed=0).indices
    ambiguous = sel.select(x, 12, weights=unc, seed=0).indices
    assert (ambiguous >= 300).sum() > (plain >= 300).sum()


# ----------------------------------------------------------------------------- near-duplicates

def naive_pairs(x: torch.Tensor, threshold: float):
    """Double loop over i < j on float64 cosines; zero rows match nothing."""
    v = x.double().numpy()
    norms = np.linalg.norm(v, axis=1)
    cos = (v @ v.T) / np.maximum(np.outer(norms, norms), 1e-300)
    out = []
    for i in range(len(v)):
        for j in range(i + 1, len(v)):
            if norms[i] > 0 and norms[j] > 0 and cos[i, j] >= threshold:
                out.append((i, j))
    return out


@pytest.mark.parametrize("dim,decay", [(8, 0.0), (40, 0.0), (100, 1.0), (130, 0.0)])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_near_duplicates_equal_double_loop(dim, decay, threshold):
    x = clustered(300, dim, 6, 1.0, seed=dim, decay=decay)
    g = torch.Generator().manual_seed(1)
    x[250:280] = x[:30] + 0.02 * x[:30].norm(dim=1, keepdim=True) * torch.randn(30, dim, generator=g) / dim ** 0.5
    x[290] = 0  # a zero row matches nothing
    pairs, sims = sel.near_duplicates(x, threshold, block_size=32)
    ref = naive_pairs(x, threshold)
    assert [tuple(p) for p in pairs.tolist()] == ref
    u = F.normalize(x.double(), dim=1)
    assert torch.allclose(sims.double(), (u[pairs[:, 0]] * u[pairs[:, 1]]).sum(1), atol=1e-5)
    if threshold == 0.99:
        assert len(ref) >= 30  # the planted copies are found


def test_near_duplicates_empty_and_errors():
    x = torch.eye(5)
    pairs, sims = sel.near_duplicates(x, 0.5)
    assert pairs.shape == (0, 2) and sims.shape == (0,)
    with pytest.raises(ValueError, match="threshold"):
        sel.near_duplicates(x, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        sel.near_duplicates(x, 1.5)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        sel.near_duplicates(torch.ones(5))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "n must"), ({"n": 11}, "n must"), ({"n": 2.5}, "n must"),
    ({"n": 2, "method": "kmeans"}, "method"),
    ({"n": 2, "weights": "entropy"}, "weights must"),
    ({"n": 2, "weights": torch.ones(3)}, "one value per row"),
    ({"n": 2, "weights": -torch.ones(10)}, ">= 0"),
    ({"n": 2, "weights": torch.full((10,), float("nan"))}, "finite"),
    ({"n": 2, "weights": torch.zeros(10)}, "all weights are 0"),
    ({"n": 2, "files": ["a"]}, "one name per row"),
])
def test_select_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sel.select(torch.randn(10, 3), **kwargs)


def test_select_rejects_bad_embeddings():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        sel.select(torch.ones(10), 2)
    with pytest.raises(ValueError, match="NaN"):
        sel.select(torch.full((4, 2), math.inf), 2)
    with pytest.raises(ValueError, match="empty"):
        sel.select(torch.ones(0, 3), 1)


@pytest.mark.parametrize("n,sample", [(40, 2048), (300, 64)])
def test_nearest_neighbour_distance_equals_brute_force(n, sample):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))
    u = unit(x)
    d = np.sqrt(np.clip(2 - 2 * u @ u.T, 0, None))
    np.fill_diagonal(d, np.inf)
    pool = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:sample].numpy()
    expected = float(torch.tensor(d.min(axis=1)[pool]).median())  # torch's median: the lower middle value
    assert sel.nearest_neighbour_distance(x, sample=sample) == pytest.approx(expected, abs=1e-5)


def test_relative_threshold_finds_planted_copies_where_a_fixed_cosine_floods():
    """Clustered embeddings (high pair cosines everywhere, as trained ones): the relative rule finds the copies."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) + 4  # all clusters in one cone: median pair cosine near 0.9
    x = centres.repeat_interleave(200, 0) + 0.6 * torch.randn(1000, 32, generator=g)
    planted = [(3, 990), (500, 999), (17, 620)]
    for a, b in planted:
        x[b] = x[a] + 1e-3 * torch.randn(32, generator=g)
    cos = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    assert cos.median() > 0.8
    flooded, _ = sel.near_duplicates(x, 0.97)
    assert len(flooded) > 100 * len(planted)  # a fixed cosine that sounds strict finds "duplicates" everywhere
    t = sel.relative_threshold(x, 0.1)
    d_nn = sel.nearest_neighbour_distance(x)
    assert t == pytest.approx(1 - (0.1 * d_nn) ** 2 / 2)
    pairs, _ = sel.near_duplicates(x, t)
    assert sorted(map(tuple, pairs.tolist())) == sorted(planted)
    with pytest.raises(ValueError, match="0.1-0.3"):
        sel.relative_threshold(x, 0)
