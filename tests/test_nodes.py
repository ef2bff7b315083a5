"""Many nodes: two "machines" of one process each on localhost, started through `accelerate launch --num_machines 2
--machine_rank R`, end with the weights of one machine running two processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# a flat folder of 8-px images (no labels: no kNN report), 4 steps of 2 x 8 images, a checkpoint at step 2
RUN = ["--image-size", "8", "--batch-size", "8", "--steps", "4", "--checkpoint-every", "2", "--log-every", "1",
       "--no-plots", "--timeout", "120"]



def same(a, b) -> bool:
    """Equal nested state: tensors bit for bit, containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def launch(*flags: str) -> list[str]:
    """`accelerate launch` of the training app with ``flags`` before the module."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
            "--dynamo_backend", "no", *flags, "-m", "wrapssl", "train"]


@pytest.mark.slow
def test_two_machines_of_one_process_match_one_machine_of_two(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(torch.randint(0, 256, (64, 8, 8, 3), generator=torch.Generator().manual_seed(0))):
        Image.fromarray(image.numpy().astype(np.uint8)).save(images / f"{i:02d}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    app = ["--data", str(images), *RUN]

    one, two = tmp_path / "one-machine", tmp_path / "two-machines"
    port = free_port()
    nodes = [subprocess.Popen(launch("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                                     "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)) +
                              [*app, "--out", str(two)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    single = subprocess.Popen(launch("--num_machines", "1", "--num_processes", "2", "--main_process_port",
                                     str(free_port())) + [*app, "--out", str(one)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        logs = [p.communicate(timeout=240)[0] for p in (*nodes, single)]
    finally:
        for p in (*nodes, single):
            if p.poll() is None:
                p.kill()
    for p, log in zip((*nodes, single), logs):
        assert p.returncode == 0, log[-3000:]
        # the net's parameters follow the channels_last views, so DDP's buckets and gradients agree (issue 21)
        assert "Grad strides do not match bucket view strides" not in log

    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (two, one)]
    assert [m["num_processes"] for m in metrics] == [2, 2] and [m["steps"] for m in metrics] == [4, 4]
    assert len(set(metrics[0]["weights_sha256"])) == 1  # the two machines agree with each other ...
    a, b = (torch.load(folder / "backbone.pt", weights_only=True) for folder in (two, one))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ... and with the one machine
    assert metrics[0]["weights_sha256"] == metrics[1]["weights_sha256"]
    for folder in (two, one):  # one set of checkpoints, written by rank 0, resumable at the same state
        ck = [torch.load(folder / f"checkpoint-0000000{s}.pt", weights_only=True) for s in (2, 4)]
        assert [c["config"]["num_processes"] for c in ck] == [2, 2] and len(ck[1]["rng"]) == 2
    c2, c1 = (torch.load(f / "checkpoint-00000004.pt", weights_only=True)["learner"] for f in (two, one))
    assert same(c2, c1)  # the heads, any EMA target and the BN buffers too


@pytest.mark.slow
def test_two_processes_stream_tar_shards_and_a_locked_out_is_refused_on_every_rank(tmp_path):
    from wrapssl.data import TensorImages
    from wrapssl.runs import RunLock
    from wrapssl.data.shard_writer import write_shards

    images = torch.randint(0, 256, (128, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_shards(TensorImages(images), str(tmp_path / "s" / "t-%02d.tar"), 16)  # 8 shards for 2 x 2 readers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    app = ["--data", str(tmp_path / "s" / "t-{00..07}.tar"), *RUN, "--num-workers", "2", "--steps", "10"]
    cmd = launch("--num_machines", "1", "--num_processes", "2", "--main_process_port", str(free_port()))

    held = RunLock.acquire(tmp_path / "locked")  # this process trains into it, as far as anyone can tell
    try:
        refused = subprocess.run(cmd + [*app, "--out", str(tmp_path / "locked")], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=240)
    finally:
        held.release()
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    # each rank says it in one line and none hangs; the launcher may stop the second rank as soon as the first
    # exits, before it prints (seen in a full suite run), so one line or two
    assert refused.returncode != 0 and len(errors) in (1, 2), refused.stderr[-2000:]
    assert all(f"is being trained by process {os.getpid()}" in e for e in errors)
    assert not (tmp_path / "locked" / "metrics.csv").exists()

    done = subprocess.run(cmd + [*app, "--out", str(tmp_path / "run")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 10 and len(set(metrics["weights_sha256"])) == 1
    data = torch.load(tmp_path / "run" / "checkpoint-00000010.pt", weights_only=True)["data"]
    # 128 samples, 4 readers (2 ranks x 2 workers), batches of 8: a reader yields 4 batches, a rank 8, so an
    # epoch is 8 steps of 2 x 8 images and step 10 is 2 steps into epoch 1
    assert (data["epoch"], data["samples_in_epoch"]) == (1, 2 * 16)
