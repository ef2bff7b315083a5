"""build_arch: every family builds, runs, resolves its hidden layer; 1-channel stems; timm path."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn
from torchvision import models

from wrapssl.archs import SmallResNet, adapt_input_channels, available_archs, build_arch, default_hidden_layer
from wrapssl.hidden import Encoder


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny forwards gain nothing from more, and a shared CPU loses a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _embed(net: nn.Module, layer, x: torch.Tensor) -> torch.Tensor:
    """Pooled hidden-layer output in eval mode, hook removed afterwards."""
    enc = Encoder(net, layer)
    net.eval()
    try:
        with torch.no_grad():
            return enc(x)
    finally:
        enc.close()


@pytest.mark.parametrize("channels", [1, 3])
def test_small_resnet_default(channels):
    net, layer = build_arch(channels=channels)
    assert isinstance(net, SmallResNet) and layer == "avgpool"
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    x = torch.rand(2, channels, 28, 28)
    assert net(x).shape == (2, 10)
    assert _embed(net, layer, x).shape == (2, 128)
    assert sum(p.numel() for p in net.parameters()) < 400_000


def test_small_resnet_trains_by_gradient():
    net, _ = build_arch("small_resnet", channels=1, num_classes=3)
    x, y = torch.rand(8, 1, 16, 16), torch.arange(8) % 3
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first = None
    for _ in range(5):
        loss = nn.functional.cross_entropy(net(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


# one representative per torchvision family, with an input size it accepts and its pooled width
FAMILIES = [
    ("resnet18", 32, "avgpool", 512),
    ("vit_b_16", 32, "encoder", 768),
    ("convnext_tiny", 32, "avgpool", 768),
    ("efficientnet_b0", 32, "avgpool", 1280),
    ("mobilenet_v3_small", 32, "avgpool", 576),
    ("mobilenet_v2", 32, "features", 1280),
    ("shufflenet_v2_x0_5", 32, "conv5", 1024),
    ("squeezenet1_1", 64, "features", 512),
    ("mnasnet0_5", 32, "layers", 1280),
    ("googlenet", 64, "avgpool", 1024),
]


@pytest.mark.parametrize("name,size,layer,dim", FAMILIES)
def test_torchvision_family_builds_runs_and_resolves(name, size, layer, dim):
    torch.manual_seed(0)
    net, hidden = build_arch(name, channels=3, num_classes=7, image_size=size)
    assert hidden == layer
    x = torch.rand(2, 3, size, size)
    assert _embed(net, hidden, x).shape == (2, dim)
    assert net(x).shape == (2, 7)


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("vit_b_16", 32), ("efficientnet_b0", 32),
                                       ("convnext_tiny", 32)])
def test_one_channel_stem_equals_rgb_net_on_grey_images(name, size):
    """The adapted stem sums the colour kernels: grey input gives what the RGB net gives on repeated grey."""
    torch.manual_seed(0)
    rgb, _ = build_arch(name, channels=3, image_size=size)
    grey = adapt_input_channels(copy.deepcopy(rgb), 1)
    x = torch.rand(2, 1, size, size)
    rgb.eval(), grey.eval()
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)
    first = next(m for m in grey.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1


def test_one_channel_build_arch_forward():
    net, layer = build_arch("mobilenet_v3_small", channels=1)
    assert _embed(net, layer, torch.rand(2, 1, 32, 32)).shape == (2, 576)


# the remaining families, built on the meta device (no memory, no compute): the hidden layer must exist
META = ["alexnet", "densenet121", "efficientnet_v2_s", "inception_v3", "maxvit_t", "resnext50_32x4d",
        "swin_t", "swin_v2_t", "vgg11_bn", "wide_resnet50_2", "vit_l_32"]


@pytest.mark.parametrize("name", META)
def test_other_families_resolve_their_hidden_layer(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    with torch.device("meta"):
        net = models.get_model(name, weights=None, **kwargs)
    layer = default_hidden_layer(name, net)
    assert isinstance(layer, str) and layer in dict(net.named_modules())
    adapt_input_channels(net, 1)
    assert next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels == 1


def test_regnet_builds_on_cpu():
    net, layer = build_arch("regnet_x_400mf", channels=1)
    assert layer == "avgpool" and _embed(net, layer, torch.rand(2, 1, 32, 32)).shape == (2, 400)


def test_vit_image_size_must_fit_patches():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_arch("vit_b_16", image_size=30)


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="resnet18"):
        build_arch("resnet-81")
    with pytest.raises(ValueError, match="channels"):
        build_arch("resnet18", channels=2)
    assert "small_resnet" in available_archs() and "resnet50" in available_archs()


def test_no_weights_are_requested(monkeypatch):
    seen = {}
    real = models.get_model

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(models, "get_model", spy)
    build_arch("mobilenet_v3_small")
    assert "weights" in seen and seen["weights"] is None


class _FakeTimmNet(nn.Module):
    """Stands in for a timm model: forward_features gives maps, forward gives logits."""

    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3)
        self.head = nn.Linear(6, num_classes)

    def forward_features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []
    mod = types.ModuleType("timm")

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kwargs):
        calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs))
        if name != "fakenet_tiny":
            raise RuntimeError(f"Unknown model ({name})")
        return _FakeTimmNet(in_chans, num_classes)

    mod.create_model = create_model
    mod.list_models = lambda *a, **k: ["fakenet_tiny"]
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls


@pytest.mark.parametrize("name", ["timm:fakenet_tiny", "fakenet_tiny"])
def test_timm_models_use_forward_features(fake_timm, name):
    net, layer = build_arch(name, channels=1, num_classes=4)
    assert callable(layer) and fake_timm[-1]["pretrained"] is False and fake_timm[-1]["in_chans"] == 1
    assert _embed(net, layer, torch.rand(2, 1, 16, 16)).shape == (2, 6)


def test_timm_unknown_and_missing(fake_timm, monkeypatch):
    with pytest.raises(ValueError, match="timm does not know"):
        build_arch("timm:nope")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails
    with pytest.raises(ImportError, match="pip install timm"):
        build_arch("timm:fakenet_tiny")
