"""The default hidden layer is the net's own pre-logits, for every torchvision classifier and many timm families.

The reference is computed independently of wrapssl: for torchvision, the input of the net's last
registered Linear or Conv2d, taken by a hook during the net's full forward; for timm, the net's
own ``forward_head(forward_features(x), pre_logits=True)`` and, again, the input of its classifier.

Values are compared on one small net of each family (FAST, TIMM_FAST). Every other net is built
on the meta device (no memory, no initialisation: vit_h_14 and regnet_y_128gf cost a fraction of a
second): there the Learner must find the same layer as the reference (torchvision: the name of the
last registered classifier) and give the same width (timm: the width of timm's own pre-logits,
without running a classifier).
"""
from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from torchvision import models

from wrapssl import Learner
from wrapssl.prelogits import classifier_prefix

from test_archs import one_thread  # noqa: F401  (autouse: one intra-op thread for these small forwards)

# contiguous images, as the reference gets: channels_last would change the rounding (tested in test_learner.py)
TINY = dict(method="simsiam", projection_size=8, prediction_hidden_size=8, normalize=None, channels_last=False)

# the side each family needs at least (default 32); maxvit's 7x7 windows need 224
SIZES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, "squeezenet1_0": 64, "squeezenet1_1": 64,
         "vit_h_14": 28}
FAST = ["resnet18", "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
        "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x0_5",
        "squeezenet1_1", "swin_t", "vit_b_32", "vgg11_bn"]
ALL = models.list_models(module=models)


def last_classifier(net: nn.Module) -> nn.Module:
    """The net's last registered Linear or Conv2d: torchvision's classifiers are registered last."""
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def classifier_input(net: nn.Module, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``classifier`` receives during the net's own full forward in eval mode, pooled over space."""
    seen = []
    handle = classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        handle.remove()
    h = seen[0]
    return h.mean(dim=(2, 3)) if h.ndim == 4 else h.flatten(1)


def calls_of(module: nn.Module) -> list:
    """A list that grows by one at each forward of ``module``."""
    calls: list = []
    module.register_forward_hook(lambda m, args, out: calls.append(1))
    return calls


def calibrate(net: nn.Module, size: int) -> nn.Module:
    """Batch-norm statistics of one batch of random images, so a randomly initialised net's eval-mode features
    keep their scale (with the initial statistics some nets' features shrink to 1e-15, where any layer matches)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        net.train()(torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(2)))
    for m in norms:
        m.momentum = 0.1
    return net.eval()


def on_meta(build) -> nn.Module:
    """``build()`` with its parameters and buffers on the meta device: no memory, no initialisation."""
    with init_empty_weights(include_buffers=False):  # parameters; shapes computed with tensors at build still work
        net = build()
    return net.to("meta").eval()


def torchvision_kwargs(name: str) -> tuple[dict, int]:
    """get_model's arguments for a 7-class net, and a small image side it runs at."""
    size = SIZES.get(name, 32)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    if name in ("googlenet", "inception_v3"):  # the auxiliary classifier of inception_v3 needs 299 px in train mode
        kwargs.update(init_weights=True, aux_logits=name == "googlenet")
    return dict(weights=None, num_classes=7, **kwargs), size


def torchvision_net(name: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision classifier (batch norm calibrated) and a small image side it runs at."""
    kwargs, size = torchvision_kwargs(name)
    torch.manual_seed(0)
    return calibrate(models.get_model(name, **kwargs), size), size


def check_torchvision(name: str) -> None:
    """learner.embed equals the input of the final classifier, which the Learner never runs."""
    net, size = torchvision_net(name)
    classifier = last_classifier(net)
    learner = Learner(net, image_size=size, **TINY)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    calls = calls_of(classifier)
    got = learner.embed(x)
    assert not calls, "the classifier ran"
    expected = classifier_input(net, classifier, x)
    width = classifier.in_features if isinstance(classifier, nn.Linear) else classifier.in_channels
    assert got.shape == expected.shape == (2, width) and learner.feature_dim == width
    assert expected.abs().max() > 1e-3  # features of a size where a wrong layer cannot pass by being ~0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", FAST)
def test_torchvision_default_layer_is_the_classifier_input(name):
    check_torchvision(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in FAST])
def test_every_other_torchvision_classifier_on_the_meta_device(name):
    """The same layer and width as the reference, without building a single weight."""
    kwargs, size = torchvision_kwargs(name)
    net = on_meta(lambda: models.get_model(name, **kwargs))
    classifier = last_classifier(net)
    name_of = {m: n for n, m in net.named_modules()}
    learner = Learner(net, image_size=size, **TINY)
    width = classifier.in_features if isinstance(classifier, nn.Linear) else classifier.in_channels
    assert learner.hidden_layer.classifier == name_of[classifier]
    assert learner.feature_dim == width  # the Learner's own forward to the layer, on the meta device


# ----------------------------------------------------------------------------- timm

# (model, image side, extra create_model arguments): a broad sample of timm's families, smallest variants
TIMM = [
    ("resnet18", 32, {}), ("resnetv2_50", 32, {}), ("seresnext26d_32x4d", 32, {}), ("regnety_002", 32, {}),
    ("densenet121", 32, {}), ("vgg11", 32, {}), ("convnext_atto", 32, {}), ("convnextv2_atto", 32, {}),
    ("efficientnet_b0", 32, {}), ("efficientnetv2_rw_t", 32, {}), ("mobilenetv2_050", 32, {}),
    ("mobilenetv3_small_050", 32, {}), ("mobilenetv4_conv_small", 32, {}), ("ghostnet_050", 32, {}),
    ("ghostnetv2_100", 64, {}), ("rexnet_100", 32, {}), ("lcnet_050", 32, {}), ("mixnet_s", 32, {}),
    ("dla34", 32, {}), ("dpn68", 32, {}), ("cspresnet50", 32, {}), ("hrnet_w18_small", 32, {}),
    ("nf_resnet26", 32, {}), ("xception41", 32, {}), ("res2net50_14w_8s", 32, {}), ("selecsls42b", 32, {}),
    ("tresnet_m", 32, {}), ("inception_v3", 75, {}), ("hgnetv2_b0", 32, {}), ("repghostnet_050", 32, {}),
    ("fasternet_t0", 32, {}), ("starnet_s1", 32, {}), ("repvit_m1", 32, {}), ("fastvit_t8", 32, {}),
    ("mobilevit_xxs", 32, {}), ("mobilevitv2_050", 32, {}), ("edgenext_xx_small", 32, {}),
    ("efficientvit_b0", 32, {}), ("efficientvit_m0", 32, {}), ("shvit_s1", 32, {}), ("tiny_vit_5m_224", 32, {}),
    ("poolformer_s12", 32, {}), ("caformer_s18", 32, {}), ("inception_next_tiny", 32, {}), ("rdnet_tiny", 32, {}),
    ("mambaout_femto", 32, {}), ("sequencer2d_s", 32, {}), ("focalnet_tiny_srf", 32, {}), ("davit_tiny", 32, {}),
    ("pvt_v2_b0", 32, {}), ("twins_svt_small", 32, {}), ("xcit_nano_12_p16_224", 32, {}),
    ("crossvit_tiny_240", 32, {}),
    ("vit_tiny_patch16_224", 32, {"img_size": 32}), ("deit_tiny_distilled_patch16_224", 32, {"img_size": 32}),
    ("eva02_tiny_patch14_224", 28, {"img_size": 28}), ("beit_base_patch16_224", 32, {"img_size": 32}),
    ("convit_tiny", 32, {"img_size": 32}), ("cait_xxs24_224", 32, {"img_size": 32}),
    ("mixer_s32_224", 64, {"img_size": 64}), ("resmlp_12_224", 32, {"img_size": 32}),
    ("gmlp_ti16_224", 32, {"img_size": 32}), ("swin_tiny_patch4_window7_224", 56, {"img_size": 56}),
    ("swinv2_cr_tiny_ns_224", 64, {"img_size": 64}), ("maxvit_tiny_rw_224", 64, {"img_size": 64}),
    ("coatnet_0_rw_224", 64, {"img_size": 64}), ("hiera_tiny_224", 64, {"img_size": 64}),
    ("pit_ti_224", 64, {"img_size": 64}), ("nest_tiny", 64, {"img_size": 64}), ("volo_d1_224", 64, {"img_size": 64}),
    ("coat_lite_tiny", 64, {"img_size": 64}), ("levit_128s", 224, {}), ("levit_conv_128s", 224, {}),
    ("efficientformer_l1", 224, {}), ("efficientformerv2_s0", 224, {}), ("gcvit_xxtiny", 224, {}),
    ("vitamin_small_224", 224, {}),
]
# timm cannot build swinv2_cr on the meta device (it reads a weight at build) nor run vitamin there (it makes a
# CPU tensor in its forward): their values are compared instead
TIMM_FAST = ["swinv2_cr_tiny_ns_224", "vitamin_small_224", "resnet18", "convnext_atto", "mobilenetv3_small_050",
             "efficientnet_b0", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
             "swin_tiny_patch4_window7_224", "levit_128s", "mambaout_femto"]


# timm's pre-logits come before a norm of the head (NormLinear), before an MLP head (MetaFormer's), or average
# two heads (distilled nets, CrossViT)
NOT_THE_LINEARS_INPUT = ("efficientvit_m0", "shvit_s1", "repvit_m1", "levit_128s", "levit_conv_128s",
                         "caformer_s18", "deit_tiny_distilled_patch16_224", "crossvit_tiny_240")


def check_timm(name: str, size: int, kwargs: dict) -> None:
    """learner.embed equals timm's own pre-logits, which mostly equal the input of the net's final Linear."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = calibrate(timm.create_model(name, pretrained=False, num_classes=7, **kwargs), size)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    heads = [m for m in net.modules()  # Linear classifiers, or 1x1 convolutions (DLA, DPN, ResNetV2)
             if isinstance(m, nn.Linear) and m.out_features == 7 or isinstance(m, nn.Conv2d) and m.out_channels == 7]
    with torch.no_grad():
        own = net.forward_head(net.forward_features(x), pre_logits=True)
    learner = Learner(net, image_size=size, **TINY)
    calls = [calls_of(head) for head in heads]
    got = learner.embed(x)
    assert heads and not any(calls), "a classifier ran"
    assert own.ndim == 2 and got.shape == own.shape and learner.feature_dim == own.shape[1]
    assert own.abs().max() > 1e-3
    torch.testing.assert_close(got, own, rtol=1e-4, atol=1e-5 * own.abs().max().item())
    if name not in NOT_THE_LINEARS_INPUT:
        torch.testing.assert_close(classifier_input(net, heads[-1], x), own, rtol=1e-4,
                                   atol=1e-5 * own.abs().max().item())


@pytest.mark.parametrize("name,size,kwargs", [t for t in TIMM if t[0] in TIMM_FAST], ids=lambda v: str(v))
def test_timm_default_layer_is_timms_pre_logits(name, size, kwargs):
    check_timm(name, size, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name,size,kwargs", [t for t in TIMM if t[0] not in TIMM_FAST], ids=lambda v: str(v))
def test_timm_families_on_the_meta_device(name, size, kwargs):
    """The width of timm's own pre-logits, and no classifier runs, without building a single weight."""
    timm = pytest.importorskip("timm")
    net = on_meta(lambda: timm.create_model(name, pretrained=False, num_classes=7, **kwargs))
    heads = [m for m in net.modules()
             if isinstance(m, nn.Linear) and m.out_features == 7 or isinstance(m, nn.Conv2d) and m.out_channels == 7]
    with torch.no_grad():
        own = net.forward_head(net.forward_features(torch.zeros(2, 3, size, size, device="meta")), pre_logits=True)
    calls = [calls_of(head) for head in heads]
    learner = Learner(net, image_size=size, **TINY)  # finds its width with a forward on the meta device
    assert heads and not any(calls), "a classifier ran"
    assert own.ndim == 2 and learner.feature_dim == own.shape[1]


# ----------------------------------------------------------------------------- the classifier to skip

@pytest.mark.parametrize("name", FAST)
def test_classifier_prefix_names_the_torchvision_classifier(name):
    kwargs, size = torchvision_kwargs(name)
    net = on_meta(lambda: models.get_model(name, **kwargs))
    name_of = {m: n for n, m in net.named_modules()}
    assert classifier_prefix(net, 3, size) == name_of[last_classifier(net)] + "."


@pytest.mark.parametrize("name,size,kwargs", [t for t in TIMM if t[0] in ("resnet18", "vit_tiny_patch16_224",
                                                                          "convnext_atto")], ids=lambda v: str(v))
def test_classifier_prefix_names_the_timm_classifier(name, size, kwargs):
    timm = pytest.importorskip("timm")
    net = on_meta(lambda: timm.create_model(name, pretrained=False, num_classes=7, **kwargs))
    heads = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == 7]
    assert classifier_prefix(net, 3, size) == heads[-1] + "."


def test_classifier_prefix_lets_weights_for_other_classes_load(tmp_path):
    from wrapssl.archs import load_weights

    torch.manual_seed(0)
    saved = models.resnet18(num_classes=1000)
    net = models.resnet18(num_classes=7)
    prefix = classifier_prefix(net, 3, 32)
    load_weights(net, saved.state_dict(), ignore=[prefix])
    assert torch.equal(net.layer4[1].conv2.weight, saved.layer4[1].conv2.weight) and net.fc.out_features == 7


def test_a_net_without_a_classifier_has_no_prefix():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert classifier_prefix(net, 3, 16) is None
    net.append(nn.Linear(4, 3)).append(nn.LayerNorm(3))  # a norm after the Linear: the Linear is the body's
    assert classifier_prefix(net, 3, 16) is None
