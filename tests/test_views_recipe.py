"""SimCLR's view-count and local-crop knobs (issue 19: more views per image at equal compute)."""
import pytest
import torch

from wrapssl import Learner, simclr_views
from wrapssl.losses.ntxent import nt_xent
from wrapssl.methods.simclr import SimCLR


def tiny_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))


def test_simclr_views_count_sizes_and_globals():
    views = simclr_views(28, n_views=4, n_local=3, local_size=12, scale=(0.25, 1.0))
    assert len(views.transforms) == 7 and views.n_global == 4
    out = views(torch.rand(5, 3, 28, 28))
    assert [v.shape[-1] for v in out] == [28] * 4 + [12] * 3
    assert not torch.equal(out[0], out[1])  # independent draws per view
    assert len(simclr_views(28).transforms) == 2  # SimCLR's pair stays the default


def test_method_args_reach_the_views_and_the_loss():
    torch.manual_seed(0)
    learner = Learner(tiny_net(), image_size=16, hidden_layer=-2, method="simclr", n_views=3, n_local=2,
                      local_size=8, crop_scale=(0.3, 1.0))
    assert len(learner.views.transforms) == 5 and learner.views.n_global == 3
    crops = [m for m in learner.views.modules() if type(m).__name__ == "RandomResizedCrop"]
    assert [c.scale for c in crops] == [(0.3, 1.0)] * 3 + [(0.05, 0.4)] * 2  # crop_scale sets globals only
    loss = learner(torch.rand(6, 3, 16, 16))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()


def test_four_view_loss_prefers_aligned_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    aligned = nt_xent([z + 0.01 * torch.randn_like(z) for _ in range(4)], 0.2)
    shuffled = nt_xent([z] + [torch.randn_like(z) for _ in range(3)], 0.2)
    assert aligned < shuffled


@pytest.mark.parametrize("kwargs", [dict(n_views=1), dict(n_views=0, n_local=4), dict(n_views=2.5)])
def test_bad_view_counts_are_refused(kwargs):
    with pytest.raises(ValueError, match="n_views"):
        SimCLR(**kwargs)
