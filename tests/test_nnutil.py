"""The small torch helpers: a shape probe that leaves the net as it was, a private RNG stream, the eval-mode
warning and context, copies, the module's device, its input channels."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torchvision import models

from wrapssl.nnutil import (copy_module, eval_mode, input_channels, meta_probe, module_device, private_rng,
                            warn_if_frozen, with_context)

from conftest import small_cnn


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def snapshot(net: nn.Module) -> dict:
    """Everything a probe could change: tensor values and storage, train/eval flags, hook counts."""
    return {"tensors": {k: (v.clone(), v.data_ptr(), v.device) for k, v in net.state_dict(keep_vars=True).items()},
            "params": [(n, type(p), p.requires_grad) for n, p in net.named_parameters()],
            "modes": [(n, m.training) for n, m in net.named_modules()],
            "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in net.named_modules()]}


def assert_same(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, (value, ptr, device) in before["tensors"].items():
        v, p, d = after["tensors"][k]
        assert torch.equal(value, v) and ptr == p and device == d, k
    for key in ("params", "modes", "hooks"):
        assert before[key] == after[key]


@pytest.mark.parametrize("train", [True, False])
def test_a_probe_leaves_weights_buffers_modes_and_hooks_bit_identical(train):
    net = bn_net().train(train)
    net[3].eval()  # mixed flags must survive too
    seen = []
    net.register_forward_hook(lambda m, a, out: seen.append(out.device.type))
    before = snapshot(net)

    def run(n, x):
        n[1].register_forward_hook(lambda m, a, o: None).remove()  # a hook of run's own, removed by it
        return n(x)

    out = meta_probe(net, run, (2, 3, 9, 9))
    assert out.shape == (2, 2) and out.device.type == "meta"  # ran on the meta device, not on real tensors
    assert seen == ["meta"]  # the user's own hook saw the probe's forward, once
    assert_same(before, snapshot(net))
    x = torch.rand(2, 3, 9, 9)
    fresh = bn_net().train(train)
    fresh[3].eval()
    torch.testing.assert_close(net(x), fresh(x))  # still the same function (BN statistics move alike)


def test_the_probe_runs_in_eval_mode_without_gradients():
    net = bn_net()
    modes = meta_probe(net, lambda n, x: (n.training, n[1].training, torch.is_grad_enabled()), (2, 3, 8, 8))
    assert modes == (False, False, False) and net.training and net[1].training


class OwnTensor(nn.Module):
    """Keeps a tensor outside its parameters and buffers: meta tensors cannot run it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = torch.full((3,), 2.0)

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3))) * self.scale


def test_nets_meta_tensors_cannot_run_are_probed_on_a_copy():
    net = OwnTensor()
    before = snapshot(net)
    out = meta_probe(net, lambda n, x: (n is net, n(x)), (2, 4, 5, 5))
    assert out[0] is False and out[1].device.type == "cpu" and out[1].shape == (2, 3)
    assert_same(before, snapshot(net))


def test_a_net_no_probe_can_run_raises_the_error_of_its_own_forward():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(5, 2))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        meta_probe(net, lambda n, x: n(x), (2, 3, 8, 8))
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_tied_weights_are_probed():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[2].weight = net[0].weight
    assert meta_probe(net, lambda n, x: n(x.flatten(1)[:, :4]).device.type, (2, 4, 1, 1)) == "meta"
    assert net[2].weight is net[0].weight and net[0].weight.device.type == "cpu"


def test_private_rng_neither_consumes_nor_depends_on_the_callers_stream():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with private_rng("cpu"):
        inside = torch.rand(5)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream continues as if nothing had run
    with private_rng(torch.device("cpu"), seed=7):
        a = torch.rand(4)
    torch.manual_seed(123)
    with private_rng(seed=7):
        b = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(a, b) and torch.equal(a, torch.rand(4)) and not torch.equal(inside[:4], a)


def test_warn_if_frozen_names_batchnorm_and_dropout_in_eval_mode_only():
    net = bn_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_frozen(net)  # all in train mode
        net[2].eval()  # a ReLU in eval mode changes nothing: no warning
        assert not warn_if_frozen(net)
    net[1].eval()
    with pytest.warns(RuntimeWarning, match=r"the Learner is training, but 1 BatchNorm/dropout layer\(s\) of the "
                                            r"net are in eval mode \(e.g. '1'\): their statistics stay frozen"):
        assert warn_if_frozen(net)
    net.eval()
    with pytest.warns(RuntimeWarning, match=r"the Trainer trains .* 2 BatchNorm/dropout .* statistics update"):
        warn_if_frozen(net, who="the Trainer trains the net", effect="it puts them in train mode, so BatchNorm "
                                                                    "statistics update and dropout is active")


def test_warning_points_at_the_callers_caller():
    def library_call(net):
        warn_if_frozen(net)

    with pytest.warns(RuntimeWarning) as record:
        library_call(bn_net().eval())  # this line is where the user called the library
    assert record[0].filename == __file__ and record[0].lineno == library_call.__code__.co_firstlineno + 4


def test_module_device():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")  # no tensors at all
    assert module_device(nn.Linear(2, 2, device="meta")).type == "meta"
    bn = nn.BatchNorm1d(2, affine=False, device="meta")  # buffers only
    assert module_device(bn).type == "meta"


@pytest.mark.parametrize("layer", ["1", 1, "classifier", "callable"])
def test_the_encoders_width_probe_leaves_the_net_bit_identical(layer):
    from wrapssl.encoder import ClassifierInput, Encoder

    net = bn_net()
    net[1].eval()
    spec = {"classifier": ClassifierInput("6", ("3",)), "callable": lambda n, x: n[:2](x)}.get(layer, layer)
    encoder = Encoder(net, spec)
    before = snapshot(net)
    assert encoder.probe_width(3, 9) == 4  # the BatchNorm's 4 channels, averaged over space; the Linear's input
    assert_same(before, snapshot(net))
    encoder.close()


def test_eval_mode_restores_every_flag_through_train():
    """Mixed flags come back; modules that were training get train(True), which is where caches are dropped."""
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.cache = {}

        def train(self, mode=True):
            super().train(mode)
            if mode:
                self.cache = {}
            return self

    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(Cache(), nn.BatchNorm1d(2)))
    net[1][1].eval()
    flags = [m.training for m in net.modules()]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
        net[1][0].cache["cpu"] = torch.ones(1)
    assert [m.training for m in net.modules()] == flags
    assert net[1][0].cache == {}


def test_copy_module_copies_modules_that_cache_non_leaf_tensors():
    lin = nn.Linear(3, 3)
    lin.cache = {"cpu": lin.weight * 2}  # computed with gradients, as timm's LeViT caches its attention biases
    with pytest.raises(RuntimeError):
        copy.deepcopy(lin)
    twin = copy_module(lin)
    assert twin.cache["cpu"].grad_fn is None and torch.equal(twin.cache["cpu"], lin.cache["cpu"])
    assert twin.weight is not lin.weight and torch.equal(twin.weight, lin.weight)


@pytest.mark.parametrize("channels", [1, 2, 4, 13])
def test_input_channels_come_from_the_first_convolution(channels):
    assert input_channels(small_cnn(channels=channels)) == channels
    vit = models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    vit.conv_proj = nn.Conv2d(channels, 8, 8, 8)  # the patch embedding is a convolution
    assert input_channels(vit) == channels
    assert input_channels(nn.Sequential(nn.Flatten(), nn.Linear(12, 2))) == 3  # no convolution: RGB


class NeedsTwoArguments(Exception):
    """An exception type with a constructor of its own, which a message alone cannot build."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"{code}: {detail}")


@pytest.mark.parametrize("error", [ValueError("bad"), RuntimeError("bad"), KeyError("bad"),
                                   NeedsTwoArguments(7, "bad"), OSError(2, "bad")])
def test_with_context_keeps_the_exception_type_and_its_cause(error):
    out = with_context(error, "while probing the net")
    assert type(out) is type(error)
    if out is error:  # a constructor of its own: the context is a note on the original
        assert error.__notes__ == ["while probing the net"]
    else:
        assert out.__cause__ is error and "while probing the net" in str(out)
    with pytest.raises(type(error), match="while probing the net|bad"):
        raise out
