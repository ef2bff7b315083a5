"""The Trainer under `accelerate launch --use_fsdp --fsdp_version 2` (its environment, 2 gloo processes): a timm ViT
with BYOL's EMA target trains, checkpoints full or sharded, and a resumed run ends with a straight run's weights."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, reset_accelerate

timm = pytest.importorskip("timm")
STEPS = 4


def run(folder: str, kind: str) -> None:
    """One Trainer run of STEPS steps into ``folder`` (resuming what is there), a checkpoint every 2 steps."""
    from wrapssl import Trainer
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=10)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    trainer = Trainer(net, dataset=images, image_size=32, method="byol", num_train_steps=STEPS, batch_size=8,
                      checkpoint_every=2, checkpoint_folder=folder, health_every=2, progress=False, plot=False,
                      log_with=("csv",), resume="auto",
                      method_kwargs=dict(projection_size=16, projection_hidden_size=32))
    trainer.fit()
    trainer.end()


def worker(rank: int, port: int, tmp: str, kind: str, phase: str) -> None:
    torch.set_num_threads(1)
    reset_accelerate()  # forked: not the test process's Accelerate singleton
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_FSDP="true", FSDP_VERSION="2",
                      FSDP_STATE_DICT_TYPE=f"{kind.upper()}_STATE_DICT")
    run(os.path.join(tmp, f"{phase}-{kind}"), kind)



def launch(tmp, kind: str, phase: str) -> None:
    mp.start_processes(worker, args=(free_port(), str(tmp), kind, phase), nprocs=2, join=True, start_method="fork")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_a_resumed_fsdp_run_ends_with_the_straight_runs_weights(tmp_path, kind):
    from safetensors.torch import load_file
    launch(tmp_path, kind, "straight")
    straight = tmp_path / f"straight-{kind}"
    resumed = tmp_path / f"resumed-{kind}"
    shutil.copytree(straight, resumed)  # as if stopped after the checkpoint of step 2
    for path in [*resumed.glob(f"checkpoint-{STEPS:08d}.*"), *resumed.glob("backbone.*"), resumed / ".lock"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    state = torch.load(resumed / "checkpoint-00000002.pt", weights_only=True)
    assert state["fsdp"]["layout"] == kind  # it ran under FSDP
    assert (resumed / "checkpoint-00000002.shards").is_dir() == (kind == "sharded")
    launch(tmp_path, kind, "resumed")
    want, got = load_file(straight / "backbone.safetensors"), load_file(resumed / "backbone.safetensors")
    torch.manual_seed(0)
    initial = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                num_heads=2, num_classes=10).state_dict()
    assert set(got) == set(initial)
    assert any(not torch.equal(want[k], initial[k]) for k in want)  # it trained
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)


@pytest.mark.slow
def test_the_app_under_accelerate_launch_with_fsdp_scores_trains_and_resumes(tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2 -m wrapssl train` on a timm ViT: the random-init row is scored
    before the first step (every process runs those forwards, or FSDP's processes fall out of step and hang), the
    run trains, reports and writes one whole backbone, and the same command with more steps resumes it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "run"

    def app(steps: int, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "wrapssl", "train",
               "--arch", "timm:vit_tiny_patch16_224", "--image-size", "32", "--method", "byol", "--batch-size", "8",
               "--num-train-steps", str(steps), "--checkpoint-every", "2", "--knn-train", "200", "--knn-test", "100",
               "--labels", "none", "--no-plot", "--checkpoint-folder", str(out), *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    first = app(2)
    assert set(first["scores"]) >= {"raw_pixels", "random_init", "pretrained"} and first["steps"] == 2
    assert len(first["weights_sha256"]) == 1  # one copy of the weights, in shards: hashed whole on rank 0
    assert (out / "checkpoint-00000002.shards").is_dir()
    again = app(4, "--resume")
    assert again["steps"] == 4 and again["weights_sha256"] != first["weights_sha256"]
    assert again["scores"]["random_init"] == first["scores"]["random_init"]  # the first run's "before" is kept
