"""The Learner contract: untouched net, parameters, losses, EMA, embeddings, errors, real training."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

import wrapssl
from wrapssl import Learner
from wrapssl.ema import cosine_momentum

from conftest import crop_scales, small_cnn

SMALL = dict(projection_hidden_size=64, projection_size=16)


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}, [m.training for m in net.modules()]


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("method", ["byol", "simsiam"])
def test_construction_leaves_net_bit_identical(train_mode, method):
    net = models.resnet18()
    net.train(train_mode)
    net.layer1.eval()  # mixed modes must survive too
    state, modes = snapshot(net)
    Learner(net, image_size=32, hidden_layer="avgpool", method=method)
    assert [m.training for m in net.modules()] == modes
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_parameters_hold_heads_before_any_forward():
    net = small_cnn()
    learner = Learner(net, image_size=16, hidden_layer=-2, **SMALL)
    trainable = {id(p) for p in learner.parameters() if p.requires_grad}
    expected = {id(p) for p in net.parameters()}
    expected |= {id(p) for p in learner.method.projector.parameters()}
    expected |= {id(p) for p in learner.method.predictor.parameters()}
    assert trainable == expected
    # the target exists already and has no trainable parameter
    assert learner.target_encoder is not None
    assert not any(p.requires_grad for p in learner.target_encoder.parameters())
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    before = net[0].weight.clone()
    learner(torch.rand(4, 3, 16, 16)).backward()
    opt.step()
    assert not torch.equal(before, net[0].weight)


def naive_byol_loss(learner, v1, v2):
    """BYOL's loss recomputed by hand, one sample at a time."""
    m, norm = learner.method, learner.normalize
    both = norm(torch.cat([v1, v2]))  # views of one size share a forward pass (and BN batch)
    z = m.projector(learner.net[:-1](both)).chunk(2)
    p = m.predictor(torch.cat(z)).chunk(2)
    with torch.no_grad():
        t = learner.target_projector(learner.target_encoder.net[:-1](both)).chunk(2)
    total = 0.0
    for i, j in ((0, 1), (1, 0)):
        per = []
        for b in range(v1.shape[0]):
            a, c = p[i][b], t[j][b]
            cos = (a * c).sum() / (a.norm() * c.norm())
            per.append(2 - 2 * cos)
        total = total + sum(per) / len(per)
    return total


def test_byol_loss_matches_naive_computation():
    torch.manual_seed(0)
    x1, x2 = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)
    # deterministic "augmentations" so the naive computation sees the same views
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, augment_fn=lambda x: x1,
                      augment_fn2=lambda x: x2, **SMALL)
    # make the target differ from the online net so the test sees which branch is which
    with torch.no_grad():
        for p in learner.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = learner(x1)
    torch.testing.assert_close(loss, naive_byol_loss(learner, x1, x2), rtol=1e-5, atol=1e-5)


def test_simsiam_loss_matches_naive_and_stops_gradient():
    torch.manual_seed(0)
    x1, x2 = torch.rand(5, 3, 16, 16), torch.rand(5, 3, 16, 16)
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="simsiam",
                      augment_fn=lambda x: x1, augment_fn2=lambda x: x2,
                      projection_size=32, prediction_hidden_size=8)
    assert learner.target_encoder is None
    assert learner.method.projection_size == 32
    m, norm = learner.method, learner.normalize
    z1, z2 = m.projector(learner.net[:-1](norm(torch.cat([x1, x2])))).chunk(2)
    p1, p2 = m.predictor(torch.cat([z1, z2])).chunk(2)
    naive = 0.0
    for b in range(5):
        naive -= 0.5 * (F.cosine_similarity(p1[b], z2[b].detach(), dim=0)
                        + F.cosine_similarity(p2[b], z1[b].detach(), dim=0)) / 5
    loss = learner(x1)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    # the stop-gradient: the loss has no path to z through the target side
    z = torch.randn(4, 32, requires_grad=True)
    m.eval()
    m.loss([z, z], None).backward()
    g_full = z.grad.clone()
    z.grad = None
    p = m.predictor(torch.cat([z, z])).chunk(2)
    (-(F.cosine_similarity(p[0], z.detach()).mean() + F.cosine_similarity(p[1], z.detach()).mean()) / 2).backward()
    torch.testing.assert_close(g_full, z.grad)


def test_ema_update_equals_naive_loop_with_cosine_schedule():
    torch.manual_seed(0)
    net = small_cnn()
    learner = Learner(net, image_size=16, hidden_layer=-2, moving_average_decay=0.9, total_steps=10, **SMALL)
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    online = nn.ModuleList([net, learner.method.projector])
    target = nn.ModuleList([learner.target_encoder.net, learner.target_projector])
    for step in range(4):
        learner(torch.rand(4, 3, 16, 16)).backward()
        opt.step()
        opt.zero_grad()
        expected_t = [t.clone() for t in target.parameters()]
        m = 1 - (1 - 0.9) * (math.cos(math.pi * step / 10) + 1) / 2
        assert learner.current_momentum == pytest.approx(m)
        for i, o in enumerate(online.parameters()):
            expected_t[i] = m * expected_t[i] + (1 - m) * o.detach()
        learner.update_moving_average()
        for got, exp in zip(target.parameters(), expected_t):
            torch.testing.assert_close(got, exp)
        for ob, tb in zip(online.buffers(), target.buffers()):
            assert torch.equal(ob, tb)  # BN statistics kept in sync
    assert learner.step == 4
    assert cosine_momentum(0.9, 10, 10) == 1.0 and cosine_momentum(0.9, 3, None) == 0.9


def test_ema_survives_moving_the_learner():
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, moving_average_decay=0.0, **SMALL)
    learner.to(torch.float64)
    with torch.no_grad():
        for p in learner.net.parameters():
            p.add_(1.0)
    learner.update_moving_average()  # momentum 0: target == online
    for o, t in zip(learner.net.parameters(), learner.target_encoder.net.parameters()):
        assert t.dtype == torch.float64 and torch.equal(o, t)


def test_per_sample_augmentation_differs_within_a_batch():
    torch.manual_seed(0)
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL)
    img = torch.rand(1, 3, 32, 32).expand(8, -1, -1, -1).contiguous()  # eight copies of one image
    crop = learner.views.transforms[0][0]
    out = crop(img)
    diffs = [(out[0] - out[i]).abs().max().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3, "two samples of one batch received the same crop"
    views = learner.views(img)
    assert len(views) == 2 and views[0].shape == (8, 3, 16, 16)


def test_uint8_and_one_channel_inputs_are_accepted():
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL)
    x = torch.randint(0, 256, (4, 1, 20, 24), dtype=torch.uint8)
    assert torch.isfinite(learner(x))
    ref = x.float().div(255).expand(-1, 3, -1, -1)
    torch.testing.assert_close(wrapssl.augment.to_float(x), ref)
    emb_u8 = learner.embed(x)
    emb_f = learner.embed(x.float() / 255)
    torch.testing.assert_close(emb_u8, emb_f)


def test_embed_has_no_grad_and_leaves_bn_statistics():
    net = small_cnn()
    learner = Learner(net, image_size=16, hidden_layer=-2, **SMALL)
    learner.train()
    state, modes = snapshot(net)
    x = torch.rand(4, 3, 16, 16)
    e = learner.embed(x)
    assert e.shape == (4, 64) and not e.requires_grad
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == modes
    with torch.no_grad():
        expected = net.eval()[:-1](learner.normalize(x))
    torch.testing.assert_close(e, expected)


def test_return_embedding_gives_projection_and_embedding_without_augmentation():
    net = small_cnn().eval()
    learner = Learner(net, image_size=16, hidden_layer=-2, **SMALL).eval()
    x = torch.rand(3, 3, 16, 16)
    proj, emb = learner(x, return_embedding=True)
    expected_emb = net[:-1](learner.normalize(x))
    torch.testing.assert_close(emb, expected_emb)
    torch.testing.assert_close(proj, learner.method.projector(expected_emb))
    torch.testing.assert_close(learner(x, return_embedding=True, return_projection=False), expected_emb)


def test_state_dict_round_trip_keeps_step_and_target():
    a = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL)
    a(torch.rand(4, 3, 16, 16)).backward()
    a.update_moving_average()
    a.update_moving_average()
    b = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL)
    b.load_state_dict(a.state_dict())
    assert b.step == 2
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q)


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(1, 3, 16, 16), ValueError, "at least 2 images"),
    (torch.rand(3, 16, 16), ValueError, r"unsqueeze\(0\)"),
    (torch.rand(4, 3, 16, 16).double().mul(300), ValueError, r"\[0,1\]"),
    (torch.full((4, 3, 16, 16), float("nan")), ValueError, "NaN"),
    (torch.ones(4, 3, 16, 16, dtype=torch.int32), TypeError, "uint8 or floating"),
    (torch.rand(4, 4, 16, 16), ValueError, "alpha"),
    ([1, 2, 3], TypeError, "torch.Tensor"),
])
def test_bad_input_is_a_clear_error(bad, error, match):
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL)
    with pytest.raises(error, match=match):
        learner(bad)


def test_net_errors_are_surfaced_with_context():
    net = small_cnn(channels=1)
    with pytest.raises(RuntimeError, match="channels"):
        learner = Learner(net, image_size=16, hidden_layer=-2, channels=3, **SMALL)
        learner(torch.rand(4, 3, 16, 16))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'byl'.*'byol'"):
        Learner(small_cnn(), image_size=16, method="byl")
    with pytest.raises(ValueError, match="image_size"):
        Learner(small_cnn(), image_size=0)
    with pytest.raises(TypeError, match="method 'byol'"):
        Learner(small_cnn(), image_size=16, projection_sise=3)
    with pytest.raises(ValueError, match="moving_average_decay"):
        Learner(small_cnn(), image_size=16, moving_average_decay=1.5)
    with pytest.raises(TypeError, match="channels_last"):
        Learner(small_cnn(), image_size=16, channels_last="yes")


def test_crop_scale_sets_the_global_crops_of_the_default_views():
    plain = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL)
    assert crop_scales(plain.views) == [[(0.08, 1.0)]] * 2
    byol = Learner(small_cnn(), image_size=16, hidden_layer=-2, crop_scale=(0.3, 1.0), **SMALL)
    assert crop_scales(byol.views) == [[(0.3, 1.0)]] * 2
    dino = Learner(small_cnn(), image_size=16, hidden_layer=-2, method="dino", crop_scale=(0.25, 0.9),
                   out_dim=32, hidden_size=32, bottleneck_size=16, n_local=2)
    assert crop_scales(dino.views) == [[(0.25, 0.9)]] * 2 + [[(0.05, 0.4)]] * 2  # local crops keep theirs
    with pytest.raises(ValueError, match="0 < min <= max <= 1"):
        Learner(small_cnn(), image_size=16, crop_scale=(0.3, 2.0))
    with pytest.raises(ValueError, match="own views or augment_fn"):
        Learner(small_cnn(), image_size=16, views=wrapssl.byol_views(16), crop_scale=(0.3, 1.0))


def test_embed_gives_the_numbers_of_an_embedder_and_health_reads_either():
    from wrapssl.backbone import Embedder
    from wrapssl.health import embedding_health, health

    net = small_cnn()
    learner = Learner(net, image_size=16, hidden_layer=-2, **SMALL).train()
    x = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)  # another size: resized to 16 first
    twin = copy.deepcopy(net)
    with Embedder(twin, hidden_layer=-2, image_size=16, resize=True) as embedder:
        torch.testing.assert_close(learner.embed(x), embedder.embed(x))
        # naive: resize, ImageNet normalisation, the net up to its pool, in eval mode
        small = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            expected = copy.deepcopy(net).eval()[:-1](learner.normalize(small))
        torch.testing.assert_close(embedder.embed(x), expected)
        for got in (embedding_health(learner, x, batch_size=4), embedding_health(embedder, x, batch_size=4)):
            assert (got.rank, got.std, got.dim) == pytest.approx((health(expected).rank, health(expected).std, 64))
    assert learner.training and all(m.training for m in net.modules())


def test_user_method_instance():
    class Cosine(wrapssl.Method):
        uses_target = False

        def build(self, dim):
            self.projector = nn.Linear(dim, 8)

        def default_views(self, image_size, channels=3):
            return wrapssl.simclr_views(image_size, channels=channels)

        def loss(self, online, target, step=0):
            return -F.cosine_similarity(online[0], online[1]).mean()

    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, method=Cosine())
    loss = learner(torch.rand(4, 3, 16, 16))
    loss.backward()
    assert learner.method.projector.weight.grad is not None


def test_one_channel_net_gets_grey_normalisation():
    learner = Learner(small_cnn(channels=1), image_size=16, hidden_layer=-2, channels=1, **SMALL)
    x = torch.rand(4, 1, 16, 16)
    mean, std = sum(wrapssl.augment.IMAGENET_MEAN) / 3, sum(wrapssl.augment.IMAGENET_STD) / 3
    torch.testing.assert_close(learner.normalize(x), (x - mean) / std)
    assert torch.isfinite(learner(x))


def test_kornia_pipelines_work_as_augment_fn():
    import kornia

    augment_fn = nn.Sequential(kornia.augmentation.RandomHorizontalFlip())
    augment_fn2 = nn.Sequential(kornia.augmentation.RandomHorizontalFlip(),
                                kornia.filters.GaussianBlur2d((3, 3), (1.5, 1.5)))
    learner = Learner(small_cnn(), image_size=16, augment_fn=augment_fn, augment_fn2=augment_fn2, **SMALL)
    x = torch.rand(4, 3, 16, 16)
    views = learner.views(x)
    blurred = kornia.filters.GaussianBlur2d((3, 3), (1.5, 1.5))(x)
    # each view is the input or its mirror image (flip is per sample), blurred for the second view
    for v, ref in ((views[0], x), (views[1], blurred)):
        for b in range(4):
            assert torch.allclose(v[b], ref[b]) or torch.allclose(v[b], ref[b].flip(-1))
    learner(x).backward()


def counting_backend(graphs: list):
    """A torch.compile backend that records each graph it is given and runs it as traced."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_compile_traces_the_encoders_and_changes_nothing_else():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = small_cnn()
    x = torch.rand(6, 3, 16, 16)
    fixed = dict(augment_fn=lambda v: v.flip(-1), augment_fn2=lambda v: v, **SMALL)
    torch.manual_seed(1)
    plain = Learner(copy.deepcopy(net), image_size=16, hidden_layer=-2, **fixed)
    graphs: list = []
    torch.manual_seed(1)
    compiled = Learner(net, image_size=16, hidden_layer=-2, compile={"backend": counting_backend(graphs)}, **fixed)
    # the user's net is not compiled, only our wrappers; checkpoints keep the plain keys
    assert net._compiled_call_impl is None and compiled.encoder._compiled_call_impl is not None
    assert compiled.target_encoder._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(plain.state_dict())
    loss_c, loss_p = compiled(x), plain(x)
    assert len(graphs) >= 2  # the online (with grad) and the target (no grad) forwards were traced
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-6)
    loss_c.backward()
    loss_p.backward()
    for (name, a), b in zip(compiled.net.named_parameters(), plain.net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(TypeError, match="dict of torch.compile options"):
        Learner(small_cnn(), image_size=16, compile="yes")
    torch._dynamo.reset()


def test_views_are_made_in_float32_under_mixed_precision():
    """Autocast (Trainer's mixed_precision) must not reach the augmentation: bf16 crops and blurs lose detail."""
    torch.manual_seed(0)
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL)
    made = []
    views_forward = learner.views.forward

    def recording(x):
        out = views_forward(x)
        made.extend(v.dtype for v in out)
        return out

    learner.views.forward = recording
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = learner(torch.rand(32, 3, 16, 16))
    assert made == [torch.float32, torch.float32]
    assert torch.isfinite(loss.float())


def test_views_of_one_size_share_a_pass_and_the_target_sees_only_global_views():
    """Three same-sized views, two of them global: one online pass over all three, one target pass over two."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    made = [x.flip(-1), x.flip(-2), x.transpose(-1, -2)]
    views = wrapssl.Views([lambda v, i=i: made[i] for i in range(3)], n_global=2)
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, views=views, normalize=None, **SMALL)
    seen = {}
    learner.method.forward = lambda online, target, step=0: seen.update(online=online, target=target)
    learner(x)
    with torch.no_grad():
        online = learner.method.projector(learner.encoder(torch.cat(made))).chunk(3)
        target = learner.target_projector(learner.target_encoder(torch.cat(made[:2]))).chunk(2)
    assert len(seen["online"]) == 3 and len(seen["target"]) == 2
    for got, want in zip([*seen["online"], *seen["target"]], [*online, *target]):
        # the learner feeds channels_last images, the reference contiguous ones: the convolutions round differently
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_grey_images_are_augmented_at_one_channel_with_the_same_result():
    """Grey input to a 3-channel net: the recipe runs on one channel and is repeated after, as if run on three."""
    grey = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def run(images, **kw):
        torch.manual_seed(0)
        learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, **SMALL, **kw)
        inputs = []
        learner.encoder.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        views_forward = learner.views.forward

        def recording(x):  # the channel count the recipe was run at, per run
            seen[len(seen)] = x.shape[1]
            return views_forward(x)

        learner.views.forward = recording
        torch.manual_seed(1)
        loss = learner(images)
        return loss, inputs[0]

    fast_loss, fast_in = run(grey)
    slow_loss, slow_in = run(grey.expand(-1, 3, -1, -1).contiguous())
    assert seen == {0: 1, 1: 3}  # the grey batch went through the recipe at one channel
    # equal up to torchvision's luma weights, which sum to 0.9999: contrast and saturation on a repeated grey
    # image blend towards 0.9999 x the grey value (1e-4 of the pixel range, 5e-4 after normalisation)
    torch.testing.assert_close(fast_in, slow_in, atol=1e-3, rtol=0)
    torch.testing.assert_close(fast_loss, slow_loss, atol=1e-3, rtol=1e-3)
    # a recipe with a callable of the user's may expect three channels: it gets them
    run(grey, augment_fn=lambda x: x.flip(-1))
    assert seen[2] == 3


class _BrokenRecipe(wrapssl.methods.BYOLMethod):
    def default_views(self, image_size, channels=3):
        raise RuntimeError("recipe failed")


def test_a_failed_constructor_leaves_the_net_unhooked():
    net = small_cnn()
    for bad in (dict(crop_scale=(0.5, 2.0)), dict(method=_BrokenRecipe())):
        with pytest.raises((ValueError, RuntimeError)):
            Learner(net, image_size=16, hidden_layer=-2, **bad)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()), bad


def _first_conv_inputs(learner):
    """Records the images the net's first layer receives (the online net's; the target is a copy made before)."""
    seen = []
    learner.net[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    return seen


def _one_step(images, **kw):
    """Loss, gradients and BN statistics after one BYOL step from fixed seeds; the first layer's inputs."""
    torch.manual_seed(0)
    net = small_cnn()
    learner = Learner(net, image_size=16, hidden_layer=-2, **SMALL, **kw)
    seen = _first_conv_inputs(learner)
    torch.manual_seed(1)
    loss = learner(images)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]  # the unused fc has none
    return learner, loss.detach(), grads, copy.deepcopy(net.state_dict()), seen


def test_conv_nets_get_channels_last_images_on_the_cpu_with_the_same_results():
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    fast, fast_loss, fast_grads, fast_state, fast_in = _one_step(images)
    slow, slow_loss, slow_grads, slow_state, slow_in = _one_step(images, channels_last=False)
    # default on a conv net on the CPU: channels_last (and not merely contiguous, as a 1x1 map would be)
    assert len(fast_in) == 2 and fast_in[0].shape[0] == 2  # a 2-image probe (no grad, eval), the online pass
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in fast_in)
    assert slow_in and all(x.is_contiguous() for x in slow_in)
    torch.testing.assert_close(fast_in[-1], slow_in[-1], rtol=0, atol=0)  # the same views, laid out differently
    torch.testing.assert_close(fast_loss, slow_loss, rtol=1e-4, atol=1e-5)
    assert len(fast_grads) == len(slow_grads) > 0
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    for k in fast_state:
        torch.testing.assert_close(fast_state[k], slow_state[k], rtol=1e-4, atol=1e-5)
    # embeddings go the same way
    fast_in.clear()
    torch.testing.assert_close(fast.embed(images), slow.embed(images), rtol=1e-4, atol=1e-5)
    assert fast_in[0].is_contiguous(memory_format=torch.channels_last) and not fast_in[0].is_contiguous()


class _ViewsFeatureMaps(nn.Module):
    """A net that flattens its feature map with .view, which channels_last images break."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8 * 16 * 16, 32)

    def forward(self, x):
        h = self.features(x)
        return self.head(h.view(h.shape[0], -1))


def test_a_net_that_cannot_take_channels_last_falls_back_without_side_effects():
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError):  # the premise: this net fails on channels_last input
        _ViewsFeatureMaps()(images.contiguous(memory_format=torch.channels_last))

    def step(**kw):
        torch.manual_seed(0)
        net = _ViewsFeatureMaps()
        learner = Learner(net, image_size=16, hidden_layer=-1, **SMALL, **kw)
        inputs = []
        net.features.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        torch.manual_seed(1)
        loss = learner(images)
        loss.backward()
        return learner, loss.detach(), net.state_dict(), inputs

    auto, auto_loss, auto_state, auto_in = step()
    off, off_loss, off_state, off_in = step(channels_last=False)
    assert len(auto_in) == 2 and auto_in[0].shape[0] == 2  # the failed probe, then the online pass
    assert all(x.is_contiguous() for x in auto_in[1:])
    # the probe ran in eval mode without gradients: the step is exactly the contiguous one, BN statistics included
    assert torch.equal(auto_loss, off_loss)
    for k in auto_state:
        assert torch.equal(auto_state[k], off_state[k]), k
    with pytest.raises(RuntimeError, match="channels_last=False"):
        Learner(_ViewsFeatureMaps(), image_size=16, hidden_layer=-1, channels_last=True, **SMALL)(images)


def test_nets_without_convolutions_keep_contiguous_images_unless_asked():
    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))

    images = torch.rand(8, 3, 16, 16)
    for kw, channels_last in [({}, False), ({"channels_last": True}, True)]:
        net = mlp()
        learner = Learner(net, image_size=16, hidden_layer=-2, **SMALL, **kw)
        seen = _first_conv_inputs(learner)
        learner(images).backward()
        assert seen and all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                            if channels_last else x.is_contiguous() for x in seen)


def test_raw_views_are_freed_before_the_net_runs():
    """Only the normalised, batched views live while the net runs: the recipe's outputs are gone."""
    import weakref
    refs = []

    def make(x):
        v = x.flip(-1).clone()
        refs.append(weakref.ref(v))
        return v

    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, views=wrapssl.Views([make, make]), **SMALL)
    alive = []

    def record(module, args):
        if args[0].shape[0] > 2:  # not the one-off 2-image channels_last probe
            alive.append([r() is not None for r in refs])

    for net in (learner.net, learner.target_encoder.net):
        net[0].register_forward_pre_hook(record)
    learner(torch.rand(8, 3, 16, 16)).backward()
    assert len(refs) == 2 and len(alive) == 2  # the target pass, then the online pass
    assert alive == [[False, False], [False, False]]


# ----------------------------------------------------------------------------- channels

@pytest.mark.parametrize("channels", [1, 2, 4, 13])
def test_the_channel_count_is_read_from_the_net_and_any_count_trains(channels):
    torch.manual_seed(0)
    stats = None if channels in (1, 3) else ((0.5,) * channels, (0.25,) * channels)
    kwargs = {} if stats is None else {"normalize": stats}
    learner = Learner(small_cnn(channels=channels), image_size=16, **kwargs, **SMALL)
    assert learner.channels == channels
    x = torch.rand(4, channels, 20, 20)
    loss = learner(x)
    loss.backward()
    assert torch.isfinite(loss) and learner.net[0].weight.grad is not None
    x = x[..., :16, :16]  # the net's own size: embed does not resize it
    emb = learner.embed(x)
    mean, std = (0.449, 0.226) if stats is None else (0.5, 0.25)  # grey: ImageNet's statistics averaged
    with torch.no_grad():
        expected = learner.net.eval()[:-1]((x - mean) / std)
    torch.testing.assert_close(emb, expected, rtol=1e-4, atol=1e-4)


def test_multispectral_nets_need_their_own_statistics():
    with pytest.raises(ValueError, match="estimate_normalization"):
        Learner(small_cnn(channels=4), image_size=16, **SMALL)
    learner = Learner(small_cnn(channels=4), image_size=16, channels=4, normalize=None, **SMALL)
    with pytest.raises(ValueError, match="4"):
        learner(torch.rand(4, 3, 16, 16))  # RGB images for a 4-band net


# ----------------------------------------------------------------------------- errors of the net

class PicksyNet(nn.Module):
    """Fails on more than 2 images (the Learner's probes use 2), with an exception that is not a RuntimeError."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()

    def forward(self, x):
        if x.shape[0] > 2:
            raise KeyError("no more than two images")
        return self.body(x)


def test_any_exception_of_the_net_gets_context_and_keeps_its_type():
    learner = Learner(PicksyNet(), image_size=16, hidden_layer=-1, **SMALL)
    with pytest.raises(KeyError, match=r"PicksyNet failed on views of shape \(8, 3, 16, 16\).*image_size") as info:
        learner(torch.rand(4, 3, 16, 16))
    assert isinstance(info.value.__cause__, KeyError) and "two images" in str(info.value.__cause__)
    with pytest.raises(KeyError, match="PicksyNet failed"):
        learner.embed(torch.rand(3, 3, 16, 16))


def test_timm_size_assertions_name_dynamic_img_size():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3)
    with pytest.raises(AssertionError, match="dynamic_img_size=True") as info:
        Learner(vit, image_size=32, **SMALL)
    assert isinstance(info.value.__cause__, AssertionError)
    learner = Learner(timm.create_model("vit_tiny_patch16_224", num_classes=3, dynamic_img_size=True), image_size=32,
                      **SMALL)
    assert learner.embed(torch.rand(2, 3, 32, 32)).shape == (2, 192)


def test_levit_with_a_cache_from_eval_mode_wraps_and_never_serves_stale_biases():
    """timm's LeViT caches its attention biases (a tensor with a grad_fn) after an eval forward with gradients on."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("levit_128s", num_classes=3).eval()
    x = torch.rand(2, 3, 224, 224)
    net(x)
    cached = [t for m in net.modules() for t in getattr(m, "attention_bias_cache", {}).values()]
    assert cached and cached[0].grad_fn is not None  # the premise: plain deepcopy fails on this net now
    learner = Learner(net.train(), image_size=224, **SMALL)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    learner.embed(x)  # an eval-mode pass in between fills the cache
    learner(torch.rand(2, 3, 224, 224)).backward()
    opt.step()
    got = learner.embed(x)
    net.train()  # LeViT drops its cache in train(True): the reference computes fresh biases
    net.eval()
    with torch.no_grad():
        expected = net.forward_head(net.forward_features(learner.normalize(x)), pre_logits=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- float input

def test_float_input_unit_standardized_and_auto():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    net = small_cnn()
    unit = Learner(net, image_size=16, hidden_layer=-2, **SMALL)
    with pytest.raises(ValueError, match="float_input='standardized'"):
        unit(torch.randn(4, 3, 16, 16))
    standardized = Learner(net, image_size=16, hidden_layer=-2, float_input="standardized", **SMALL)
    auto = Learner(net, image_size=16, hidden_layer=-2, float_input="auto", **SMALL)
    z = unit.normalize(x)
    torch.testing.assert_close(standardized.embed(z), unit.embed(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(auto.embed(z), unit.embed(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(auto.embed(x), unit.embed(x))  # inside [0, 1]: plain images
    assert not torch.allclose(standardized.embed(x), unit.embed(x))  # read as standardised
    assert torch.isfinite(standardized(torch.randn(4, 3, 16, 16)))
    with pytest.raises(ValueError, match="float_input must be one of"):
        Learner(net, image_size=16, hidden_layer=-2, float_input="zscore", **SMALL)
