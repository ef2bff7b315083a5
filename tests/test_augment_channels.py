"""Any channel count: ops and recipes on 2-13 bands, input checks, normalisation statistics given or estimated."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from wrapssl import Learner
from wrapssl import augment as A

from conftest import small_cnn

TOL = dict(atol=1e-5, rtol=0)
BANDS = [2, 4, 13]


def images(n=16, channels=4, size=20, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", BANDS)
def test_crop_blur_and_solarize_apply_to_every_band_as_torchvision_does(channels):
    torch.manual_seed(channels)
    x = images(24, channels)
    crop, blur, sol = A.RandomResizedCrop(16, flip_p=0.5), A.RandomGaussianBlur(5, p=0.5), A.RandomSolarize(p=0.5)
    out_c, out_b, out_s = crop(x), blur(x), sol(x)
    pc, pb, ps = crop._params, blur._params, sol._params
    for i in range(x.shape[0]):
        box = [int(pc[k][i]) for k in ("top", "left", "height", "width")]
        ref = TF.resized_crop(x[i], *box, size=[16, 16], antialias=True)  # crops of at most 16 px: upsampling
        ref = TF.horizontal_flip(ref) if pc["flip"][i] else ref
        if all(box[k] <= 16 for k in (2, 3)):
            torch.testing.assert_close(out_c[i], ref, **TOL)
        ref = TF.gaussian_blur(x[i], [5, 5], [pb["sigma"][i].item()] * 2) if pb["batch_prob"][i] else x[i]
        torch.testing.assert_close(out_b[i], ref, **TOL)
        ref = TF.solarize(x[i], 0.5) if ps["batch_prob"][i] else x[i]
        torch.testing.assert_close(out_s[i], ref, **TOL)


@pytest.mark.parametrize("channels", BANDS)
def test_colour_ops_pass_other_channel_counts_through(channels):
    x = images(8, channels)
    for op in (A.ColorJitter(0.8, 0.8, 0.8, 0.2, p=1.0), A.RandomGrayscale(p=1.0)):
        assert torch.equal(op(x), x)


@pytest.mark.parametrize("channels", BANDS)
def test_recipes_take_any_channel_count_and_draw_as_for_rgb(channels):
    for recipe in (A.byol_views, A.simclr_views, lambda s, channels: A.multicrop_views(s, 2, channels=channels)):
        views = recipe(16, channels=channels)
        assert {type(op) for v in views.transforms for op in v} <= {
            A.RandomResizedCrop, A.RandomGaussianBlur, A.RandomSolarize}  # no colour ops on bands
        torch.manual_seed(0)
        out = views(images(4, channels))
        assert all(v.shape[:2] == (4, channels) for v in out)
        # each band is cropped, blurred and solarised exactly as a one-band image with the same draw
        for v, view in zip(out, views.transforms):
            one = view(images(4, channels)[:, -1:], params=view._params)
            torch.testing.assert_close(v[:, -1:], one, **TOL)


def test_a_learner_trains_a_13_band_net_on_estimated_statistics():
    x = torch.randint(0, 256, (8, 13, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    heads = dict(projection_size=16, projection_hidden_size=32)
    with pytest.raises(ValueError, match="estimate_normalization"):
        Learner(small_cnn(channels=13), image_size=16, **heads)  # ImageNet's statistics are RGB's
    net = small_cnn(channels=13)
    learner = Learner(net, image_size=16, normalize=A.estimate_normalization(x), **heads)
    loss = learner(x)
    loss.backward()
    assert torch.isfinite(loss) and net[0].weight.grad.abs().sum() > 0
    assert learner.embed(x).shape == (8, 64)


def test_to_float_takes_the_nets_channel_count_and_grey_for_rgb():
    for c in (1, 2, 4, 13):
        u8 = torch.randint(0, 256, (2, c, 5, 5), dtype=torch.uint8)
        torch.testing.assert_close(A.to_float(u8, c), u8.double().div(255).float())
    grey = torch.rand(2, 1, 5, 5)
    assert torch.equal(A.to_float(grey, 3), grey.repeat(1, 3, 1, 1))


@pytest.mark.parametrize("c, channels, advice", [
    (4, 3, r"images\[:, :3\]"), (1, 4, "pass 4-channel images"), (3, 1, "rgb_to_grayscale"),
    (2, 3, "net built for 2-channel input")])
def test_to_float_refuses_other_channel_counts_with_advice(c, channels, advice):
    with pytest.raises(ValueError, match=f"images have {c} channels? but the net takes {channels};.*{advice}"):
        A.to_float(torch.rand(2, c, 5, 5), channels)


def test_normalization_defaults_to_imagenet_for_rgb_and_its_mean_for_grey():
    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(A.normalization(3)(x), (x - mean) / std)
    torch.testing.assert_close(A.normalization(1)(x[:, :1]), (x[:, :1] - mean.mean()) / std.mean())
    assert torch.equal(A.normalization(4, None)(images(2, 4)), images(2, 4))


def test_normalization_of_bands_takes_the_users_statistics():
    x = images(2, 4)
    mean, std = (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)
    ref = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(4)], dim=1)
    torch.testing.assert_close(A.normalization(4, (mean, std))(x), ref)
    torch.testing.assert_close(A.normalization(4, ((0.5,), (0.25,)))(x), (x - 0.5) / 0.25)


def test_normalization_of_bands_without_statistics_names_both_fixes():
    with pytest.raises(ValueError, match=r"4-channel .*normalize=\(mean, std\).*estimate_normalization"):
        A.normalization(4)
    with pytest.raises(ValueError, match="give 4 means and 4 stds"):
        A.normalization(4, ((0.1, 0.2), (0.3, 0.4)))
    with pytest.raises(ValueError, match="2 means but 3 stds"):
        A.normalization(2, ((0.1, 0.2), (0.3, 0.4, 0.5)))
    with pytest.raises(ValueError, match="std 0 is constant"):
        A.normalization(2, ((0.1, 0.2), (0.3, 0.0)))
    with pytest.raises(TypeError, match=r"\(mean, std\)"):
        A.normalization(2, 0.5)


def naive_stats(batch):
    """Per-channel mean and std over every pixel, in NumPy float64."""
    a = batch.numpy().astype(np.float64)
    a = a / 255 if batch.dtype == torch.uint8 else a
    a = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
    return a.mean(1), a.std(1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_estimate_normalization_matches_a_naive_computation(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(300, 5, 6, 7, generator=g) * torch.linspace(0.2, 1.0, 5).view(1, 5, 1, 1)
    x = x.mul(255).round().to(torch.uint8) if dtype == torch.uint8 else x
    mean, std = A.estimate_normalization(x, batch_size=64)
    ref_mean, ref_std = naive_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-9)
    np.testing.assert_allclose(std, ref_std, rtol=1e-9)
    assert len(mean) == len(std) == 5


def test_estimate_normalization_reads_a_sample_of_a_dataset_of_any_sizes():
    g = torch.Generator().manual_seed(2)
    items = [(torch.randint(0, 256, (3, 4 + i % 3, 5), dtype=torch.uint8, generator=g), i) for i in range(100)]
    read = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            read.append(i)
            return items[i]

    mean, std = A.estimate_normalization(Recording(), max_images=25)
    assert len(read) == 25 and read[0] == 0 and read[-1] == 99  # spread over the whole set
    pixels = torch.cat([items[i][0].flatten(1) for i in read], dim=1).double() / 255
    np.testing.assert_allclose(mean, pixels.mean(1).numpy(), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(1, unbiased=False).numpy(), rtol=1e-9)


def test_estimated_statistics_normalise_fashion_mnist_to_zero_mean_unit_std(fmnist_train):
    x = fmnist_train[0]
    stats = A.estimate_normalization(x)
    ref_mean, ref_std = naive_stats(x)
    np.testing.assert_allclose(stats, (ref_mean, ref_std), rtol=1e-9)
    z = A.normalization(1, stats)(A.to_float(x, 1))
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-3


def test_estimate_normalization_refuses_bad_input_clearly():
    with pytest.raises(ValueError, match=r"shape \(N,C,H,W\)"):
        A.estimate_normalization(torch.rand(3, 5, 5))
    with pytest.raises(ValueError, match=r"float images must lie in \[0,1\]"):
        A.estimate_normalization(torch.rand(4, 2, 5, 5) * 1000)
    with pytest.raises(TypeError, match="as_uint8_dataset"):
        A.estimate_normalization([np.zeros((3, 5, 5))])
    with pytest.raises(ValueError, match="max_images must be a positive int"):
        A.estimate_normalization(torch.rand(4, 2, 5, 5), max_images=0)


def test_grey_images_for_a_multispectral_net_are_refused_not_repeated():
    from wrapssl import Learner

    learner = Learner(small_cnn(channels=4), 16, hidden_layer=-2, method="simclr", normalize=((0.5,) * 4, (0.25,) * 4))
    with pytest.raises(ValueError, match="images have 1 channel but the net takes 4"):
        learner(torch.rand(4, 1, 16, 16))
