"""wrapssl's ops as kornia augmentations: replayable parameters, transform matrices, mixing with kornia's own ops."""
import pytest
import torch
from kornia import augmentation as K
from kornia.geometry.transform import warp_affine

import wrapssl
from wrapssl import Learner
from wrapssl import augment as A

from conftest import small_cnn

RECIPES = {"byol": lambda: A.byol_views(16), "simclr": lambda: A.simclr_views(16),
           "multicrop": lambda: A.multicrop_views(16, n_local=2)}


def images(n=16, size=24, channels=3, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_op_of_the_default_recipes_is_a_kornia_augmentation_in_a_kornia_container():
    for name, recipe in RECIPES.items():
        for view in recipe().transforms:
            assert isinstance(view, K.AugmentationSequential), name
            assert all(isinstance(op, K.AugmentationBase2D) for op in view), name
            assert isinstance(view[0], K.GeometricAugmentationBase2D)
            assert all(isinstance(op, K.IntensityAugmentationBase2D) for op in list(view)[1:])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recorded_parameters_replay_every_view_exactly(recipe):
    torch.manual_seed(0)
    x = images()
    for view in RECIPES[recipe]().transforms:
        out = view(x)
        params = view._params  # kornia's record of the last draw, one ParamItem per op
        assert [p.name for p in params] == list(dict(view.named_children()))
        torch.manual_seed(123)  # a replay draws nothing: other random state changes nothing
        torch.testing.assert_close(view(x, params=params), out, atol=0, rtol=0)
        fresh = view(x)
        assert not torch.equal(fresh, out)


def test_parameters_drawn_up_front_give_the_same_views_as_a_plain_call():
    x = images()
    view = A.view_transform(16, solarize_p=0.5)
    torch.manual_seed(5)
    params = view.forward_parameters(x.shape)
    planned = view(x, params=params)
    torch.manual_seed(5)
    torch.testing.assert_close(view(x), planned, atol=0, rtol=0)


@pytest.mark.parametrize("op", [A.ColorJitter(p=0.5), A.RandomGrayscale(p=0.5), A.RandomGaussianBlur(3, p=0.5),
                                A.RandomSolarize(p=0.5)], ids=lambda op: type(op).__name__)
def test_samples_the_gate_skips_come_back_bit_identical(op):
    torch.manual_seed(1)
    x = images(64)
    out = op(x)
    applied = op._params["batch_prob"] > 0.5
    assert 10 < applied.sum() < 54
    assert torch.equal(out[~applied], x[~applied])
    assert all(not torch.equal(out[i], x[i]) for i in applied.nonzero().flatten().tolist())


def test_the_crop_matrix_maps_input_pixels_to_output_pixels_as_kornias_warp():
    torch.manual_seed(2)
    x = images(32, size=40)
    crop = A.RandomResizedCrop(16, scale=(0.3, 1.0), flip_p=0.5)  # crops of 22 px or more: downscaling only
    out = crop(x)
    m = crop.transform_matrix
    assert m.shape == (32, 3, 3) and 0 < crop._params["flip"].sum() < 32
    # kornia's convention: integer pixel centres, the matrix maps input to output coordinates
    ref = warp_affine(x, m[:, :2], (16, 16), align_corners=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_a_views_chained_matrix_is_its_crops_and_moves_keypoints():
    torch.manual_seed(3)
    x = images(4, size=32)
    view = K.AugmentationSequential(*A.view_transform(16), data_keys=["input", "keypoints"])
    points = torch.tensor([[[5.0, 7.0], [20.0, 11.0]]]).expand(4, -1, -1)
    out, moved = view(x, points)
    m = view[0].transform_matrix
    torch.testing.assert_close(view.transform_matrix, m)
    homogeneous = torch.cat([points, torch.ones(4, 2, 1)], dim=-1)
    torch.testing.assert_close(moved, (homogeneous @ m.transpose(1, 2))[..., :2])


def test_kornia_ops_can_be_appended_and_see_the_cropped_size():
    torch.manual_seed(4)
    x = images(8, size=40)
    view = A.sequence(*A.view_transform(16), K.RandomErasing(p=1.0), K.RandomAffine(15, p=1.0),
                      K.RandomPlanckianJitter(p=1.0))
    out = view(x)
    assert out.shape == (8, 3, 16, 16)
    erase = next(p.data for p in view._params if p.name.startswith("RandomErasing"))
    # the erased boxes were drawn inside the 16x16 crop, not the 40x40 input
    assert torch.all(erase["xs"] + erase["widths"] <= 16) and torch.all(erase["ys"] + erase["heights"] <= 16)
    torch.testing.assert_close(view(x, params=view._params), out, atol=0, rtol=0)


def test_a_kornia_op_can_replace_ours_and_the_learner_trains_on_it():
    torch.manual_seed(6)
    ours = A.view_transform(16)
    swapped = A.sequence(ours[0], K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), *list(ours)[2:])
    views = A.Views([swapped, A.view_transform(16)])
    assert not A.runs_on_grey(views) and A.runs_on_grey(A.byol_views(16))
    learner = Learner(small_cnn(), image_size=16, hidden_layer=-2, views=views,
                      projection_size=16, projection_hidden_size=32)
    grey = torch.randint(0, 256, (8, 1, 20, 20), dtype=torch.uint8)  # kornia's jitter gets these as RGB
    loss = learner(grey)
    loss.backward()
    assert torch.isfinite(loss) and learner.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("op", [A.RandomResizedCrop(12, flip_p=0.5), A.ColorJitter(p=1.0),
                                A.RandomGaussianBlur(5, p=1.0)], ids=lambda op: type(op).__name__)
def test_same_on_batch_gives_every_sample_the_same_draw(op):
    x = images(1).expand(8, -1, -1, -1).contiguous()
    torch.manual_seed(7)
    out = A.sequence(op)(x)
    assert not op.same_on_batch
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 8))
    shared = A.sequence(op)
    shared.same_on_batch = True  # kornia's container switch, handed down to its ops
    out = shared(x)
    assert op.same_on_batch and all(torch.equal(out[0], out[i]) for i in range(1, 8))


def held_tensors(obj, depth=4):
    """Every tensor reachable from ``obj``'s attributes and containers, a few levels deep."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, torch.nn.Module) or hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return []
    return [t for item in items for t in held_tensors(item, depth - 1)]


def test_a_view_keeps_no_reference_to_its_input_or_output():
    """The Learner frees the batch and the raw views before the net runs: the recipe must not hold them."""
    view = A.view_transform(16, solarize_p=0.5)
    x = images(8)
    out = view(x)
    memory = {x.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()}
    held = [t for m in view.modules() for t in held_tensors(m)]
    assert held and not any(t.untyped_storage().data_ptr() in memory for t in held)


def test_wrapssl_exports_the_recipes_as_views_of_kornia_containers():
    views = wrapssl.byol_views(16)
    assert isinstance(views, wrapssl.Views) and all(isinstance(v, K.AugmentationSequential) for v in views.transforms)


def test_inverse_puts_each_view_back_where_its_crop_came_from():
    torch.manual_seed(9)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    ramp = (0.5 + 0.005 * xx + 0.0025 * yy).expand(6, 3, 40, 40)  # bilinear resampling is exact on a ramp
    view = A.sequence(A.RandomResizedCrop(16, scale=(0.3, 0.6), flip_p=0.5), A.RandomSolarize(p=0.5))
    out = view(ramp)
    back = view.inverse(out)
    p = view[0]._params
    assert back.shape == ramp.shape and 0 < p["flip"].sum() < 6
    for i in range(6):
        t, l, h, w = (int(p[k][i]) for k in ("top", "left", "height", "width"))
        inside = (slice(None), slice(t + 1, t + h - 1), slice(l + 1, l + w - 1))  # the crop, less its rim
        solarized = (view._params[1].data["batch_prob"][i] > 0.5).item()  # intensity ops are not inverted
        want = 1 - ramp[i] if solarized else ramp[i]  # every pixel is >= 0.5
        torch.testing.assert_close(back[i][inside], want[inside], atol=1e-4, rtol=0)
        outside = torch.ones(40, 40, dtype=torch.bool)
        outside[max(t - 2, 0):t + h + 2, max(l - 2, 0):l + w + 2] = False  # the bilinear fade at the crop's edge
        assert torch.all(back[i][:, outside] == 0)
