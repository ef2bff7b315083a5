"""Every method learns on one fixed batch of real images (Fashion-MNIST): the loss falls and nothing collapses.

Small net (width 16), 20-pixel views (12-pixel local crops for the multi-crop methods), one fixed
batch of 32 images and the same views at every step (the augmentation is reseeded), 40 Adam steps,
small heads: a fixed objective that a method which learns must lower within a few dozen steps.
"Falls" compares the last tenth of the run with the highest of the first three tenths; "no
collapse" checks the spread of the representation and, more sensitive, of the projection (a head
can collapse above a varied representation); an objective without any defence against collapse
falls below the same bar in the same run.

The learning curves on many batches (200 steps, DINO 600, and the MAE and distillation runs) are in
benchmarks/bench_methods.py --curves, with the thresholds these tests had.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wrapssl import Learner, Method, Views, available_methods, byol_views
from wrapssl.heads import mlp

from conftest import small_cnn

STEPS, BATCH, SIZE = 40, 32, 20
REP_SPREAD = 0.05   # representation; a random init gives about 0.04, these runs 0.06-0.07
PROJ_SPREAD = 0.3   # projection × √d; these runs 0.66-0.88, the collapsing objective below 0.21
MULTICROP = dict(n_local=2, local_size=12)

# method -> (head sizes and knobs, Adam learning rate)
RUNS = {
    "byol": dict(projection_hidden_size=256, projection_size=64),
    "simsiam": dict(projection_size=128, prediction_hidden_size=32),
    "simclr": dict(projection_hidden_size=256, projection_size=64),
    "moco": dict(projection_hidden_size=256, projection_size=64, prediction_hidden_size=256),
    "barlow_twins": dict(projector_dims=(256, 256)),
    "vicreg": dict(projector_dims=(256, 256)),
    "nnclr": dict(queue_size=1024, projection_hidden_size=256, projection_size=64, prediction_hidden_size=256),
    "swav": dict(n_prototypes=32, projection_hidden_size=256, projection_size=64, freeze_prototypes_steps=20,
                 **MULTICROP),
}
# DINO's centre must first catch up with the teacher, which takes hundreds of varied batches (the curve is in
# the benchmark); on one batch its student is checked against a fixed teacher and centre instead
DINO = dict(out_dim=64, hidden_size=128, bottleneck_size=32, teacher_temp=0.04, warmup_teacher_temp_steps=0,
            **MULTICROP)
# a short run needs a faster EMA target than the published 0.996
FAST_EMA = {"byol"}


@pytest.fixture
def one_thread():
    """One intra-op thread: these ops are tiny, and a shared CPU makes a second thread spin, not help."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch(fmnist_train):
    """One fixed batch of 32 Fashion-MNIST images (uint8, 1 x 28 x 28)."""
    return fmnist_train[0][:BATCH]


def spread(emb: torch.Tensor) -> float:
    """Std over the batch of L2-normalised embeddings, averaged over dimensions (0 = collapsed to a point)."""
    return F.normalize(emb, dim=1).std(dim=0).mean().item()


def collapse_stats(learner: Learner, x: torch.Tensor) -> tuple[float, float]:
    """Spread of the representation, and of the projection scaled by √d (≈1 when isotropic, 0 when collapsed).

    Collapse shows first in the projection: a head can map every input to one
    point while the representation below it still varies.
    """
    learner.eval()
    with torch.no_grad():
        proj, emb = learner(x, return_embedding=True)
    learner.train()
    return spread(emb), spread(proj) * proj.shape[1] ** 0.5


def overfit(learner: Learner, x: torch.Tensor, steps: int = STEPS, lr: float = 1e-3) -> list[float]:
    """Adam steps on the fixed batch ``x``, with the same augmentation draws at every step; the losses."""
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        torch.manual_seed(1)  # the same views every step
        loss = learner(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
        losses.append(loss.item())
    return losses


def windowed(losses: list[float], k: int) -> list[float]:
    """Means of consecutive windows of k losses."""
    return [sum(losses[i:i + k]) / k for i in range(0, len(losses) - k + 1, k)]


def falls(losses: list[float]) -> tuple[bool, list[float]]:
    """Whether the last tenth of the run is 3% below the highest of its first three tenths; the tenths."""
    means = windowed(losses, len(losses) // 10)
    peak, last = max(means[:3]), means[-1]
    return last < peak - 0.03 * abs(peak), [round(m, 3) for m in means]


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last dimension."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def grey_learner(method, **kwargs) -> Learner:
    torch.manual_seed(0)
    return Learner(small_cnn(channels=1, width=16), image_size=SIZE, hidden_layer=-2, channels=1, method=method,
                   normalize=((0.286,), (0.353,)), **kwargs)


class PullTogether(Method):
    """Maximise the cosine of two views' projections: no negatives, no predictor, no stop-gradient."""

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, 128, 64])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return byol_views(image_size, channels)

    def loss(self, online, target, step=0):
        return -F.cosine_similarity(online[0], online[1]).mean()


def test_collapse_check_flags_an_objective_that_collapses(batch, one_thread):
    assert spread(torch.ones(32, 8) + 1e-7 * torch.randn(32, 8)) < 1e-5
    learner = grey_learner(PullTogether())
    losses = overfit(learner, batch)
    assert losses[-1] < -0.99  # the trivial optimum: every image maps to one direction
    rep, proj = collapse_stats(learner, batch)
    print(f"collapsing objective: spread {rep:.4f} projection {proj:.3f}")
    # the methods below stay at 0.66-0.88 after the same run
    assert proj < PROJ_SPREAD


# methods whose fixed-batch check lives in their own file: they need another kind of net (a ViT, a teacher)
OWN_RUN = {"mae": "test_mae.py", "distill": "test_distill.py"}


def test_every_method_has_a_fixed_batch_check():
    assert sorted([*RUNS, "dino", *OWN_RUN]) == available_methods(), "add a fixed-batch check for the new method"
    here = Path(__file__).parent
    assert all("fixed_batch" in (here / f).read_text() for f in OWN_RUN.values())


@pytest.mark.parametrize("method", sorted(RUNS))
def test_method_lowers_its_loss_on_a_fixed_batch_without_collapse(batch, one_thread, method):
    learner = grey_learner(method, moving_average_decay=0.99 if method in FAST_EMA else None, **RUNS[method])
    losses = overfit(learner, batch)
    assert all(math.isfinite(v) for v in losses)
    fell, means = falls(losses)
    assert fell, (method, means)
    rep, proj = collapse_stats(learner, batch)
    print(method, means, f"spread {rep:.4f} projection {proj:.3f}")
    assert rep > REP_SPREAD and proj > PROJ_SPREAD, f"{method}: collapsed (spread {rep:.4f}, projection {proj:.3f})"


def test_dino_student_learns_a_fixed_teacher_on_a_fixed_batch(batch, one_thread):
    """Teacher frozen (momentum 1) and centre frozen (centre momentum 1): the student's cross-entropy to the
    sharpened teacher falls, and the student's output sharpens from uniform towards the teacher's."""
    learner = grey_learner("dino", moving_average_decay=1.0, center_momentum=1.0, **DINO)
    teacher = {k: v.clone() for k, v in learner.target_projector.state_dict().items()}
    losses = overfit(learner, batch)
    assert all(math.isfinite(v) for v in losses)
    fell, means = falls(losses)
    assert fell and means[-1] < 0.8 * means[0], means
    assert all(torch.equal(v, learner.target_projector.state_dict()[k]) for k, v in teacher.items())
    learner.eval()
    with torch.no_grad():
        p = F.softmax(learner(batch, return_embedding=True)[0] / learner.method.student_temp, dim=1)
    per_sample = entropy(p).mean().item()
    print("dino", means, f"entropy per sample {per_sample:.3f}")
    assert per_sample < 0.95 * math.log(DINO["out_dim"]), "uniform collapse"
