"""Per-sample augmentation ops against torchvision applied one image at a time with the same parameters."""
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from kornia import augmentation as K
from torch import nn

from wrapssl import augment as A
from wrapssl.augment import kernels
from wrapssl.methods import get_method

from conftest import crop_scales

TOL = dict(atol=1e-5, rtol=0)
ADJUST = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def images(n=32, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.5  # a grey image: hue and saturation must leave it alone
    x[1, :, :5] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # saturated primaries and ties between channels
    x[1, :, 5:10] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)
    return x


def run(op, x):
    """The op's output and the parameters it drew, read the kornia way (``op._params``)."""
    out = op(x)
    return out, op._params


def chosen(params):
    """The samples the op's p gate chose."""
    return params["batch_prob"] > 0.5


def naive_jitter(x, params):
    factors = torch.stack([params[k] for k in A.ColorJitter.factors], dim=1)
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        if chosen(params)[i]:
            for op in params["order"][i].tolist():
                img = ADJUST[op](img, factors[i, op].item())
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("channels", [3, 1])  # grey: torchvision's saturation and hue leave it alone
@pytest.mark.parametrize("strength,p", [((0.4, 0.4, 0.2, 0.1), 0.8), ((0.8, 0.8, 0.8, 0.2), 1.0),
                                        ((0.0, 0.9, 0.0, 0.5), 0.5)])
def test_color_jitter_matches_torchvision_per_sample_in_each_samples_order(strength, p, channels):
    torch.manual_seed(1)
    x = images(64)[:, :channels]
    out, params = run(A.ColorJitter(*strength, p=p), x)
    torch.testing.assert_close(out, naive_jitter(x, params), **TOL)


def test_color_jitter_draws_its_own_factors_and_order_per_sample():
    torch.manual_seed(0)
    _, params = run(A.ColorJitter(p=1.0), images(64))
    assert len({tuple(o) for o in params["order"].tolist()}) > 10  # many of the 24 orders occur
    factors = torch.stack([params[k] for k in A.ColorJitter.factors], dim=1)
    assert factors.std(dim=0).min() > 0.01
    lo, hi = factors.min(0).values, factors.max(0).values
    assert torch.all(lo >= torch.tensor([0.6, 0.6, 0.8, -0.1])) and torch.all(hi <= torch.tensor([1.4, 1.4, 1.2, 0.1]))


@pytest.mark.parametrize("shift", [-0.5, -0.37, -0.1, 0.0, 0.05, 0.25, 0.5])
def test_hue_rotation_matches_torchvision_adjust_hue(shift):
    x = images(8)
    out = kernels.shift_hue(x, torch.full((8,), shift))
    ref = torch.stack([TF.adjust_hue(img, shift) for img in x])
    torch.testing.assert_close(out, ref, **TOL)


def test_crop_matches_torchvision_resized_crop_and_flip_per_sample():
    torch.manual_seed(2)
    x = images(48, size=24)
    out, params = run(A.RandomResizedCrop(24, flip_p=0.5), x)
    for i in range(x.shape[0]):
        box = [int(params[k][i]) for k in ("top", "left", "height", "width")]
        ref = TF.resized_crop(x[i], *box, size=[24, 24], antialias=True)  # crops never exceed 24: upsampling only
        if params["flip"][i]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(out[i], ref, **TOL)
    assert 0 < params["flip"].float().mean() < 1


def test_crop_larger_than_output_is_bilinear_without_antialias():
    torch.manual_seed(3)
    x = images(16, size=40)
    out, params = run(A.RandomResizedCrop((16, 12), scale=(0.5, 1.0)), x)
    for i in range(x.shape[0]):
        t, l, h, w = (int(params[k][i]) for k in ("top", "left", "height", "width"))
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(16, 12), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i], ref[0], **TOL)


def test_crop_boxes_follow_torchvisions_rule_and_differ_per_sample():
    torch.manual_seed(4)
    x = torch.zeros(512, 1, 30, 40)
    _, params = run(A.RandomResizedCrop(16, scale=(0.2, 0.9)), x)
    t, l, h, w = (params[k] for k in ("top", "left", "height", "width"))
    assert torch.all((t >= 0) & (l >= 0) & (h >= 1) & (w >= 1) & (t + h <= 30) & (l + w <= 40))
    assert torch.all(t == t.floor()) and torch.all(h == h.round())
    area = h * w / (30 * 40)
    assert area.min() > 0.18 and area.max() < 0.92  # the rounding of w and h moves the area a little
    assert len(set(zip(t.tolist(), l.tolist(), h.tolist(), w.tolist()))) > 400
    aspect = w / h
    assert aspect.min() > 0.7 and aspect.max() < 1.4


def test_crop_falls_back_to_a_centred_crop_when_no_try_fits():
    x = torch.zeros(64, 3, 10, 40)  # aspect 4, far outside (3/4, 4/3); scale 1 never fits
    _, params = run(A.RandomResizedCrop(8, scale=(1.0, 1.0)), x)
    # torchvision: h = H, w = round(H * 4/3), centred
    assert torch.all(params["height"] == 10) and torch.all(params["width"] == 13)
    assert torch.all(params["top"] == 0) and torch.all(params["left"] == (40 - 13) // 2)


@pytest.mark.parametrize("kernel,p", [(3, 1.0), (5, 0.5), (9, 0.3)])
def test_gaussian_blur_matches_torchvision_with_each_samples_sigma(kernel, p):
    torch.manual_seed(5)
    x = images(32, size=24)
    out, params = run(A.RandomGaussianBlur(kernel, (0.1, 2.0), p=p), x)
    ref = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [params["sigma"][i].item()] * 2)
                       if chosen(params)[i] else x[i] for i in range(x.shape[0])])
    torch.testing.assert_close(out, ref, **TOL)
    assert params["sigma"].std() > 0.1


def test_grayscale_and_solarize_match_torchvision_on_the_chosen_samples():
    torch.manual_seed(6)
    x = images(64)
    out_g, pg = run(A.RandomGrayscale(p=0.5), x)
    out_s, ps = run(A.RandomSolarize(0.5, p=0.5), x)
    ref_g = torch.stack([TF.rgb_to_grayscale(x[i], 3) if chosen(pg)[i] else x[i] for i in range(64)])
    ref_s = torch.stack([TF.solarize(x[i], 0.5) if chosen(ps)[i] else x[i] for i in range(64)])
    torch.testing.assert_close(out_g, ref_g, **TOL)
    torch.testing.assert_close(out_s, ref_s, **TOL)
    assert 0 < chosen(pg).sum() < 64 and 0 < chosen(ps).sum() < 64


def test_ops_leave_their_input_untouched_and_keep_it_in_range():
    torch.manual_seed(7)
    x = images(16)
    before = x.clone()
    for op in A.byol_views(20).transforms[1]:
        y = op(x)
        assert torch.equal(x, before), type(op).__name__
        assert y.min() >= 0 and y.max() <= 1


def test_views_differ_per_sample_and_keep_the_contract():
    torch.manual_seed(8)
    t = A.view_transform(16)
    assert isinstance(t, K.AugmentationSequential) and isinstance(t[0], A.RandomResizedCrop)
    x = torch.rand(1, 3, 24, 24).expand(8, -1, -1, -1).contiguous()
    out = t(x)
    assert out.shape == (8, 3, 16, 16)
    assert min((out[0] - out[i]).abs().max().item() for i in range(1, 8)) > 1e-3
    grey = A.view_transform(16, channels=1)
    assert [type(m) for m in grey] == [A.RandomResizedCrop, A.ColorJitter, A.RandomGaussianBlur]
    assert grey(torch.rand(4, 1, 24, 24)).shape == (4, 1, 16, 16)


def test_grey_views_jitter_the_brightness_of_each_sample():
    torch.manual_seed(9)
    out = A.view_transform(16, channels=1)(torch.full((64, 1, 24, 24), 0.5))
    level = out.mean(dim=(1, 2, 3))
    # crop and blur keep a constant image constant (contrast too); only brightness, 0.5·[0.6, 1.4], moves it
    torch.testing.assert_close(out, level.view(-1, 1, 1, 1).expand_as(out), **TOL)
    assert level.std() > 0.05 and level.min() >= 0.3 - 1e-6 and level.max() <= 0.7 + 1e-6


@pytest.mark.parametrize("recipe, paper_scale", [(A.byol_views, (0.08, 1.0)), (A.simclr_views, (0.08, 1.0)),
                                                 (get_method("simsiam").default_views, (0.2, 1.0))],
                         ids=["byol", "simclr", "simsiam"])
def test_recipes_take_the_crop_scale(recipe, paper_scale):
    assert crop_scales(recipe(16)) == [[paper_scale]] * 2  # each paper's own minimum crop area
    assert crop_scales(recipe(16, scale=(0.3, 0.9))) == [[(0.3, 0.9)]] * 2


def test_set_crop_scale_changes_the_global_crops_and_keeps_the_local_ones():
    views = A.multicrop_views(16, n_local=2)
    A.set_crop_scale(views, (0.3, 0.9))
    assert crop_scales(views) == [[(0.3, 0.9)]] * 2 + [[(0.05, 0.4)]] * 2
    torch.manual_seed(10)
    _, params = run(views.transforms[0][0], torch.zeros(512, 1, 30, 40))
    area = params["height"] * params["width"] / (30 * 40)
    assert area.min() > 0.26 and area.max() < 0.94  # drawn from the new range (w, h rounding moves it a little)
    A.set_crop_scale(views, [0.2, 1], global_only=False)
    assert crop_scales(views) == [[(0.2, 1.0)]] * 4


def test_bad_arguments_raise_helpful_errors():
    with pytest.raises(ValueError, match="hue"):
        A.ColorJitter(hue=0.7)
    with pytest.raises(ValueError, match="odd"):
        A.RandomGaussianBlur(4)
    with pytest.raises(ValueError, match="scale"):
        A.RandomResizedCrop(8, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="too large"):
        A.RandomGaussianBlur(9, p=1.0)(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="probability"):
        A.RandomSolarize(p=1.5)
    with pytest.raises(ValueError, match="0 < min <= max <= 1"):
        A.set_crop_scale(A.byol_views(8), (0.5, 1.2))
    with pytest.raises(TypeError, match=r"pair \(min, max\)"):
        A.set_crop_scale(A.byol_views(8), 0.25)
    with pytest.raises(ValueError, match="no wrapssl RandomResizedCrop"):
        A.set_crop_scale(A.Views([nn.Identity(), nn.Identity()]), (0.2, 1.0))
