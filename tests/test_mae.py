"""MAE: masking, patches, loss and positions against naive computations; any torchvision/timm ViT through the
Learner (the user's net unchanged, its own embeddings learn, the encoder sees only visible tokens); a fixed
batch of Fashion-MNIST images whose reconstructions come to beat the trivial predictor."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from wrapssl import Learner
from wrapssl.archs import adapt_input_channels
from wrapssl.losses.mae import mae_loss, patchify, unpatchify
from wrapssl.methods.mae import MAE, random_masking, sincos_positions, take

from conftest import small_cnn

timm = pytest.importorskip("timm")

DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)


def tiny_vit(size: int = 28, patch: int = 4, channels: int = 3, layers: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    net = VisionTransformer(image_size=size, patch_size=patch, num_layers=layers, num_heads=4, hidden_dim=32,
                            mlp_dim=64, num_classes=10)
    return adapt_input_channels(net, channels)


def timm_vits() -> dict[str, nn.Module]:
    """A plain timm ViT, a DeiT with its distillation token and a ViT with register tokens, all tiny."""
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
    return {"vit": timm.create_model("vit_tiny_patch16_224", **kw),
            "deit_distilled": timm.create_model("deit_tiny_distilled_patch16_224", **kw),
            "vit_registers": timm.create_model("vit_tiny_patch16_224", reg_tokens=2, no_embed_class=True, **kw)}


# ----------------------------------------------------------------------------- pieces against naive code

@pytest.mark.parametrize("n, keep", [(16, 4), (49, 12), (196, 49)])
def test_masking_keeps_exactly_the_requested_tokens_per_sample_at_random(n, keep):
    torch.manual_seed(0)
    kept, mask, restore = random_masking(512, n, keep)
    assert kept.shape == (512, keep) and mask.shape == (512, n)
    assert (mask.sum(1) == n - keep).all()  # every sample, exactly
    for b in range(0, 512, 37):  # the kept indices are the unmasked places, each once
        assert sorted(kept[b].tolist()) == sorted(torch.nonzero(~mask[b]).flatten().tolist())
    # restore puts [kept tokens, mask tokens] back in grid order: place j takes kept token restore[j] when visible
    visible = restore < keep
    assert torch.equal(visible, ~mask)
    grid = torch.arange(n).expand(512, n)
    assert torch.equal(take(kept[..., None], restore.clamp(max=keep - 1))[..., 0][visible], grid[visible])
    # a mask drawn per sample: as many distinct masks as 512 uniform draws from all C(n, keep) give
    masks = math.comb(n, keep)
    assert len({tuple(m.tolist()) for m in mask}) > 0.9 * masks * (1 - (1 - 1 / masks) ** 512)
    share = mask.float().mean(0)  # every place is masked about as often (binomial, 512 draws)
    p = 1 - keep / n
    assert (share - p).abs().max() < 5 * math.sqrt(p * (1 - p) / 512)


def test_the_mask_ratio_sets_how_many_tokens_the_method_keeps():
    for ratio, keep in [(0.75, 12), (0.5, 24), (0.9, 5)]:  # 49 patches; round(49 * (1 - ratio))
        learner = Learner(tiny_vit(), 28, method="mae", mask_ratio=ratio, **DECODER)
        assert learner.method.keep == keep == round(49 * (1 - ratio))


def test_patchify_matches_a_loop_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 12, 8)
    p = 4
    patches = patchify(x, p)
    naive = torch.stack([torch.stack([x[b, :, i:i + p, j:j + p].permute(1, 2, 0).reshape(-1)
                                      for i in range(0, 12, p) for j in range(0, 8, p)]) for b in range(2)])
    assert torch.equal(patches, naive)
    assert torch.equal(unpatchify(patches, p, (3, 2)), x)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_the_mean_error_over_masked_patches_only(norm_pix):
    torch.manual_seed(0)
    b, n, d = 3, 10, 12
    pred, target = torch.randn(b, n, d), torch.randn(b, n, d) * 3 + 1
    _, mask, _ = random_masking(b, n, 4)
    got = mae_loss(pred, target, mask, norm_pix)
    for i in range(b):  # naive: loop over the masked patches of each sample
        errors = []
        for j in range(n):
            if mask[i, j]:
                t = target[i, j]
                if norm_pix:
                    t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
                errors.append(((pred[i, j] - t) ** 2).mean())
        assert got[i].item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)
    visible = pred.clone()
    visible[~mask] = 1e3  # the visible patches' predictions do not count
    assert torch.allclose(mae_loss(visible, target, mask, norm_pix), got)


def test_sincos_positions_match_the_formula():
    dim, grid = 16, (3, 5)
    pos = sincos_positions(dim, grid, num_prefix=1)
    assert pos.shape == (1 + 15, dim) and (pos[0] == 0).all()
    q = dim // 4
    for r in range(3):
        for c in range(5):
            row = pos[1 + r * 5 + c]
            for k in range(q):
                w = 1 / 10000 ** (k / q)
                expect = [math.sin(r * w), math.cos(r * w), math.sin(c * w), math.cos(c * w)]
                assert [row[k].item(), row[q + k].item(), row[2 * q + k].item(), row[3 * q + k].item()] == \
                    pytest.approx(expect, abs=1e-6)


# ----------------------------------------------------------------------------- through the Learner

def vits() -> dict[str, tuple[nn.Module, int]]:
    return {"torchvision": (tiny_vit(), 28), **{k: (v, 32) for k, v in timm_vits().items()}}


@pytest.mark.parametrize("kind", ["torchvision", "vit", "deit_distilled", "vit_registers"])
def test_any_vit_trains_in_place_and_is_unchanged_by_wrapping(kind):
    net, size = vits()[kind]
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(4, 3, size, size)
    with torch.no_grad():
        net.eval()
        out = net(x)
        net.train()
    learner = Learner(net, size, method="mae", **DECODER)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training
    # the learner trains the net's own parameters and the decoder's; the method holds no copy of the net
    assert {id(p) for p in learner.parameters()} == {id(p) for p in net.parameters()} | {
        id(p) for p in learner.method.decoder.parameters()}
    assert all(k.startswith("decoder.") for k in learner.method.state_dict())

    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    loss = learner(x)
    loss.backward()
    # the user's own patch embedding, position embedding and class token are what learns
    names = {"torchvision": ["conv_proj.weight", "encoder.pos_embedding", "class_token"]}.get(
        kind, ["patch_embed.proj.weight", "pos_embed", "cls_token"])
    params = dict(net.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    opt.step()
    after = net.state_dict()
    assert all(not torch.equal(before[n], after[n]) for n in names)

    learner.close()
    net.eval()
    with torch.no_grad():
        net.load_state_dict(before)
        assert torch.equal(net(x), out)  # after close() the net is the plain net again


@pytest.mark.parametrize("kind", ["torchvision", "vit", "deit_distilled", "vit_registers"])
def test_the_encoder_sees_only_the_visible_tokens(kind):
    net, size = vits()[kind]
    learner = Learner(net, size, method="mae", mask_ratio=0.75, **DECODER)
    vit = learner.method.vit
    blocks = net.encoder.layers if kind == "torchvision" else net.blocks
    learner(torch.rand(4, 3, size, size))  # the first call also probes the input memory format on whole images
    seen = []
    handle = blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    learner(torch.rand(4, 3, size, size))
    handle.remove()
    prefix = {"torchvision": 1, "vit": 1, "deit_distilled": 2, "vit_registers": 3}[kind]
    assert vit.num_prefix == prefix
    assert seen == [prefix + round(vit.num_patches * 0.25)]


@pytest.mark.parametrize("kind", ["torchvision", "vit"])
def test_embed_is_the_nets_own_class_token_representation(kind):
    net, size = vits()[kind]
    learner = Learner(net, size, method="mae", **DECODER)
    x = torch.rand(5, 3, size, size)
    emb = learner.embed(x)
    # naive: the net with its classifier replaced by an identity, on the normalised images
    plain = type(net).__new__(type(net))
    plain.__dict__ = {**net.__dict__, "_modules": dict(net._modules)}
    if kind == "torchvision":
        plain._modules["heads"] = nn.Identity()
    else:
        plain._modules["head"] = nn.Identity()
    plain.eval()
    with torch.no_grad():
        expected = plain(learner.normalize(x))
    assert torch.allclose(emb, expected, atol=1e-5)
    proj, emb2 = learner(x, return_embedding=True)
    assert torch.equal(proj, emb2)  # no projection head


def test_a_net_that_is_not_a_vit_is_a_clear_error():
    net = small_cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TypeError, match=r"method 'mae' needs a vision transformer.*VisionTransformer.*Sequential.*"
                                        r"method='byol'"):
        Learner(net, 16, hidden_layer=-2, method="mae")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 10)  # no hook left behind: the net runs to its logits


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_ratio=1.0), "mask_ratio"), (dict(mask_ratio=0), "mask_ratio"),
    (dict(decoder_dim=30, decoder_heads=4), "decoder_dim"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAE(**kwargs)


def test_image_size_must_be_tiled_by_the_patches():
    net = timm.create_model("vit_tiny_patch16_224", img_size=30, patch_size=8, embed_dim=32, depth=1, num_heads=4,
                            dynamic_img_size=True, dynamic_img_pad=True)  # timm pads; MAE needs whole patches
    with pytest.raises(ValueError, match="multiple of 8"):
        Learner(net, 30, method="mae", **DECODER)


# ----------------------------------------------------------------------------- one fixed batch of real images

def test_on_a_fixed_batch_the_loss_falls_and_reconstructions_beat_the_trivial_guess(fmnist_train, tmp_path):
    """60 AdamW steps of a 3-block ViT (7-px patches, 16 tokens) on 8 Fashion-MNIST images, new random masks
    at every step. The 600-step run on many batches is in benchmarks/bench_methods.py --curves."""
    from wrapssl.plots import reconstruction_grid

    x = fmnist_train[0][:8]
    net = tiny_vit(patch=7, channels=1, layers=3)
    learner = Learner(net, 28, method="mae", normalize=((0.286,), (0.353,)), decoder_dim=64, decoder_depth=1,
                      decoder_heads=4)
    opt = torch.optim.AdamW(learner.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))

    def masked_error(zero: bool = False) -> float:
        """Masked-patch error on the batch under masks the run never drew (the same each time); ``zero``: of
        predicting 0, the mean of every normalised patch (the best guess that ignores the visible patches)."""
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            views = learner.normalize(x.float() / 255)
            pred, mask = learner.method.predict(views)
            return mae_loss(torch.zeros_like(pred) if zero else pred, patchify(views, 7), mask).mean().item()

    trivial, before = masked_error(zero=True), masked_error()
    losses = []
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            loss = learner(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(before_threads)
    after = masked_error()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f}; masked error {before:.3f} -> {after:.3f}, trivial {trivial:.3f}")
    assert last < 0.8 * first
    assert after < 0.95 * trivial < before  # below the patch mean: it uses the visible patches
    path = reconstruction_grid(learner, x, tmp_path / "reconstructions.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_trainer_writes_reconstructions_for_mae_and_not_for_other_methods(tmp_path):
    pytest.importorskip("matplotlib")
    from wrapssl import Trainer

    images = torch.randint(0, 256, (32, 3, 28, 28), dtype=torch.uint8)
    for method, net, kw in (("mae", tiny_vit(), DECODER), ("simclr", small_cnn(), {})):
        out = tmp_path / method
        with Trainer(net, dataset=images, image_size=28, method=method, num_train_steps=2, batch_size=8,
                     checkpoint_folder=out, log_every=1, **kw) as trainer:
            trainer()
        assert (out / "loss_curve.png").is_file()
        assert (out / "reconstructions.png").is_file() == (method == "mae")
        if method == "mae":
            assert (out / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
