"""Subset selection (k-center, TypiClust, ProbCover, picked against random) and near-duplicates against brute force."""
import importlib
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wrapssl.evaluate import Embeddings

# the package wrapssl.select (its function of the same name is sel.select)
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
    s = sel.select(x, n, method="kcenter", seed=seed)
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
    s = sel.select(x, 100, method="kcenter", weights=w, seed=4)
    assert s.indices.tolist() == naive_greedy(x, 100, int(s.indices[0]), w)


@pytest.mark.parametrize("method", sel.METHODS)
def test_indices_unique_in_range_and_deterministic(method):
    x = clustered(300, 16, 5, 0.5, seed=0)
    a = sel.select(x, 50, method=method, seed=7)
    assert a.indices.dtype == torch.long and len(a.indices) == 50
    assert len(set(a.indices.tolist())) == 50
    assert 0 <= int(a.indices.min()) and int(a.indices.max()) < 300
    assert torch.equal(a.indices, sel.select(x, 50, method=method, seed=7).indices)
    assert sorted(sel.select(x, 300, method=method, seed=1).indices.tolist()) == list(range(300))


def test_duplicate_rows_still_give_unique_indices():
    x = torch.ones(10, 4)
    x[5:] = -1  # two distinct points, five copies each
    s = sel.select(x, 8, method="kcenter")
    assert len(set(s.indices.tolist())) == 8
    assert {int(i) < 5 for i in s.indices[:2]} == {True, False}  # the two distinct points come first
    for method in ("typiclust", "probcover"):
        s = sel.select(x, 8, method=method)
        assert len(set(s.indices.tolist())) == 8, method
        assert {int(i) < 5 for i in s.indices[:2]} == {True, False}, method  # one of each point first


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
        runs = [sel.select(x, 2, method="kcenter", weights=w, seed=seed).indices.tolist() for seed in range(30)]
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
    plain = sel.select(x, 30, method="kcenter", seed=0).indices
    dense = sel.select(x, 30, method="kcenter", weights="density", seed=0).indices
    assert (dense < 400).sum() > (plain < 400).sum()  # fewer outliers once density counts
    for bad in (0, -1):  # -1 used to slice off one row silently; 0 made every row equally dense
        with pytest.raises(ValueError, match="^sample must be a positive int"):
            sel.density_weights(x, sample=bad)


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
    plain = sel.select(x, 12, method="kcenter", seed=0).indices
    ambiguous = sel.select(x, 12, method="kcenter", weights=unc, seed=0).indices
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
    ({"n": 2, "method": "kcenter", "weights": "entropy"}, "weights must"),
    ({"n": 2, "method": "kcenter", "weights": torch.ones(3)}, "one value per row"),
    ({"n": 2, "method": "kcenter", "weights": -torch.ones(10)}, ">= 0"),
    ({"n": 2, "method": "random", "weights": torch.full((10,), float("nan"))}, "finite"),
    ({"n": 2, "method": "kcenter", "weights": torch.zeros(10)}, "all weights are 0"),
    ({"n": 2, "weights": "density"}, "weights apply to method 'kcenter' or 'random'"),
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


# ----------------------------------------------------------------------------- typicality, TypiClust, ProbCover

MODE_SIZES = [300, 150, 80, 40, 20]


def mixture(seed: int = 0, outliers: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Five Gaussian modes of different sizes on orthogonal axes, and outliers (label -1) off all of them."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for m, s in enumerate(MODE_SIZES):
        centre = torch.zeros(16)
        centre[m] = 10
        rows.append(centre + 0.7 * torch.randn(s, 16, generator=g))
        labels += [m] * s
    far = torch.zeros(outliers, 16)
    far[:, 5:] = torch.randn(outliers, 11, generator=g)  # orthogonal to every mode's axis
    rows.append(10 * F.normalize(far, dim=1))
    labels += [-1] * outliers
    return torch.cat(rows), torch.tensor(labels)


def central_fraction(u: np.ndarray, labels: torch.Tensor, i: int) -> float:
    """Fraction of row i's mode that lies closer to the mode's mean direction than row i does."""
    rows = (labels == labels[i]).numpy()
    c = u[rows].mean(0)
    c /= np.linalg.norm(c)
    d = np.linalg.norm(u[rows] - c, axis=1)
    return float((d < np.linalg.norm(u[i] - c)).mean())


def naive_typicality(x: torch.Tensor, k: int, groups) -> np.ndarray:
    """1 / mean distance to the k nearest rows of the same group (k capped at half the group), by sorting."""
    u = unit(x)
    groups = np.asarray(groups)
    out = np.zeros(len(u))
    for i in range(len(u)):
        same = np.flatnonzero((groups == groups[i]) & (np.arange(len(u)) != i))
        if len(same) == 0:
            continue
        kk = min(k, max(1, (len(same) + 1) // 2))
        d = np.sort(np.sqrt(np.clip(2 - 2 * u[same] @ u[i], 0, None)))[:kk]
        out[i] = 1 / (d.mean() + 1e-6)
    return out


@pytest.mark.parametrize("k", [1, 5, 20])
def test_typicality_equals_sorting_every_distance(k):
    x = clustered(120, 8, 4, 0.6, seed=k)
    groups = torch.arange(120) % 3
    groups[:3] = 7  # a group of 3: one neighbour each
    groups[3] = 9   # a row alone: typicality 0
    got = sel.typicality(x, k=k, groups=groups).numpy()
    np.testing.assert_allclose(got, naive_typicality(x, k, groups.numpy()), rtol=1e-4)
    assert got[3] == 0
    np.testing.assert_allclose(sel.typicality(x, k=k).numpy(), naive_typicality(x, k, np.zeros(120)), rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_typiclust_picks_typical_rows_of_every_mode_and_no_outlier(seed):
    x, labels = mixture(seed, outliers=0)
    u = unit(x)
    one_each = sel.select(x, 5, seed=seed).indices  # the default method
    assert labels[one_each].tolist() == [0, 1, 2, 3, 4]  # one pick per mode, larger modes first
    # typical = dense = near the centre (a random row of the mode: 0.5 on average)
    central = [central_fraction(u, labels, i) for i in one_each.tolist()]
    assert max(central) < 0.15 and np.mean(central) < 0.05
    # with outliers (which can take a cluster of their own) and a few picks more than modes
    x, labels = mixture(seed)
    u = unit(x)
    for n in (8, 12):
        picks = sel.typiclust(x, n, seed=seed)
        assert set(labels[picks].tolist()) == {0, 1, 2, 3, 4}, n  # every mode covered
        assert all(central_fraction(u, labels, i) < 0.25 for i in picks.tolist()), n  # in the mode's core
    # the k-center coreset, for contrast, spends its picks on the outliers
    assert (labels[sel.select(x, 8, method="kcenter", seed=seed).indices] == -1).sum() >= 3


def naive_probcover(x: torch.Tensor, n: int, delta: float) -> list[int]:
    """Textbook ProbCover greedy on a dense float64 ball matrix: the ball with most uncovered rows, until all are."""
    u = unit(x)
    balls = np.sqrt(np.clip(2 - 2 * u @ u.T, 0, None)) <= delta
    covered = np.zeros(len(u), dtype=bool)
    chosen = []
    while len(chosen) < n:
        counts = (balls & ~covered[None, :]).sum(1)
        if counts.max() == 0:
            break
        chosen.append(int(counts.argmax()))
        covered |= balls[chosen[-1]]
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probcover_equals_the_textbook_greedy(seed):
    x = clustered(200, 6, 5, 0.4, seed=seed)
    u = unit(x)
    d = np.unique(np.sqrt(np.clip(2 - 2 * u @ u.T, 0, None)).round(9))
    target = np.searchsorted(d, 0.35)
    delta = float(d[target - 1] + d[target]) / 2  # halfway between two distances: no pair sits on the edge
    ref = naive_probcover(x, 200, delta)
    assert 5 < len(ref) < 200  # the greedy covers everything before the budget runs out
    got = sel.probcover(x, 30, delta=delta, seed=seed).tolist()
    assert got == ref[:30]
    full = sel.probcover(x, 200, delta=delta, seed=seed).tolist()
    assert full[:len(ref)] == ref and sorted(full) == list(range(200))  # the rest: every other row, at random


def test_probcover_covers_every_mode_with_one_ball_each():
    x, labels = mixture(0)
    u = unit(x)
    delta = sel.probcover_radius(x, n_clusters=5)
    # the purity radius: 5% of the rows have another mode (or an outlier) within delta, by brute force
    d = np.sqrt(np.clip(2 - 2 * u @ u.T, 0, None))
    other = np.where(labels.numpy()[:, None] != labels.numpy()[None, :], d, np.inf).min(1)
    assert (other <= delta).mean() == pytest.approx(0.05, abs=0.01)
    picks = sel.probcover(x, 5, n_clusters=5)
    assert labels[picks].tolist() == [0, 1, 2, 3, 4]
    covered = (d[picks.numpy()] <= delta).any(0)
    assert covered[labels.numpy() >= 0].all() and not covered[labels.numpy() < 0].any()


# ----------------------------------------------------------------------------- picked against random

def labelled_split(n: int, seed: int) -> Embeddings:
    """Four labelled Gaussian classes in 8 dims, one of them rare."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3]).repeat(n // 10 + 1)[:n]
    centres = torch.randn(4, 8, generator=torch.Generator().manual_seed(99)) * 2
    x = centres[labels] + torch.randn(n, 8, generator=g)
    return Embeddings(x, labels, [f"img{i}.png" for i in range(n)])


def test_compare_with_random_equals_a_hand_computation():
    from wrapssl.evaluate import linear_probe

    train, test = labelled_split(120, 0), labelled_split(60, 1)
    got = sel.compare_with_random(train, test, 12, method="typiclust", draws=3, seed=5)
    assert json.loads(json.dumps(got)) == got  # JSON-able as it is

    def probe(idx):
        return linear_probe(train.embeddings[idx], train.labels[idx], test.embeddings, test.labels, num_classes=4)

    picked = sel.select(train.embeddings, 12, method="typiclust", seed=5).indices
    draws = [sel.select(train.embeddings, 12, method="random", seed=5 + i).indices for i in range(3)]
    accs = [probe(i) for i in draws]
    assert got["picked"] == probe(picked)
    assert got["random"] == accs
    assert got["random_mean"] == pytest.approx(sum(accs) / 3)
    assert (got["random_min"], got["random_max"]) == (min(accs), max(accs))
    assert got["gain"] == pytest.approx(probe(picked) - sum(accs) / 3)
    assert got["picked_classes"] == len(set(train.labels[picked].tolist()))
    assert got["random_classes"] == [len(set(train.labels[i].tolist())) for i in draws]
    assert (got["n"], got["method"], got["seed"]) == (12, "typiclust", 5)
    assert len({tuple(sorted(i.tolist())) for i in draws}) == 3  # three different random draws


def test_compare_with_random_rejects_what_it_cannot_score():
    train, test = labelled_split(50, 0), labelled_split(20, 1)
    unlabelled = Embeddings(train.embeddings, torch.full((50,), -1), train.files)
    with pytest.raises(ValueError, match="without a label"):
        sel.compare_with_random(unlabelled, test, 5)
    with pytest.raises(ValueError, match="same model"):
        sel.compare_with_random(train, Embeddings(torch.randn(20, 3), test.labels, test.files), 5)
    with pytest.raises(ValueError, match="draws"):
        sel.compare_with_random(train, test, 5, draws=0)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 50\]"):
        sel.compare_with_random(train, test, 51)
    with pytest.raises(ValueError, match="Embeddings"):
        sel.compare_with_random(train.embeddings, test, 5)


# ----------------------------------------------------------------------------- the command

def test_select_command_prints_and_writes_picked_against_random(tmp_path, capsys):
    from wrapssl import cli

    train, test = labelled_split(150, 0), labelled_split(60, 1)
    train.save_npz(tmp_path / "embeddings-train.npz")
    test.save_npz(tmp_path / "embeddings-test.npz")  # found beside the input without a flag
    out = tmp_path / "picks.csv"
    cli.main(["select", str(tmp_path / "embeddings-train.npz"), "-n", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "rank,index,file" and len(rows) == 11
    assert [int(r.split(",")[1]) for r in rows[1:]] == sel.select(train, 10).indices.tolist()
    written = json.loads((tmp_path / "picks-vs-random.json").read_text())
    expected = sel.compare_with_random(train, test, 10)
    assert {k: written[k] for k in expected} == expected
    assert written["method"] == sel.DEFAULT_METHOD
    assert f"{100 * expected['picked']:.2f}%" in printed and f"{100 * expected['random_mean']:.2f}%" in printed
    assert f"gain {100 * expected['gain']:+.2f} points" in printed
    # an explicit test file, another method and draws
    other = tmp_path / "held-out.npz"
    test.save_npz(other)
    cli.main(["select", str(tmp_path / "embeddings-train.npz"), "-n", "10", "--out", str(out), "--method", "kcenter",
              "--test-embeddings", str(other), "--draws", "2"])
    written = json.loads((tmp_path / "picks-vs-random.json").read_text())
    assert written == {**sel.compare_with_random(train, test, 10, method="kcenter", draws=2),
                       "test_embeddings": str(other)}
    # --no-compare writes the picks only
    (tmp_path / "picks-vs-random.json").unlink()
    capsys.readouterr()
    cli.main(["select", str(tmp_path / "embeddings-train.npz"), "-n", "10", "--out", str(out), "--no-compare"])
    assert not (tmp_path / "picks-vs-random.json").exists() and "gain" not in capsys.readouterr().out


@pytest.mark.parametrize("case,match", [
    ("too-many", r"-n 500 is more than the 150 items in .*; pass -n 150 or fewer"),
    ("missing-test", r"cannot score the picks against random on .*nowhere.npz: it has no such file"),
    ("unlabelled", r"cannot score .*: the input has rows without labels"),
    ("unlabelled-test", r"test embeddings have 60 rows without a label"),
    ("weights", r"weights apply to method 'kcenter' or 'random'"),
])
def test_select_command_errors_are_one_line(tmp_path, case, match):
    from wrapssl import cli

    train, test = labelled_split(150, 0), labelled_split(60, 1)
    if case == "unlabelled":
        train = Embeddings(train.embeddings, torch.full((150,), -1), train.files)
    if case == "unlabelled-test":
        test = Embeddings(test.embeddings, torch.full((60,), -1), test.files)
    train.save_npz(tmp_path / "train.npz")
    test.save_npz(tmp_path / "test.npz")
    argv = ["select", str(tmp_path / "train.npz"), "-n", "500" if case == "too-many" else "10",
            "--test-embeddings", str(tmp_path / ("nowhere.npz" if case == "missing-test" else "test.npz"))]
    if case == "weights":
        argv += ["--weights", "density"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert re.search(match, message), message
