"""Shared test helpers: tiny nets and a naive Fashion-MNIST reader."""
from __future__ import annotations

import gzip
import os
import re
import socket

# Idle OpenMP threads spin by default and starve the working ones on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

FMNIST = Path(os.environ.get("WRAPSSL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

# Up to 2 intra-op threads, shared out among pytest-xdist's workers (`-n 2` on 2 cores: one each).
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


def small_cnn(channels: int = 3, width: int = 32, num_classes: int = 10) -> nn.Sequential:
    """A small ResNet-like stem for CPU tests; child -2 is the global pool."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def crop_scales(views) -> list[list[tuple[float, float]]]:
    """The area range of every random resized crop, view by view."""
    from wrapssl.augment import RandomResizedCrop
    return [[op.scale for op in view.modules() if isinstance(op, RandomResizedCrop)] for view in views.transforms]


def help_blocks(text: str) -> dict[str, str]:
    """Each option's help text from argparse's printed help, keyed by its first flag."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def read_idx(path: Path) -> np.ndarray:
    """Naive IDX reader, independent of wrapssl.data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def fmnist_train():
    """The first 4096 Fashion-MNIST training images as uint8 (N,1,28,28) and their labels."""
    img = FMNIST / "train-images-idx3-ubyte.gz"
    if not img.exists():
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
    x = torch.from_numpy(read_idx(img)[:4096].copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:4096].astype(np.int64))
    return x, y


def free_port() -> int:
    """A TCP port free on localhost now, for a test's process group or launcher."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_accelerate() -> None:
    """A fresh Accelerate singleton, as a new process would have."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """One intra-op thread (tiny tensors; a shared CPU punishes more) and a clean Accelerate singleton per test."""
    before = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    reset_accelerate()


def run_in_own_session(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cmd`` run in its own session, so that a hang ends with the whole process
    group (a launcher and its ranks), not only the launcher."""
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, stdout, stderr
