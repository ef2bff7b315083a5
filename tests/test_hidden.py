"""Hidden-layer capture: names, indices, callables, pooling, early exit, closing."""
import pytest
import torch
from torch import nn
from torchvision import models

from wrapssl import Learner
from wrapssl.hidden import Encoder, pool

from conftest import small_cnn


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
    with Learner(net, image_size=16, hidden_layer=-2, projection_hidden_size=32, projection_size=8) as learner:
        torch.testing.assert_close(net(x), expected)  # user's own forward is not intercepted
        learner.train()
        learner(torch.rand(4, 3, 16, 16))
        assert learner.encoder._captured is None and learner.target_encoder._captured is None
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
