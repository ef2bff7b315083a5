"""The method zoo: each loss against a naive NumPy/loop computation, method state, and the Learner round trip."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wrapssl import Learner, Views, available_methods
from wrapssl.methods import DINO, NNCLR, BarlowTwins, MoCo, SimCLR, SwAV, VICReg
from wrapssl.losses.koleo import koleo_loss
from wrapssl.losses.swav import sinkhorn

from conftest import small_cnn
from test_mae import tiny_vit

# small heads for every registered method, so CPU tests stay fast
SMALL = {
    "byol": dict(projection_size=16, projection_hidden_size=32),
    "simsiam": dict(projection_size=16, prediction_hidden_size=8),
    "simclr": dict(projection_size=16, projection_hidden_size=32),
    "moco": dict(projection_size=16, projection_hidden_size=32, prediction_hidden_size=32),
    "barlow_twins": dict(projector_dims=(32, 32)),
    "vicreg": dict(projector_dims=(32, 32)),
    "dino": dict(out_dim=64, hidden_size=32, bottleneck_size=16, n_local=2, local_size=8),
    "nnclr": dict(queue_size=32, projection_size=16, projection_hidden_size=32, prediction_hidden_size=32),
    "swav": dict(n_prototypes=10, projection_size=16, projection_hidden_size=32, n_local=2, local_size=8,
                 freeze_prototypes_steps=0),
    "mae": dict(decoder_dim=16, decoder_depth=1, decoder_heads=2),
    "distill": dict(hidden_size=16),
}
# methods with one view per image (the others compare two or more)
ONE_VIEW = {"mae", "distill"}


def small_learner(method: str, net: torch.nn.Module | None = None) -> Learner:
    """A Learner of ``method`` with small heads on a net it takes: a tiny ViT for MAE, the small CNN for the
    others; distillation learns from a second small CNN."""
    kwargs = dict(SMALL[method])
    if method == "distill":
        kwargs["teacher"] = small_cnn(width=8)
    if method == "mae":
        return Learner(net if net is not None else tiny_vit(16), image_size=16, method=method, **kwargs)
    return Learner(net if net is not None else small_cnn(), image_size=16, hidden_layer=-2, method=method, **kwargs)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def naive_nt_xent(views, tau):
    """Anchor by anchor: −log of each positive's share among all other samples, averaged over positives."""
    z = [unit(np64(v)) for v in views]
    v_count, n = len(z), z[0].shape[0]
    everything = [(v, i) for v in range(v_count) for i in range(n)]
    losses = []
    for (v, i) in everything:
        anchor = z[v][i]
        denom = sum(math.exp(anchor @ z[u][k] / tau) for (u, k) in everything if (u, k) != (v, i))
        per_pos = [-(anchor @ z[u][i] / tau - math.log(denom)) for u in range(v_count) if u != v]
        losses.append(sum(per_pos) / len(per_pos))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("n, d, tau, n_views", [(2, 3, 0.5, 2), (5, 8, 0.1, 2), (7, 16, 1.0, 2), (4, 6, 0.2, 3)])
def test_simclr_loss_matches_naive(n, d, tau, n_views):
    torch.manual_seed(n * d)
    views = [torch.randn(n, d) for _ in range(n_views)]
    got = SimCLR(temperature=tau).loss(views, None)
    assert got.item() == pytest.approx(naive_nt_xent(views, tau), rel=1e-5, abs=1e-6)


def test_simclr_loss_sanity():
    torch.manual_seed(0)
    m = SimCLR(temperature=0.5)
    basis = torch.eye(8)
    # identical views of orthogonal samples: the best case
    best = m.loss([basis, basis], None).item()
    # all samples identical: the positive has no edge over the 2N−2 negatives
    same = torch.ones(8, 8)
    assert m.loss([same, same], None).item() == pytest.approx(math.log(15), rel=1e-5)
    assert 0 < best < math.log(15)
    assert m.loss([basis, torch.randn(8, 8)], None).item() > best


@pytest.mark.parametrize("n, d, tau", [(3, 4, 1.0), (6, 8, 0.2), (9, 5, 0.5)])
def test_moco_loss_matches_naive(n, d, tau):
    torch.manual_seed(n)
    m = MoCo(temperature=tau, projection_size=d, projection_hidden_size=8, prediction_hidden_size=8)
    m.build(4)
    online, target = [torch.randn(n, d) for _ in range(2)], [torch.randn(n, d) for _ in range(2)]
    got = m.loss(online, target)
    q = [unit(np64(p)) for p in m.predictor(torch.cat(online)).chunk(2)]
    k = [unit(np64(t)) for t in target]
    naive = 0.0
    for a, b in ((0, 1), (1, 0)):  # ctr(q1, k2) + ctr(q2, k1)
        ce = [-log_softmax(np.array([q[a][i] @ k[b][j] / tau for j in range(n)]))[i] for i in range(n)]
        naive += 2 * tau * sum(ce) / n
    assert got.item() == pytest.approx(naive, rel=1e-5)


def test_moco_needs_target_and_sane_scale():
    m = MoCo(projection_size=4, projection_hidden_size=8, prediction_hidden_size=8)
    m.build(4)
    with pytest.raises(ValueError, match="uses_target"):
        m.loss([torch.randn(4, 4)] * 2, None)
    with pytest.raises(ValueError, match="0.2"):
        MoCo(temperature=0)
    # random keys: each CE term is near log(n), the total near 2τ·2·log(n)
    loss = m.loss([torch.randn(64, 4)] * 2, [torch.randn(64, 4)] * 2).item()
    assert 0.5 * 4 * math.log(64) < loss < 1.5 * 4 * math.log(64)


@pytest.mark.parametrize("n, d, lambd", [(4, 3, 0.0051), (8, 6, 0.1), (16, 10, 1.0)])
def test_barlow_twins_loss_matches_naive(n, d, lambd):
    torch.manual_seed(d)
    z1, z2 = torch.randn(n, d) * 3 + 1, torch.randn(n, d)
    a, b = np64(z1), np64(z2)
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    b = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    naive = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            naive += (1 - c) ** 2 if i == j else lambd * c ** 2
    got = BarlowTwins(lambd=lambd).loss([z1, z2], None)
    assert got.item() == pytest.approx(naive, rel=1e-5)


def test_barlow_twins_loss_sanity():
    torch.manual_seed(0)
    m = BarlowTwins()
    # whitened, decorrelated, identical views: C = I, the minimum 0
    z = torch.linalg.qr(torch.randn(64, 8))[0] * 8
    assert m.loss([z, z], None).item() == pytest.approx(0.0, abs=1e-3)
    assert m.loss([z, torch.randn(64, 8)], None).item() > 4


@pytest.mark.parametrize("n, d, weights", [(4, 3, (25, 25, 1)), (10, 6, (1, 2, 3)), (7, 12, (25, 25, 1))])
def test_vicreg_loss_matches_naive(n, d, weights):
    torch.manual_seed(n)
    z1, z2 = torch.randn(n, d) * 0.5, torch.randn(n, d) * 2
    a, b = np64(z1), np64(z2)
    inv = sum((a[k, i] - b[k, i]) ** 2 for k in range(n) for i in range(d)) / (n * d)

    def var_term(x):
        return sum(max(0.0, 1 - math.sqrt(x[:, i].var(ddof=1) + 1e-4)) for i in range(d)) / d

    def cov_term(x):
        x = x - x.mean(0)
        return sum((x[:, i] @ x[:, j] / (n - 1)) ** 2 for i in range(d) for j in range(d) if i != j) / d

    naive = (weights[0] * inv + weights[1] * (var_term(a) + var_term(b)) / 2
             + weights[2] * (cov_term(a) + cov_term(b)))
    got = VICReg(*weights).loss([z1, z2], None)
    assert got.item() == pytest.approx(naive, rel=1e-5)


def test_vicreg_variance_term_penalises_collapse():
    m = VICReg()
    collapsed = torch.zeros(16, 8)
    # invariance 0, covariance 0, variance hinge 1 - sqrt(eps) per dimension
    assert m.loss([collapsed, collapsed], None).item() == pytest.approx(25 * (1 - 1e-2), rel=1e-5)
    # centred, decorrelated, unit-variance dimensions: every term vanishes
    a = torch.randn(256, 8)
    spread = torch.linalg.qr(a - a.mean(0))[0] * 16
    assert m.loss([spread, spread], None).item() == pytest.approx(0.0, abs=1e-3)
    assert m.loss([spread, torch.randn(256, 8)], None).item() > 10


def naive_dino(student, teacher, center, s_temp, t_temp):
    s = [np64(x) for x in student]
    t = [np64(x) for x in teacher]
    c = np64(center)[0]
    total, pairs = 0.0, 0
    for i in range(len(t)):
        for j in range(len(s)):
            if i == j:
                continue
            per = []
            for b in range(s[0].shape[0]):
                q = np.exp(log_softmax((t[i][b] - c) / t_temp))
                per.append(-(q * log_softmax(s[j][b] / s_temp)).sum())
            total += sum(per) / len(per)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n, k, n_local, step", [(3, 8, 0, 0), (4, 16, 2, 5), (6, 32, 4, 50)])
def test_dino_loss_matches_naive_and_updates_center(n, k, n_local, step):
    torch.manual_seed(k)
    m = DINO(out_dim=k, warmup_teacher_temp_steps=10, center_momentum=0.8)
    m.center.copy_(torch.randn(1, k) * 0.1)
    old_center = m.center.clone()
    student = [torch.randn(n, k) for _ in range(2 + n_local)]
    teacher = [torch.randn(n, k) for _ in range(2)]
    t_temp = 0.04 + 0.03 * min(step, 10) / 10
    naive = naive_dino(student, teacher, old_center, 0.1, t_temp)
    got = m.loss(student, teacher, step=step)
    assert got.item() == pytest.approx(naive, rel=1e-5)
    mean = np.mean([np64(t)[b] for t in teacher for b in range(n)], axis=0)
    np.testing.assert_allclose(np64(m.center)[0], 0.8 * np64(old_center)[0] + 0.2 * mean, rtol=1e-5, atol=1e-6)
    m.eval()  # evaluation must not move the center
    m.loss(student, teacher, step=step)
    np.testing.assert_allclose(np64(m.center)[0], 0.8 * np64(old_center)[0] + 0.2 * mean, rtol=1e-5, atol=1e-6)



def naive_koleo(x: torch.Tensor) -> float:
    """Row by row: −log of the distance from each unit vector to its nearest other one, averaged."""
    z = unit(np64(x))
    total = 0.0
    for i in range(len(z)):
        total -= math.log(min(np.linalg.norm(z[i] - z[j]) for j in range(len(z)) if j != i) + 1e-8)
    return total / len(z)


@pytest.mark.parametrize("n, d", [(2, 3), (7, 5), (32, 16)])
def test_koleo_matches_naive_and_spreads_the_batch(n, d):
    torch.manual_seed(n)
    x = torch.randn(n, d) + 2.0  # bunched on one side of the sphere
    assert koleo_loss(x).item() == pytest.approx(naive_koleo(x), rel=1e-5)
    x.requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        assert koleo_loss(x - 0.1 * x.grad) < koleo_loss(x)  # a step down the gradient spreads the rows


def test_dino_with_koleo_adds_the_weighted_koleo_of_the_global_representations():
    torch.manual_seed(0)
    n, k, d = 6, 16, 8
    m = DINO(out_dim=k, koleo_weight=0.1, n_local=2)
    m.build(d)
    reps = [torch.randn(n, d) for _ in range(4)]
    projections = [m.projector(r) for r in reps]
    teacher = [torch.randn(n, k) for _ in range(2)]
    center = m.center.clone()
    got = m.loss(list(zip(projections, reps)), teacher, step=0)
    expected = naive_dino(projections, teacher, center, 0.1, 0.04) + 0.1 * (naive_koleo(reps[0]) +
                                                                            naive_koleo(reps[1]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # through the Learner: the online branch hands the method each view's representation too. With four
    # un-augmented views, every view's representation is the encoder's output for the images themselves
    views = lambda: Views([lambda v: v] * 4, n_global=2)  # noqa: E731
    small = {**SMALL["dino"], "n_local": 2}
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="dino", views=views(), koleo_weight=0.1,
                      **small)
    plain = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="dino", views=views(), **small)
    plain.load_state_dict(learner.state_dict())
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        difference = learner(x) - plain(x)
        rep = learner.encoder(learner.normalize(x))
    assert difference.item() == pytest.approx(0.1 * 2 * naive_koleo(rep), rel=1e-4)
    with pytest.raises(ValueError, match="koleo_weight"):
        DINO(koleo_weight=-1)

def test_dino_teacher_temperature_schedule_and_head():
    m = DINO(out_dim=32, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=100)
    temps = [m.teacher_temperature(s) for s in (0, 25, 50, 100, 1000)]
    assert temps == pytest.approx([0.04, 0.0475, 0.055, 0.07, 0.07])
    assert DINO(warmup_teacher_temp_steps=0).teacher_temperature(0) == 0.07
    m.build(12)
    # the head's last layer is weight-normalised with g = 1: scaling its weight changes nothing
    x = torch.randn(5, 12)
    out = m.projector(x)
    with torch.no_grad():
        m.projector.last_layer.mul_(7.0)
    torch.testing.assert_close(m.projector(x), out)
    # rows of the last layer have norm 1, the bottleneck is L2-normalised: |logit| ≤ 1
    assert out.abs().max() <= 1 + 1e-5
    assert "criterion.center" in m.state_dict()  # the loss owns the center; checkpoints carry it


def test_dino_loads_a_checkpoint_written_when_the_method_held_the_center():
    m = DINO(out_dim=8)
    m.build(4)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    old_center = torch.randn(1, 8)
    state["center"] = old_center
    del state["criterion.center"]  # the key of checkpoints written before the losses had their own modules
    fresh = DINO(out_dim=8)
    fresh.build(4)
    fresh.load_state_dict(state)  # strict: every key placed
    assert torch.equal(fresh.center, old_center)


@pytest.mark.parametrize("n, k, eps, iters", [(8, 4, 0.05, 3), (16, 10, 0.1, 3), (5, 7, 0.05, 1), (32, 6, 0.5, 100)])
def test_sinkhorn_matches_naive_and_marginals(n, k, eps, iters):
    torch.manual_seed(n + k)
    scores = F.normalize(torch.randn(n, 3), dim=1) @ F.normalize(torch.randn(k, 3), dim=1).T
    got = sinkhorn(scores, eps, iters)
    q = np.exp(np64(scores) / eps).T
    q /= q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(n):
            q[:, c] /= q[:, c].sum() * n
    naive = (q * n).T
    np.testing.assert_allclose(np64(got), naive, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np64(got).sum(1), np.ones(n), rtol=1e-5)  # each sample: a distribution
    if iters >= 100:  # converged: prototypes share the batch equally
        np.testing.assert_allclose(np64(got).sum(0), np.full(k, n / k), rtol=1e-3)


def test_sinkhorn_ignores_invalid_rows():
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(10, 3), dim=1) @ F.normalize(torch.randn(4, 3), dim=1).T
    valid = torch.tensor([False] * 3 + [True] * 7)
    masked = sinkhorn(scores, 0.05, 3, valid)
    assert torch.all(masked[:3] == 0)
    torch.testing.assert_close(masked[3:], sinkhorn(scores[3:], 0.05, 3))


@pytest.mark.parametrize("n, d, k, n_views, tau", [(6, 4, 5, 2, 0.1), (8, 6, 12, 4, 0.2), (5, 3, 3, 3, 0.5)])
def test_swav_loss_matches_naive(n, d, k, n_views, tau):
    torch.manual_seed(k)
    m = SwAV(n_prototypes=k, temperature=tau, projection_size=d, freeze_prototypes_steps=0)
    m.build(4)
    views = [torch.randn(n, d) for _ in range(n_views)]
    got = m.loss(views, None)
    w = unit(np64(m.prototypes.weight))
    assert np.allclose(np.linalg.norm(np64(m.prototypes.weight), axis=1), 1)  # normalised in place
    z = [unit(np64(v)) for v in views]
    total = 0.0
    for i in range(2):
        codes = np64(sinkhorn(torch.from_numpy(z[i] @ w.T).float(), 0.05, 3))
        sub = 0.0
        for j in range(n_views):
            if j != i:
                sub += -np.mean([codes[b] @ log_softmax(z[j][b] @ w.T / tau) for b in range(n)])
        total += sub / (n_views - 1)
    assert got.item() == pytest.approx(total / 2, rel=1e-5)


def test_swav_freezes_prototypes_then_trains_them():
    m = SwAV(n_prototypes=6, projection_size=4, freeze_prototypes_steps=3)
    m.build(4)
    views = [torch.randn(8, 4, requires_grad=True) for _ in range(3)]
    m.loss(views, None, step=2).backward()
    assert torch.all(m.prototypes.weight.grad == 0) and views[0].grad.abs().sum() > 0
    m.loss(views, None, step=3).backward()
    assert m.prototypes.weight.grad is not None and m.prototypes.weight.grad.abs().sum() > 0


def test_swav_queue_joins_sinkhorn_after_the_step_that_filled_it():
    torch.manual_seed(0)
    m = SwAV(n_prototypes=5, projection_size=4, queue_length=6, freeze_prototypes_steps=0)
    m.build(4)
    first = [torch.randn(4, 4) for _ in range(3)]
    m.loss(first, None)
    queued = m.queue.clone()
    # the newest projections sit at the front, L2-normalised; the rest is still empty
    torch.testing.assert_close(queued[0, :4], F.normalize(first[0], dim=1))
    torch.testing.assert_close(queued[1, :4], F.normalize(first[1], dim=1))
    assert torch.all(queued[:, 4:] == 0) and m.queue_len.item() == 4
    second = [torch.randn(4, 4) for _ in range(3)]
    w = m.prototypes.weight.detach().clone()
    z = [F.normalize(v, dim=1) for v in second]
    naive = 0.0
    for i in range(2):  # the queued projections join view i's Sinkhorn problem; the batch's own codes are used
        codes = sinkhorn(torch.cat([queued[i, :4] @ w.T, z[i] @ w.T]), 0.05, 3)[-4:]
        naive += sum(-(codes * F.log_softmax(z[j] @ w.T / m.temperature, dim=1)).sum(1).mean()
                     for j in range(3) if j != i) / 2
    torch.testing.assert_close(m.loss(second, None), naive / 2)
    torch.testing.assert_close(m.queue[0, :4], F.normalize(second[0], dim=1))
    torch.testing.assert_close(m.queue[0, 4:6], queued[0, :2])
    assert m.queue_len.item() == 6


def naive_nnclr(m, views, queue, filled, tau):
    """NNCLR's symmetric loss with a loop-based nearest-neighbour search."""
    z = [unit(np64(v)) for v in views]
    preds = [np64(p) for p in m.predictor(torch.cat(views)).chunk(len(views))]
    nn = []
    for v in z:
        if filled == 0:
            nn.append(v)
            continue
        rows = []
        for b in range(v.shape[0]):
            sims = [v[b] @ queue[s] for s in range(filled)]
            rows.append(queue[int(np.argmax(sims))])
        nn.append(np.stack(rows))

    def ce(q, k):
        q, k = unit(q), unit(k)
        return np.mean([-log_softmax(np.array([q[i] @ k[j] / tau for j in range(len(k))]))[i] for i in range(len(q))])

    pairs = [(i, j) for i in range(len(views)) for j in range(len(views)) if i != j]
    return sum(ce(nn[i], preds[j]) + ce(preds[j], nn[i]) for i, j in pairs) / (2 * len(pairs))


@pytest.mark.parametrize("n, d, tau", [(4, 3, 0.1), (6, 8, 0.5)])
def test_nnclr_queue_holds_previous_keys_and_loss_matches_naive(n, d, tau):
    torch.manual_seed(n)
    m = NNCLR(temperature=tau, queue_size=3 * n, projection_size=d, projection_hidden_size=8,
              prediction_hidden_size=8)
    m.build(4)
    m.predictor.eval()  # fixed BN statistics: the naive computation sees the same predictions
    seen = []
    for step in range(4):
        views = [torch.randn(n, d) for _ in range(2)]
        filled = min(step * n, 3 * n)
        expected = naive_nnclr(m, views, np64(m.queue), filled, tau)
        got = m.loss(views, None, step=step)
        assert got.item() == pytest.approx(expected, rel=1e-5), step
        seen.append(unit(np64(views[0])))
        # after the step: exactly the keys of this and earlier steps (FIFO), never anything else
        ring = np.concatenate(seen)[-3 * n:]
        q = np64(m.queue)
        for s in range(len(ring)):
            slot = (len(np.concatenate(seen)) - len(ring) + s) % (3 * n)
            np.testing.assert_allclose(q[slot], ring[s], rtol=1e-5, atol=1e-6)
        assert m.queue_len.item() == min((step + 1) * n, 3 * n)


def test_nnclr_positives_come_from_the_queue_not_the_current_batch():
    torch.manual_seed(0)
    m = NNCLR(queue_size=8, projection_size=4, projection_hidden_size=8, prediction_hidden_size=8)
    m.build(4)
    old = torch.randn(8, 4)
    m.loss([old, old], None)  # fills the queue with old keys
    new = torch.randn(8, 4)
    neighbours = m.nearest_neighbours(new)
    queued = {tuple(np.round(r, 5)) for r in np64(F.normalize(old, dim=1))}
    assert all(tuple(np.round(r, 5)) in queued for r in np64(neighbours))
    m.eval()
    before = m.queue.clone()
    m.loss([new, new], None)
    assert torch.equal(m.queue, before), "an evaluation loss must not change the queue"


def test_nnclr_empty_queue_falls_back_to_own_projection():
    torch.manual_seed(0)
    m = NNCLR(queue_size=8, projection_size=4, projection_hidden_size=8, prediction_hidden_size=8)
    m.build(4)
    m.eval()
    z = [torch.randn(6, 4, requires_grad=True) for _ in range(2)]
    loss = m.loss(z, None)
    assert torch.isfinite(loss)
    loss.backward()
    assert z[0].grad.abs().sum() > 0  # the stand-in neighbour carries gradient, a queued one would not


@pytest.mark.parametrize("method", sorted(SMALL))
def test_every_method_builds_through_the_learner_and_trains_a_step(method):
    assert sorted(SMALL) == available_methods(), "add small head sizes for the new method to SMALL"
    torch.manual_seed(0)
    net = tiny_vit(16) if method == "mae" else small_cnn()
    learner = small_learner(method, net)
    assert learner.method.name == method
    x = torch.rand(6, 3, 20, 20)
    loss = learner(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    stem = next(net.parameters())  # the first convolution (the ViT's patch embedding)
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    for name, p in learner.method.named_parameters():
        assert p.grad is not None, f"{method}: {name} got no gradient"
    learner.update_moving_average()
    assert torch.isfinite(learner(x))
    # multi-crop methods send every view online and only global views to the target
    n_views = len(learner.views.transforms)
    assert n_views == (1 if method in ONE_VIEW else 2 + SMALL[method].get("n_local", 0))


def test_method_knobs_reach_the_heads():
    m = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="moco", projection_size=8,
                projection_hidden_size=12, projection_layers=2, prediction_hidden_size=10).method
    linears = [l for l in m.projector if isinstance(l, torch.nn.Linear)]
    assert [l.out_features for l in linears] == [12, 8] and not m.projector[-1].affine
    assert m.predictor[0].out_features == 10 and m.momentum == 0.99
    bt = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="barlow-twins", projector_dims=(24, 20)).method
    assert [l.out_features for l in bt.projector if isinstance(l, torch.nn.Linear)] == [24, 20]
    dino = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="dino", **SMALL["dino"])
    assert dino.target_projector is not None and dino.momentum == 0.996
    assert isinstance(dino.target_projector, type(dino.method.projector))  # the EMA covers the whole head
    assert dino.views.n_global == 2 and dino.views(torch.rand(2, 3, 20, 20))[-1].shape[-1] == 8


def test_dino_freezes_the_last_layer_for_the_first_steps():
    torch.manual_seed(0)
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="dino",
                      **{**SMALL["dino"], "freeze_last_layer_steps": 2})
    head = learner.method.projector
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-2, weight_decay=0.04)
    x = torch.rand(8, 3, 16, 16)
    for step in range(3):
        last, first = head.last_layer.detach().clone(), head.mlp[0].weight.detach().clone()
        opt.zero_grad()
        learner(x).backward()
        frozen = step < 2
        assert head.last_layer.grad is not None  # still in the graph (DDP's static graph needs it)
        assert (head.last_layer.grad.abs().max() == 0) == frozen
        opt.step()
        learner.update_moving_average()
        # frozen: only weight decay's uniform shrink, so the normalised rows (what the head uses) stay put
        same_rows = torch.allclose(F.normalize(head.last_layer, dim=1), F.normalize(last, dim=1), atol=1e-6)
        assert same_rows == frozen
        assert not torch.equal(head.mlp[0].weight, first)  # the rest of the head always trains
    with pytest.raises(ValueError, match="freeze_last_layer_steps"):
        DINO(freeze_last_layer_steps=-1)


@pytest.mark.parametrize("method, kwargs, match", [
    ("simclr", dict(temperature=-1), "temperature"),
    ("dino", dict(center_momentum=2), "center_momentum"),
    ("nnclr", dict(queue_size=0), "queue_size"),
    ("swav", dict(sinkhorn_epsilon=0), "sinkhorn_epsilon"),
    ("barlow_twins", dict(projector_dims=()), "projector_dims"),
    ("vicreg", dict(var_weight=-1), "weights"),
])
def test_bad_method_arguments_are_clear_errors(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Learner(small_cnn(), image_size=16, hidden_layer=-2, method=method, **kwargs)


@pytest.mark.parametrize("method", ["simclr", "moco", "barlow_twins", "vicreg", "dino", "nnclr", "swav"])
def test_one_view_is_a_clear_error(method):
    m = Learner(small_cnn(), image_size=16, hidden_layer=-2, method=method, **SMALL[method]).method
    d = 64 if method == "dino" else 16
    z = [torch.randn(4, 32 if method in ("barlow_twins", "vicreg") else d)]
    with pytest.raises(ValueError, match="two views"):
        m.loss(z, z if m.uses_target else None)


# ----------------------------------------------------------------------------- what a method needs, the Learner serves

def test_no_method_imports_the_nets_hooks_or_architectures():
    """Methods declare needs; the Learner serves them. A method file imports none of the rooms that reach the
    user's net (outside ``if TYPE_CHECKING:``, which only names types)."""
    import ast
    from pathlib import Path

    import wrapssl.methods

    forbidden = {"archs", "hidden", "encoder", "prelogits", "vit", "teacher", "nnutil"}
    for path in Path(wrapssl.methods.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only:
                names = {(node.module or "").split(".")[-1]} | {a.name for a in node.names}
                assert not names & forbidden, f"{path.name} imports {names & forbidden}"


def _needy(needs: set[str]):
    class Needy(SimCLR):
        pass
    Needy.needs = frozenset(needs)
    return Needy(projection_size=8, projection_hidden_size=16)


def test_the_learner_serves_token_access_and_refuses_unknown_needs():
    seen = []

    class Tokens(SimCLR):
        needs = frozenset({"tokens"})

        def setup(self, spec):
            seen.append(spec)
            self.build(spec.dim)

    with pytest.raises(TypeError, match="needs a vision transformer"):
        Learner(small_cnn(), 16, hidden_layer=-2, method=Tokens(projection_size=8, projection_hidden_size=16))
    Learner(tiny_vit(16), 16, method=Tokens(projection_size=8, projection_hidden_size=16))
    spec = seen[-1]
    assert spec.tokens.num_patches == 16 and spec.teacher is None and not hasattr(spec, "net")
    with pytest.raises(ValueError, match="cannot serve"):
        Learner(small_cnn(), 16, hidden_layer=-2, method=_needy({"gpu"}))
    with pytest.raises(ValueError, match="teacher_request"):
        Learner(small_cnn(), 16, hidden_layer=-2, method=_needy({"teacher"}))
