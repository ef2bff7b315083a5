"""LARS against a naive per-parameter loop; warmup + cosine against its closed form and LambdaLR; decay groups."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wrapssl.ema import cosine_momentum
from wrapssl.optim import LARS, WarmupCosine, build_optimizer, param_groups
from wrapssl.schedules import Schedules


def _net() -> nn.Sequential:
    """Conv (4-D), BN (1-D scale/bias), Linear (2-D weight + 1-D bias)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _naive_lars(params, grads_per_step, lr, momentum, weight_decay, eta, exclude_1d):
    """LARS written out per parameter in float64, one step at a time."""
    params = [p.detach().double().clone() for p in params]
    bufs = [None] * len(params)
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            if not (exclude_1d and p.dim() == 1):
                g = g + weight_decay * p
                pn, gn = p.norm().item(), g.norm().item()
                if pn > 0 and gn > 0:
                    g = g * (eta * pn / gn)
            bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
            params[i] = p - lr * bufs[i]
    return params


@pytest.mark.parametrize("momentum,weight_decay,exclude_1d", [(0.9, 1e-4, True), (0.0, 0.0, True),
                                                              (0.9, 0.05, False), (0.5, 0.0, False)])
def test_lars_matches_naive_loop(momentum, weight_decay, exclude_1d):
    net = _net()
    params = list(net.parameters())
    with torch.no_grad():
        params[-1].zero_()  # a zero-norm parameter keeps the plain update
    start = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    grads_per_step = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    opt = LARS(params, lr=0.3, momentum=momentum, weight_decay=weight_decay, exclude_1d=exclude_1d)
    for grads in grads_per_step:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    expected = _naive_lars(start, grads_per_step, 0.3, momentum, weight_decay, 0.001, exclude_1d)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_lars_first_step_size_is_trust_times_weight_norm():
    """Without momentum history or decay, an adapted step moves a weight by lr·η·‖w‖ whatever ‖g‖ is."""
    w = nn.Parameter(torch.randn(8, 8))
    b = nn.Parameter(torch.randn(8))
    before_w, before_b = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = 1000 * torch.randn(8, 8), torch.randn(8)
    LARS([w, b], lr=2.0, momentum=0.9, trust_coefficient=0.001).step()
    assert (w.detach() - before_w).norm().item() == pytest.approx(2.0 * 0.001 * before_w.norm().item(), rel=1e-5)
    torch.testing.assert_close(b.detach(), before_b - 2.0 * b.grad)  # 1-D: plain SGD step


def test_lars_group_exclusion_and_state_dict_round_trip():
    net = _net()
    opt = LARS(param_groups(net, 1e-3), lr=0.1)
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    again = LARS(param_groups(net, 1e-3), lr=0.1)
    again.load_state_dict(opt.state_dict())
    for p in net.parameters():
        torch.testing.assert_close(again.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(lr=0.1, momentum=1.0), dict(lr=0.1, trust_coefficient=0.0),
                                 dict(lr=0.1, weight_decay=-1.0)])
def test_lars_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        LARS([nn.Parameter(torch.ones(2, 2))], **bad)


@pytest.mark.parametrize("total,warmup,min_ratio", [(100, 10, 0.0), (50, 0, 0.1), (7, 7, 0.0), (1, 0, 0.0)])
def test_warmup_cosine_closed_form(total, warmup, min_ratio):
    f = WarmupCosine(total, warmup, min_ratio)
    for s in range(total + 3):
        if s < warmup:
            expected = (s + 1) / warmup
        else:
            t = min(s - warmup, max(1, total - warmup)) / max(1, total - warmup)
            expected = min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2
        assert f(s) == pytest.approx(expected, abs=1e-12), s
    if warmup:
        assert f(warmup - 1) == pytest.approx(1.0)


@pytest.mark.parametrize("total,warmup,min_ratio,cosine", [(20, 4, 0.0, True), (7, 0, 0.1, True), (10, 3, 0.0, False)])
def test_precomputed_schedules_give_what_lambda_lr_gives_step_for_step(total, warmup, min_ratio, cosine):
    """The Trainer's precomputed lr of each step equals torch's LambdaLR on the same factor, for every parameter
    group; the momentum of each step is the EMA's cosine."""
    ref_opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.4},
                               {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}], lr=0.4)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, WarmupCosine(total, warmup, min_ratio, cosine))
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))]}],
                          lr=99.0)
    schedules = Schedules(total, warmup, min_ratio, cosine, base_momentum=0.99, momentum_steps=total,
                          base_lrs=[0.4, 0.1])
    for step in range(total):
        schedules.set_lr(opt, step)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups], step
        assert schedules.momentum[step] == cosine_momentum(0.99, step, total)
        ref_opt.step()
        ref.step()
    assert schedules.momentum[total] == 1.0 and len(schedules.lr) == total + 1


def test_warmup_cosine_rejects_bad_settings():
    with pytest.raises(ValueError):
        WarmupCosine(0)
    with pytest.raises(ValueError):
        WarmupCosine(10, 11)


def test_param_groups_exclude_1d_from_decay():
    net = _net()
    decay, no_decay = param_groups(net, 0.05)
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    net[0].weight.requires_grad_(False)
    assert all(p is not net[0].weight for g in param_groups(net, 0.05) for p in g["params"])


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("SGD", torch.optim.SGD), ("lars", LARS)])
def test_build_optimizer_by_name(name, cls):
    opt = build_optimizer(name, _net(), lr=0.01, weight_decay=0.1)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_build_optimizer_class_gets_one_group_like_byol_pytorch():
    opt = build_optimizer(torch.optim.Adam, _net(), lr=3e-4, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.Adam) and len(opt.param_groups) == 1
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["lr"] == 3e-4


def test_build_optimizer_rejects_unknown():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer("adamm", _net(), lr=0.1)
    with pytest.raises(TypeError):
        build_optimizer(42, _net(), lr=0.1)
