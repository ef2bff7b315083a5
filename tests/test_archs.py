"""build_arch: every family builds, runs, finds its pre-logits; stems for any channel count; local weights; timm."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn
from torchvision import models

from wrapssl.archs import SmallResNet, adapt_input_channels, available_archs, build_arch, load_weights, read_state_dict
from wrapssl.encoder import ClassifierInput, Encoder
from wrapssl.prelogits import find_pre_logits


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
    assert isinstance(net, SmallResNet) and layer == ClassifierInput("fc")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (2, 2)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    x = torch.rand(2, channels, 28, 28)
    assert net(x).shape == (2, 10)
    assert _embed(net, layer, x).shape == (2, 128)
    assert sum(p.numel() for p in net.parameters()) < 400_000


def test_small_resnet_representation_is_the_bn_neck_on_the_pooled_features():
    torch.manual_seed(0)
    net, layer = build_arch("small_resnet", channels=3)
    net.neck.running_mean.uniform_(-1, 1)
    net.neck.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.rand(4, 3, 28, 28)
    with torch.no_grad():  # by hand: stem at half resolution, stages, mean over the map, the neck's affine norm
        h = net.layers(net.relu(net.bn1(net.conv1(x))))
        assert h.shape[-2:] == (2, 2)  # 28 -> 14 (stem) -> 14, 7, 4, 2
        pooled = h.mean(dim=(2, 3))
        n = net.neck
        expected = (pooled - n.running_mean) / torch.sqrt(n.running_var + n.eps) * n.weight + n.bias
        assert torch.allclose(_embed(net, layer, x), expected, atol=1e-5)
    plain = SmallResNet(3, stem_stride=1, neck=False)  # the earlier net: full-resolution stem, no neck
    assert plain.conv1.stride == (1, 1) and isinstance(plain.neck, nn.Identity)
    assert plain.layers(plain.relu(plain.bn1(plain.conv1(x)))).shape[-2:] == (4, 4)


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


# one representative per torchvision family, with an input size it accepts, its classifier and its pre-logits width
FAMILIES = [
    ("resnet18", 32, "fc", 512),
    ("vit_b_16", 32, "heads.head", 768),
    ("convnext_tiny", 32, "classifier.2", 768),
    ("efficientnet_b0", 32, "classifier.1", 1280),
    ("mobilenet_v3_small", 32, "classifier.3", 1024),
    ("mobilenet_v2", 32, "classifier.1", 1280),
    ("shufflenet_v2_x0_5", 32, "fc", 1024),
    ("squeezenet1_1", 64, "classifier.1", 512),
    ("mnasnet0_5", 32, "classifier.1", 1280),
    ("googlenet", 64, "fc", 1024),
]


@pytest.mark.parametrize("name,size,classifier,dim", FAMILIES)
def test_torchvision_family_builds_runs_and_finds_its_pre_logits(name, size, classifier, dim):
    torch.manual_seed(0)
    net, hidden = build_arch(name, channels=3, num_classes=7, image_size=size)
    assert isinstance(hidden, ClassifierInput) and hidden.classifier == classifier
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
    assert _embed(net, layer, torch.rand(2, 1, 32, 32)).shape == (2, 1024)


@pytest.mark.parametrize("channels", [2, 4, 13])
def test_any_channel_count_answers_a_flat_image_as_the_rgb_net_answers_grey(channels):
    """The adapted stem spreads the summed colour kernel: equal bands give what the RGB net gives on grey."""
    torch.manual_seed(0)
    rgb, _ = build_arch("resnet18", channels=3)
    bands = adapt_input_channels(copy.deepcopy(rgb), channels)
    grey = torch.rand(2, 1, 32, 32)
    rgb.eval(), bands.eval()
    with torch.no_grad():
        torch.testing.assert_close(bands(grey.expand(-1, channels, -1, -1)), rgb(grey.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-4)
    assert bands.conv1.in_channels == channels
    net, layer = build_arch("small_resnet", channels=channels)
    assert _embed(net, layer, torch.rand(2, channels, 16, 16)).shape == (2, 128)


# the remaining families, built on the meta device (no memory, no compute): the hidden layer must exist
META = ["alexnet", "densenet121", "efficientnet_v2_s", "inception_v3", "maxvit_t", "resnext50_32x4d",
        "swin_t", "swin_v2_t", "vgg11_bn", "wide_resnet50_2", "vit_l_32"]


@pytest.mark.parametrize("name", META)
def test_other_families_find_their_classifier(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    with torch.device("meta"):
        net = models.get_model(name, weights=None, **kwargs)
    layer = find_pre_logits(net, 3, 224)
    classifier = dict(net.named_modules())[layer.classifier]
    assert classifier is [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    adapt_input_channels(net, 1)
    assert next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels == 1


def test_regnet_builds_on_cpu():
    net, layer = build_arch("regnet_x_400mf", channels=1)
    assert layer == ClassifierInput("fc") and _embed(net, layer, torch.rand(2, 1, 32, 32)).shape == (2, 400)


def test_vit_image_size_must_fit_patches():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_arch("vit_b_16", image_size=30)


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="resnet18"):
        build_arch("resnet-81")
    with pytest.raises(ValueError, match="channels"):
        build_arch("resnet18", channels=0)
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
def test_timm_models_are_built_by_timm(fake_timm, name):
    net, layer = build_arch(name, channels=1, num_classes=4)
    assert layer == ClassifierInput("head") and fake_timm[-1]["pretrained"] is False
    assert fake_timm[-1]["in_chans"] == 1
    assert _embed(net, layer, torch.rand(2, 1, 16, 16)).shape == (2, 6)


def test_timm_unknown_and_missing(fake_timm, monkeypatch):
    with pytest.raises(ValueError, match="timm does not know"):
        build_arch("timm:nope")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails
    with pytest.raises(ImportError, match="pip install timm"):
        build_arch("timm:fakenet_tiny")


# ----------------------------------------------------------------------------- local weights

def _trained(net: nn.Module) -> nn.Module:
    """``net`` with every float tensor moved away from its initial value, so a load is visible."""
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01 + 0.1)
    return net


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_arch_starts_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    source = _trained(models.resnet18(num_classes=10))
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    net, _ = build_arch("resnet18", weights=tmp_path / "resnet18.pth")
    assert _same(net.state_dict(), source.state_dict())
    # RGB weights for a grey net: the stem's colour kernels summed, the rest as saved
    grey, _ = build_arch("resnet18", channels=1, weights=tmp_path / "resnet18.pth")
    torch.testing.assert_close(grey.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey.eval()(x), source.eval()(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_weights_come_from_backbones_checkpoints_and_other_trainers(tmp_path):
    from wrapssl import Learner

    torch.manual_seed(0)
    source = _trained(SmallResNet(1))
    learner = Learner(source, image_size=16, projection_hidden_size=16, projection_size=8)
    files = {
        "checkpoint-00000005.pt": {"format": "wrapssl.trainer", "step": 5, "learner": learner.state_dict()},
        "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
        "backbone.pt": source.state_dict(),
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    from safetensors.torch import save_file
    save_file(source.state_dict(), tmp_path / "net.safetensors")
    for name in [*files, "net.safetensors", "."]:  # "." is the run folder: its backbone.pt
        net = load_weights(SmallResNet(1), tmp_path / name)
        assert _same(net.state_dict(), source.state_dict()), name
    assert _same(read_state_dict(tmp_path), source.state_dict())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_the_prefixes_of_ddp_and_compile_are_stripped_from_every_key(prefix):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
    given = dict(state)
    net = load_weights(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), state)
    assert _same(net.state_dict(), source.state_dict()) and state == given  # the caller's dict is left alone


def test_a_prefix_only_some_keys_have_is_part_of_their_names():
    class Wrapper(nn.Module):  # a net whose own child is called "module"
        def __init__(self):
            super().__init__()
            self.module, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    torch.manual_seed(0)
    source = Wrapper()
    net = load_weights(Wrapper(), dict(source.state_dict()))
    assert _same(net.state_dict(), source.state_dict())
    with pytest.raises(ValueError, match=r"key\(s\) of the file are not in the net: module\.module\.weight"):
        load_weights(Wrapper(), {"module.module.weight": source.module.weight, **source.state_dict()})


def test_mismatched_weights_name_the_keys_and_the_fix(tmp_path):
    torch.manual_seed(0)
    torch.save(models.resnet18(num_classes=1000).state_dict(), tmp_path / "imagenet.pth")
    net = models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"fc\.weight \(file \(1000, 512\), net \(10, 512\)\).*ignore=\['fc\.'\]"):
        load_weights(net, tmp_path / "imagenet.pth")
    assert _same(net.state_dict(), before)  # nothing was loaded
    load_weights(net, tmp_path / "imagenet.pth", ignore=["fc."])
    assert torch.equal(net.fc.weight, before["fc.weight"]) and not torch.equal(net.conv1.weight, before["conv1.weight"])
    with pytest.raises(ValueError, match=r"80 key\(s\) of the net are not in the file: layer1.2.conv1.weight.*another "
                                         "architecture"):
        load_weights(models.resnet34(), tmp_path / "imagenet.pth")
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_weights(net, tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_weights(net, tmp_path / "meta.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_arch("resnet18", weights=tmp_path / "nope.pt")


def test_timm_nets_take_a_local_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = _trained(timm.create_model("resnet18", num_classes=10))
    torch.save(source.state_dict(), tmp_path / "timm_resnet18.pth")
    net, layer = build_arch("timm:resnet18", weights=tmp_path / "timm_resnet18.pth")
    assert _same(net.state_dict(), source.state_dict()) and callable(layer)
    # a ViT saved at 224 px loads into one built for 32 px: timm's own filter resamples the position embedding
    vit = _trained(timm.create_model("vit_tiny_patch16_224", num_classes=10))
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    small, _ = build_arch("timm:vit_tiny_patch16_224", image_size=32, weights=tmp_path / "vit.pth")
    assert small.pos_embed.shape == (1, 5, 192)
    assert torch.equal(small.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert torch.equal(small.pos_embed[:, 0], vit.pos_embed[:, 0])  # the class token's position is kept
