"""Each loss of wrapssl.losses used alone, against a naive second computation written with loops and NumPy."""
import math

import numpy as np
import pytest
import torch

from wrapssl.losses import (BarlowTwinsLoss, DINOLoss, InfoNCELoss, KoLeoLoss, MAELoss, NegativeCosineLoss,
                            NTXentLoss, RegressionLoss, SwAVLoss, VICRegLoss, sinkhorn)
from wrapssl.losses.mae import patchify


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(unit(a) @ unit(b))


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row - row.max()
    return row - math.log(np.exp(row).sum())


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, d", [(3, 4), (8, 16)])
def test_regression_and_negative_cosine(n, d):
    p, z = randn(n, d, seed=n), randn(n, d, seed=n + 1) * 3
    a, b = np64(p), np64(z)
    naive_byol = np.mean([np.sum((unit(a[i]) - unit(b[i])) ** 2) for i in range(n)])
    naive_simsiam = -np.mean([cos(a[i], b[i]) for i in range(n)])
    assert RegressionLoss()(p, z).item() == pytest.approx(naive_byol, rel=1e-5)
    assert NegativeCosineLoss()(p, z).item() == pytest.approx(naive_simsiam, rel=1e-5, abs=1e-6)
    assert NegativeCosineLoss()(z, z).item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("n, d, tau", [(2, 3, 0.5), (6, 8, 0.1), (5, 4, 1.0)])
def test_nt_xent_against_a_loop_over_anchors(n, d, tau):
    z1, z2 = randn(n, d, seed=d), randn(n, d, seed=d + 1)
    rows = [unit(r) for r in np.concatenate([np64(z1), np64(z2)])]  # 2n rows; row i and i ± n are one image
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(rows[i] @ rows[k] / tau) for k in range(2 * n) if k != i)
        losses.append(-(rows[i] @ rows[positive] / tau - math.log(denominator)))
    assert NTXentLoss(temperature=tau)(z1, z2).item() == pytest.approx(np.mean(losses), rel=1e-5)
    assert NTXentLoss(temperature=tau)([z1, z2]).item() == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("n, d, tau", [(3, 4, 0.2), (7, 5, 1.0)])
def test_info_nce_against_a_loop(n, d, tau):
    q, k = randn(n, d, seed=1), randn(n, d, seed=2)
    a, b = np64(q), np64(k)
    naive = np.mean([-log_softmax(np.array([cos(a[i], b[j]) / tau for j in range(n)]))[i] for i in range(n)])
    assert InfoNCELoss(temperature=tau)(q, k).item() == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize("n, d, lambd", [(6, 3, 0.0051), (16, 8, 0.5)])
def test_barlow_twins_against_a_loop_over_the_correlation_matrix(n, d, lambd):
    z1, z2 = randn(n, d, seed=3) * 2 + 1, randn(n, d, seed=4)
    a, b = np64(z1), np64(z2)
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    b = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    naive = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            naive += (1 - c) ** 2 if i == j else lambd * c ** 2
    assert BarlowTwinsLoss(lambd=lambd)(z1, z2).item() == pytest.approx(naive, rel=1e-4)


@pytest.mark.parametrize("n, d", [(5, 3), (12, 6)])
def test_vicreg_against_numpy_terms(n, d):
    z1, z2 = randn(n, d, seed=5) * 0.5, randn(n, d, seed=6) * 2
    a, b = np64(z1), np64(z2)
    invariance = np.mean((a - b) ** 2)
    variance = np.mean([max(0.0, 1 - math.sqrt(np.var(x[:, j], ddof=1) + 1e-4)) for x in (a, b) for j in range(d)])
    covariance = 0.0
    for x in (a, b):
        c = np.cov(x, rowvar=False)
        covariance += sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    naive = 25 * invariance + 25 * variance + 1 * covariance
    assert VICRegLoss()(z1, z2).item() == pytest.approx(naive, rel=1e-5)


def test_dino_loss_against_pairs_and_its_center():
    n, k, student_temp, teacher_temp = 4, 6, 0.1, 0.05
    student = [randn(n, k, seed=10 + v) for v in range(4)]  # 2 global views, 2 local
    teacher = [randn(n, k, seed=20 + v) for v in range(2)]
    criterion = DINOLoss(out_dim=k, student_temp=student_temp, center_momentum=0.9)
    center = randn(1, k, seed=30) * 0.1
    criterion.center.copy_(center)
    naive, pairs = 0.0, 0
    for t in range(2):
        for s in range(4):
            if s == t:
                continue
            for i in range(n):
                q = np.exp(log_softmax((np64(teacher[t])[i] - np64(center)[0]) / teacher_temp))
                naive -= q @ log_softmax(np64(student[s])[i] / student_temp) / n
            pairs += 1
    assert criterion(student, teacher, teacher_temp).item() == pytest.approx(naive / pairs, rel=1e-5)
    # training mode moved the center towards the teachers' batch mean; eval mode leaves it
    mean = np.concatenate([np64(t) for t in teacher]).mean(0)
    np.testing.assert_allclose(np64(criterion.center)[0], 0.9 * np64(center)[0] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    moved = criterion.center.clone()
    criterion.eval()(student, teacher, teacher_temp)
    assert torch.equal(criterion.center, moved)


def test_koleo_against_a_nearest_neighbour_loop():
    x = randn(9, 4, seed=7)
    rows = [unit(r) for r in np64(x)]
    naive = -np.mean([math.log(min(np.linalg.norm(rows[i] - rows[j]) for j in range(9) if j != i) + 1e-8)
                      for i in range(9)])
    assert KoLeoLoss()(x).item() == pytest.approx(naive, rel=1e-5)


def naive_sinkhorn(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """Sinkhorn-Knopp written out: alternate prototype-row and sample-column normalisation."""
    q = np.exp(scores / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(b):
            q[:, c] /= q[:, c].sum() * b
    return (q * b).T


def test_swav_swapped_prediction_against_a_loop():
    n, k, tau = 6, 5, 0.1
    z = [torch.nn.functional.normalize(randn(n, 3, seed=40 + v), dim=1) for v in range(3)]
    w = torch.nn.functional.normalize(randn(k, 3, seed=50), dim=1)
    scores = [v @ w.T for v in z]
    got = SwAVLoss(temperature=tau, crops_for_assign=2)(scores).item()
    naive = 0.0
    for i in range(2):
        codes = naive_sinkhorn(np64(scores[i]), 0.05, 3)
        np.testing.assert_allclose(codes, np64(sinkhorn(scores[i], 0.05, 3)), rtol=1e-4, atol=1e-6)
        for j in range(3):
            if j != i:
                naive -= np.mean([codes[r] @ log_softmax(np64(scores[j])[r] / tau) for r in range(n)]) / 2
    assert got == pytest.approx(naive / 2, rel=1e-4)
    with pytest.raises(ValueError, match="at least two views"):
        SwAVLoss()(scores[:1])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_against_a_loop_over_masked_patches(norm_pix):
    images = randn(2, 3, 8, 8, seed=8)
    pred = randn(2, 4, 48, seed=9)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    target = patchify(images, 4)
    per_image = []
    for b in range(2):
        errors = []
        for p in range(4):
            if mask[b, p]:
                t = np64(target[b, p])
                if norm_pix:
                    t = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
                errors.append(np.mean((np64(pred[b, p]) - t) ** 2))
        per_image.append(np.mean(errors))
    assert MAELoss(norm_pix)(pred, target, mask).item() == pytest.approx(np.mean(per_image), rel=1e-5)
    np.testing.assert_allclose(np64(MAELoss(norm_pix, reduction="none")(pred, target, mask)), per_image, rtol=1e-5)
    # the patch order is row-major over the grid: patch 1 is the top-right 4x4 block
    assert torch.equal(target[0, 1], images[0, :, :4, 4:].permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("make, match", [
    (lambda: NTXentLoss(temperature=0), "temperature must be positive"),
    (lambda: InfoNCELoss(temperature=-1), "temperature must be positive"),
    (lambda: BarlowTwinsLoss(lambd=-1), "lambd"),
    (lambda: VICRegLoss(var_weight=-1), "non-negative"),
    (lambda: DINOLoss(8, center_momentum=2), "center_momentum"),
    (lambda: MAELoss(reduction="sum"), "reduction"),
])
def test_bad_settings_are_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_one_view_is_an_error_not_a_nan():
    with pytest.raises(ValueError, match="at least two views"):
        NTXentLoss()(randn(4, 3))
