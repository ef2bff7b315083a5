"""FSDP: a timm ViT sharded over 2 gloo processes trains as the unsharded net does (BYOL, DINO, MAE, EMA target
included) and resumes from full and sharded checkpoints to the same weights."""
from __future__ import annotations

import gc
import os
import weakref
from datetime import timedelta

import pytest
from conftest import free_port
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

from wrapssl import Learner
from wrapssl.fsdp import (checkpoint_entries, gathered, load_shards, net_state_dict, prepare, requested_plugin,
                          restore_entries, shard_learner, shard_units, training_state)

timm = pytest.importorskip("timm")

WORLD = 2
METHODS = {  # small heads, so that a step costs milliseconds
    "byol": dict(projection_size=16, projection_hidden_size=32),
    "dino": dict(out_dim=32, hidden_size=32, bottleneck_size=16, n_local=2),
    "mae": dict(decoder_dim=16, decoder_depth=2, decoder_heads=2),
}


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             num_classes=10, dynamic_img_size=True, dynamic_img_pad=True)


def build(method: str, sharded: bool, channels_last: bool = False, **kwargs) -> tuple[Learner, torch.optim.Optimizer]:
    learner = Learner(tiny_vit(), image_size=32, method=method, **METHODS[method], **kwargs)
    if channels_last:  # as the Trainer lays out parameters for DDP's buckets; FSDP shards contiguous ones
        learner.to(memory_format=torch.channels_last)
    if sharded:
        shard_learner(learner)
    opt = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-2)
    return learner, opt


def step(learner: Learner, opt: torch.optim.Optimizer, i: int, rank: int, average: bool = False,
         backward=torch.Tensor.backward) -> None:
    """One optimiser step on this rank's batch, augmentations seeded by (step, rank); ``average``: all-reduce the
    gradients by hand, as DDP would, for the unsharded reference."""
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 * i + rank))
    torch.manual_seed(1000 * i + rank)
    backward(learner(images))
    if average:
        for p in learner.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    opt.step()
    opt.zero_grad()
    learner.update_moving_average()


def full(learner: Learner, opt: torch.optim.Optimizer) -> dict:
    """The sharded learner's whole state on every rank (rank 0 gathers it, then shares it as a checkpoint would)."""
    state = [training_state(learner, opt, full=True)]
    dist.broadcast_object_list(state, src=0)
    return state[0][0]


def run_cases(rank: int, tmp: str) -> dict:
    out = {}
    learner = Learner(tiny_vit(), image_size=32, method="byol", **METHODS["byol"])
    whole = [weakref.ref(p) for p in (learner.encoder.net.blocks[0].attn.qkv.weight,
                                      learner.target_encoder.net.blocks[0].attn.qkv.weight)]
    shard_learner(learner)
    gc.collect()
    out["unsharded_freed"] = [w() is None for w in whole]  # no copy of the whole weights stays alive

    for method in METHODS:  # sharded against unsharded with DDP-style averaged gradients, 2 steps
        ref, ref_opt = build(method, sharded=False)
        learner, opt = build(method, sharded=True)
        for i in range(2):
            step(ref, ref_opt, i, rank, average=True)
            step(learner, opt, i, rank)
        out[method] = (full(learner, opt), ref.state_dict())

    # a hooked layer inside a block: that block stays in the root unit, the hook's early exit works
    ref, ref_opt = build("byol", sharded=False, hidden_layer="blocks.1")
    learner, opt = build("byol", sharded=True, hidden_layer="blocks.1")
    step(ref, ref_opt, 0, rank, average=True)
    step(learner, opt, 0, rank)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with gathered(learner, learner.encoder):  # as an evaluation on the main process alone
        if rank == 0:
            out["embed"] = (torch.cat([learner.embed(images[:3]), learner.embed(images[3:])]), ref.embed(images))
    out["sharded_after"] = all(isinstance(p, DTensor) for p in learner.encoder.net.parameters())
    step(ref, ref_opt, 1, rank, average=True)  # and training goes on
    step(learner, opt, 1, rank)
    out["hooked"] = (full(learner, opt), ref.state_dict())
    out["hooked_units"] = len(shard_units(learner))

    # under Accelerate (on CPUs it runs DDP and ignores its FSDP plugin): prepare leaves the sharded learner alone
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    ref, ref_opt = build("dino", sharded=False)
    learner, opt = build("dino", sharded=True, channels_last=True)
    model, opt = prepare(accelerator, learner, opt)
    out["prepared_is_learner"] = model is learner
    for i in range(2):
        step(ref, ref_opt, i, rank, average=True)
        step(model, opt, i, rank, backward=accelerator.backward)
    out["accelerate"] = (full(learner, opt), ref.state_dict())

    # resume: 2 steps, a checkpoint as the Trainer writes it, 1 more step; against 3 straight steps
    from accelerate.utils import FullyShardedDataParallelPlugin
    learner, opt = build("byol", sharded=True)
    ref, ref_opt = build("byol", sharded=False)
    for i in range(2):
        step(learner, opt, i, rank)
        step(ref, ref_opt, i, rank, average=True)
    files = {kind: os.path.join(tmp, f"checkpoint-{kind}.pt") for kind in ("full", "sharded", "plain")}
    for kind in ("full", "sharded"):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=f"{kind.upper()}_STATE_DICT")
        entries = checkpoint_entries(learner, opt, plugin, os.path.join(tmp, "checkpoint-00000002.pt"))
        if rank == 0:
            torch.save({"step": 2, **entries}, files[kind])
    if rank == 0:  # a run without FSDP
        torch.save({"step": 2, "learner": ref.state_dict(), "optimizer": ref_opt.state_dict()}, files["plain"])
    dist.barrier()
    out["net_at_2"] = full(learner, opt)
    out["backbone_at_2"] = net_state_dict(learner)  # rank 0 only
    step(learner, opt, 2, rank)
    out["straight"] = full(learner, opt)
    for kind, path in files.items():
        state = torch.load(path, weights_only=True)  # every rank reads the checkpoint file
        again, again_opt = build("byol", sharded=True)
        restore_entries(again, again_opt, state, tmp)
        out[f"step_after_{kind}"] = again.step
        step(again, again_opt, 2, rank)
        out[f"resumed_{kind}"] = full(again, again_opt)
    plain, plain_opt = build("byol", sharded=False)  # the full checkpoint resumed without FSDP
    state = torch.load(files["full"], weights_only=True)
    plain.load_state_dict(state["learner"])
    plain_opt.load_state_dict(state["optimizer"])
    step(plain, plain_opt, 2, rank, average=True)
    out["resumed_without_fsdp"] = plain.state_dict()
    try:  # last: the net called outside gathered(), as a user's own evaluation would
        learner.embed(images)
        out["outside_gathered"] = None
    except Exception as e:
        out["outside_gathered"] = str(e)
    return out


def worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    # a collective that waits for a rank which never joins fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(run_cases(rank, tmp), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(worker, args=(free_port(), str(tmp)), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_same(got: dict, want: dict, atol: float = 1e-5) -> None:
    tensors = {k for k, v in want.items() if isinstance(v, torch.Tensor)}
    assert tensors and tensors <= set(got)
    for k in sorted(tensors):
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_sharded_vit_trains_as_the_unsharded_one(ranks, method):
    got, want = ranks[0][method]
    assert_same(got, want)
    initial = tiny_vit().state_dict()
    moved = [k for k in initial if not torch.equal(initial[k], want[f"encoder.net.{k}"])]
    assert moved, "the reference did not train, so the comparison proves nothing"
    if method != "mae":  # the EMA target moved too, and the sharded one moved the same way
        target = [k for k in want if k.startswith("target_encoder.net.")]
        assert target and any(not torch.equal(want[k], initial[k.removeprefix("target_encoder.net.")])
                              for k in target)


@pytest.mark.slow
def test_sharding_frees_the_whole_weights_of_net_and_target(ranks):
    assert ranks[0]["unsharded_freed"] == [True, True]


@pytest.mark.slow
def test_a_hooked_layer_inside_a_block_stays_in_the_root(ranks):
    got, want = ranks[0]["hooked"]
    assert_same(got, want)
    assert ranks[0]["hooked_units"] == 2 * 3 - 2  # blocks.0 and blocks.1 of the online and target nets unsharded


@pytest.mark.slow
def test_embed_of_a_sharded_learner(ranks):
    got, want = ranks[0]["embed"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert ranks[0]["sharded_after"]


@pytest.mark.slow
def test_accelerate_keeps_the_sharded_learner(ranks):
    assert ranks[0]["prepared_is_learner"]
    assert_same(*ranks[0]["accelerate"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "sharded", "plain"])
def test_resume_from_a_checkpoint_gives_the_weights_of_a_straight_run(ranks, kind):
    assert [rank[f"step_after_{kind}"] for rank in ranks] == [2, 2]  # the EMA schedule's step came back
    # every rank's shards, gathered; a run without FSDP ("plain") differs in rounding only
    assert_same(ranks[0][f"resumed_{kind}"], ranks[0]["straight"], atol=1e-5 if kind == "plain" else 0)
    changed = [k for k, v in ranks[0]["straight"].items()
               if isinstance(v, torch.Tensor) and not torch.equal(v, ranks[0]["net_at_2"][k])]
    assert any(k.startswith("target_encoder.") for k in changed)  # the step after resume moved the EMA target


@pytest.mark.slow
def test_a_full_checkpoint_resumes_without_fsdp(ranks):
    assert_same(ranks[0]["resumed_without_fsdp"], ranks[0]["straight"])


@pytest.mark.slow
def test_the_backbone_is_the_whole_net_on_rank_0(ranks):
    backbone, at_2 = ranks[0]["backbone_at_2"], ranks[0]["net_at_2"]
    assert set(backbone) == set(tiny_vit().state_dict())
    for k, v in backbone.items():
        torch.testing.assert_close(v, at_2[f"encoder.net.{k}"], atol=0, rtol=0)
    assert ranks[1]["backbone_at_2"] == {}


def test_one_process_gets_a_one_line_error():
    learner = Learner(tiny_vit(), image_size=32, method="byol", **METHODS["byol"])
    with pytest.raises(RuntimeError, match="accelerate launch --num_processes N") as info:
        shard_learner(learner)
    assert "\n" not in str(info.value)


def test_fsdp1_gets_a_one_line_error(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    with pytest.raises(ValueError, match="--fsdp_version 2") as info:
        requested_plugin({"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=1)})
    assert "\n" not in str(info.value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp, FSDP1 by default
    with pytest.raises(ValueError, match="--fsdp_version 2"):
        requested_plugin({})
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    plugin = requested_plugin({})
    assert plugin.fsdp_version == 2 and "FULL" in str(plugin.state_dict_type)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert requested_plugin({}) is None


def test_units_are_the_repeated_blocks_of_the_net_and_its_target():
    from torchvision.models import resnet18
    vit = Learner(tiny_vit(), image_size=32, method="byol", **METHODS["byol"])
    blocks = [*vit.encoder.net.blocks, *vit.target_encoder.net.blocks]
    assert {id(m) for m in shard_units(vit)} == {id(m) for m in blocks}
    assert {id(m) for m in shard_units(vit, ["Block"])} == {id(m) for m in blocks}
    resnet = Learner(resnet18(), image_size=32, method="simclr")  # no target: the online net's 8 BasicBlocks
    stages = [resnet.encoder.net.get_submodule(f"layer{i}") for i in range(1, 5)]
    assert {id(m) for m in shard_units(resnet)} == {id(b) for stage in stages for b in stage}


def test_bad_fsdp_settings_get_one_line_errors(tmp_path):
    learner = Learner(tiny_vit(), image_size=32, method="byol", **METHODS["byol"])
    with pytest.raises(ValueError, match="transformer_cls_names_to_wrap names \\['Blok'\\]") as info:
        shard_units(learner, ["Blok"])
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="holds no sharded checkpoint") as info:
        load_shards(tmp_path, learner, torch.optim.SGD(learner.parameters(), lr=0.1))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_calling_the_sharded_net_outside_gathered_says_how_to_call_it(ranks):
    message = ranks[0]["outside_gathered"]
    assert message is not None and "DTensor" in message  # torch's own words, kept
    assert "sharded (FSDP): call it inside `with wrapssl.fsdp.gathered(learner, learner.encoder):`" in message
