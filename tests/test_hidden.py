"""Hidden-layer capture: names, indices, callables, pooling, early exit, closing."""
import gc
import weakref

import pytest
import torch
from torch import nn
from torchvision import models

from wrapssl import Learner
from wrapssl.encoder import ClassifierInput, Encoder, pool

from conftest import small_cnn

SMALL = dict(projection_hidden_size=32, projection_size=8)


class CountingHead(nn.Module):
    """A head that counts its calls, to prove the learner never runs it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = small_cnn()[:-1]

    def forward(self, x):
        h = self.body(x)
        return h, {"aux": h * 2}


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = small_cnn()[:-1]

    def forward(self, x):
        return {"features": self.body(x), "extra": None}


class SharedBlockNet(nn.Module):
    """Calls the same conv block twice, as weight-tied nets do."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = CountingHead(16, 4)

    def forward(self, x):
        h = self.block(self.block(self.stem(x)))
        return self.head(self.pool(h).flatten(1))


def test_named_layer_matches_manual_resnet_features():
    net = models.resnet18().eval()
    x = torch.rand(2, 3, 64, 64)
    enc = Encoder(net, "avgpool")
    manual = nn.Sequential(*list(net.children())[:-1])(x).flatten(1)
    torch.testing.assert_close(enc(x), manual)


def test_int_index_and_minus_one():
    net = small_cnn().eval()
    x = torch.rand(3, 3, 16, 16)
    # child -2 is Flatten: its output is the pooled features
    torch.testing.assert_close(Encoder(net, -2)(x), net[:-1](x))
    torch.testing.assert_close(Encoder(net, -1)(x), net(x))
    torch.testing.assert_close(Encoder(net, 2)(x), net[:3](x).mean(dim=(2, 3)))


def test_callable_layer():
    net = small_cnn().eval()
    x = torch.rand(2, 3, 16, 16)
    enc = Encoder(net, lambda n, inp: n[:6](inp))
    torch.testing.assert_close(enc(x), net[:6](x).mean(dim=(2, 3)))


@pytest.mark.parametrize("cls", [TupleNet, DictNet])
def test_tuple_and_dict_outputs(cls):
    net = cls().eval()
    x = torch.rand(2, 3, 16, 16)
    expected = net.body(x)
    torch.testing.assert_close(Encoder(net, -1)(x), expected)
    learner = Learner(net, image_size=16, hidden_layer=-1, projection_hidden_size=32, projection_size=8)
    assert learner.feature_dim == expected.shape[1]
    learner(torch.rand(4, 3, 16, 16)).backward()


def test_vit_tokens_mean_and_cls_pooling():
    vit = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                   hidden_dim=32, mlp_dim=64).eval()
    x = torch.rand(2, 3, 32, 32)
    tokens = vit.encoder(torch.cat([vit.class_token.expand(2, -1, -1), vit._process_input(x)], dim=1))
    torch.testing.assert_close(Encoder(vit, "encoder")(x), tokens.mean(dim=1))
    torch.testing.assert_close(Encoder(vit, "encoder", pooling="cls")(x), tokens[:, 0])
    learner = Learner(vit, image_size=32, hidden_layer="encoder", pooling="cls",
                      projection_hidden_size=32, projection_size=8)
    assert learner.feature_dim == 32
    learner(torch.rand(4, 3, 40, 40)).backward()


def test_pool_shapes_and_cls_on_maps_is_an_error():
    torch.testing.assert_close(pool(torch.ones(2, 5, 3, 3)), torch.ones(2, 5))
    with pytest.raises(ValueError, match="pooling='cls' needs token"):
        pool(torch.ones(2, 5, 3, 3), "cls")


def test_early_exit_skips_the_head_and_closing_restores_the_net():
    net = SharedBlockNet()
    x = torch.rand(4, 3, 16, 16)
    before = net(x).detach()
    net.head.calls = 0
    learner = Learner(net, image_size=16, hidden_layer="pool", projection_hidden_size=32, projection_size=8)
    for _ in range(2):
        learner(x).backward()
    learner.embed(x)
    assert net.head.calls == 0
    # the shared block got gradients from both of its calls
    assert net.block[0].weight.grad is not None and net.stem.weight.grad is not None
    learner.close()
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert net(x).shape == before.shape and net.head.calls == 1


def test_wrapped_but_open_net_still_runs_normally_and_keeps_no_activation():
    net = small_cnn().eval()
    x = torch.rand(2, 3, 16, 16)
    expected = net(x)
    seen = []  # weak references to every output of the hidden layer: alive only while someone holds them
    watch = net[-2].register_forward_hook(lambda m, args, out: seen.append(weakref.ref(out)))
    with Learner(net, image_size=16, hidden_layer=-2, projection_hidden_size=32, projection_size=8) as learner:
        torch.testing.assert_close(net(x), expected)  # user's own forward is not intercepted
        learner.train()
        learner(torch.rand(4, 3, 16, 16)).backward()
        gc.collect()
        assert len(seen) > 1 and all(ref() is None for ref in seen)  # online and target activations: none kept
    watch.remove()
    assert not net[-2]._forward_hooks


def test_same_module_called_twice_captures_first_call():
    net = SharedBlockNet().eval()
    x = torch.rand(2, 3, 16, 16)
    enc = Encoder(net, "block")
    torch.testing.assert_close(enc(x), net.block(net.stem(x)).mean(dim=(2, 3)))


def test_unknown_layer_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean 'avgpool'"):
        Encoder(models.resnet18(), "avgpol")
    with pytest.raises(ValueError, match="out of range"):
        Encoder(small_cnn(), 40)
    with pytest.raises(TypeError, match="hidden_layer must be"):
        Encoder(small_cnn(), 1.5)


def test_layer_that_never_fires_is_a_clear_error():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_cnn()
            self.spare = nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(RuntimeError, match="never ran"):
        Encoder(Unused(), "spare")(torch.rand(2, 3, 8, 8))


# ----------------------------------------------------------------------------- feature layouts

class ChannelsLastNet(nn.Module):
    """A conv stem whose features are laid out (B, H, W, C), as timm's Swin gives them, then a classifier."""

    def __init__(self, channels: int = 24, stride: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=stride, padding=1)
        self.features = nn.Identity()  # names the (B, H, W, C) maps
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        h = self.features(self.stem(x).permute(0, 2, 3, 1))
        return self.head(self.norm(h).mean(dim=(1, 2)))


def test_channels_last_maps_are_pooled_over_their_spatial_axes():
    net = ChannelsLastNet(24).eval()
    x = torch.rand(2, 3, 16, 16)
    maps = net.features(net.stem(x).permute(0, 2, 3, 1))  # (2, 8, 8, 24)
    naive = torch.stack([maps[b].reshape(-1, 24).mean(dim=0) for b in range(2)])
    torch.testing.assert_close(Encoder(net, "features")(x), naive)
    learner = Learner(net, image_size=16, hidden_layer="features", normalize=None, **SMALL)
    assert learner.feature_dim == 24
    torch.testing.assert_close(learner.embed(x), naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_maps_as_wide_as_they_are_high_are_told_apart_by_a_larger_probe(layout):
    """(B, 8, 8, 8) says nothing; on images twice as large only the spatial axes grow."""
    net = (ChannelsLastNet(8, stride=1) if layout == "NHWC" else small_cnn(width=8)).eval()
    layer = "features" if layout == "NHWC" else "2"  # small_cnn's first conv block: (B, 8, 8, 8) at 8 px
    x = torch.rand(2, 3, 8, 8)
    learner = Learner(net, image_size=8, hidden_layer=layer, normalize=None, channels_last=False, **SMALL)
    maps = (net.features(net.stem(x).permute(0, 2, 3, 1)) if layout == "NHWC" else net[:3](x)).detach()
    assert maps.shape == (2, 8, 8, 8)
    spatial = (1, 2) if layout == "NHWC" else (2, 3)
    torch.testing.assert_close(learner.embed(x), maps.mean(dim=spatial))


class FixedSizeNet(ChannelsLastNet):
    """Runs on 8x8 images only."""

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("this net takes 8x8 images")
        return super().forward(x)


def test_an_undecidable_layout_is_an_error_that_names_the_fix():
    with pytest.raises(ValueError, match="feature_layout='NCHW' or feature_layout='NHWC'"):
        Learner(FixedSizeNet(8, stride=1), image_size=8, hidden_layer="features", **SMALL)
    net = FixedSizeNet(8, stride=1).eval()
    learner = Learner(net, image_size=8, hidden_layer="features", feature_layout="NHWC", normalize=None, **SMALL)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(learner.embed(x), net.features(net.stem(x).permute(0, 2, 3, 1)).mean(dim=(1, 2)))


def test_swin_features_keep_their_full_width():
    """torchvision's and timm's Swin lay features out (B, H, W, C): the representation has all C channels."""
    torch.manual_seed(0)
    net = models.swin_t(num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    learner = Learner(net, image_size=32, hidden_layer="features", normalize=None, **SMALL)
    assert learner.feature_dim == 768
    torch.testing.assert_close(learner.embed(x), net.features(x).mean(dim=(1, 2)), rtol=1e-4, atol=1e-5)
    timm = pytest.importorskip("timm")
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=7, img_size=56).eval()
    learner = Learner(swin, image_size=56, hidden_layer=lambda n, v: n.forward_features(v), normalize=None, **SMALL)
    assert learner.feature_dim == 768
    with torch.no_grad():
        torch.testing.assert_close(learner.embed(torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))),
                                   swin.forward_features(torch.rand(2, 3, 56, 56, generator=torch.Generator()
                                                                    .manual_seed(0))).mean(dim=(1, 2)),
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the default layer

class DropoutHead(nn.Module):
    """Features, then a dropout that only feeds the classifier (as torchvision's EfficientNet and VGG)."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()[:-1]
        self.drop = nn.Dropout(0.5)
        self.fc = CountingHead(64, 10)

    def forward(self, x):
        return self.fc(self.drop(self.body(x)))


def test_default_layer_is_the_classifier_input_without_its_dropout():
    net = DropoutHead()
    learner = Learner(net, image_size=16, normalize=None, channels_last=False, **SMALL)
    assert learner.hidden_layer == ClassifierInput("fc.fc", ("drop",))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(learner.embed(x), net.body.eval()(x))
        net.train()
        torch.testing.assert_close(learner.encoder(x), net.body(x))  # train mode, yet no dropout: same every time
        torch.testing.assert_close(learner.encoder(x), learner.encoder(x))
    net.fc.calls = 0
    net(x)  # the user's own forward keeps its dropout and its classifier
    assert net.fc.calls == 1
    out = []
    net.drop.register_forward_hook(lambda m, a, o: out.append((a[0], o)))
    net(x)
    assert not torch.equal(out[0][0], out[0][1])  # dropout still drops outside the Learner's passes


class LinearThenNorm(nn.Module):
    """A net whose last Linear is followed by a norm: a projection inside the body, not a classifier."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()[:-1]
        self.proj = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(self.proj(self.body(x)))


def test_nets_without_a_classifier_are_represented_by_their_output():
    for net in (LinearThenNorm().eval(), small_cnn()[:-1].eval()):
        learner = Learner(net, image_size=16, normalize=None, channels_last=False, **SMALL)
        x = torch.rand(2, 3, 16, 16)
        assert learner.hidden_layer == -1
        torch.testing.assert_close(learner.embed(x), net(x))
    resnet = models.resnet18().eval()
    resnet.fc = nn.Identity()  # the common way to drop a classifier
    learner = Learner(resnet, image_size=32, normalize=None, channels_last=False, **SMALL)
    assert learner.hidden_layer == -1 and learner.feature_dim == 512


class NeedsRealTensors(nn.Module):
    """Reads a value on the host, which a meta tensor cannot give."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()[:-1]
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h * (1.0 if h.sum().item() > -1e9 else 0.0))


def test_nets_that_cannot_run_on_meta_tensors_are_probed_on_a_copy():
    net = NeedsRealTensors().eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    learner = Learner(net, image_size=16, normalize=None, channels_last=False, **SMALL)
    assert learner.hidden_layer == ClassifierInput("fc") and learner.feature_dim == 64
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(learner.embed(x), net.body(x))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
