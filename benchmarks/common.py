"""Shared benchmark helpers: machine description, interleaved timing, the small ResNet, Fashion-MNIST, kNN."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> str:
    """One line that says when and where a number was taken."""
    import torchvision
    try:
        import kornia
        kornia_version = kornia.__version__
    except ImportError:
        kornia_version = "not installed"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [when, f"nproc={os.cpu_count()}", f"CPU={cpu_model()}", f"torch.get_num_threads()={torch.get_num_threads()}",
             f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"torchvision {torchvision.__version__}", f"kornia {kornia_version}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU={torch.cuda.get_device_name()}")
    try:
        parts.append(f"load avg {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    return ", ".join(parts)


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb(who: int | None = None) -> float:
    """Peak resident memory in MB of this process (or ``resource.RUSAGE_CHILDREN``), from getrusage."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF if who is None else who).ru_maxrss / 1024  # KiB on Linux


def save_json(path: str | None, result: dict) -> dict:
    """Write a benchmark's result to ``path`` (when given) and return it."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def sync(device: torch.device | str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def race(fns: dict[str, Callable[[], object]], reps: int = 7, n: int = 3, device: str = "cpu",
         warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``reps`` samples each, contenders alternating.

    Alternating inside one process keeps a busy, shared machine from favouring
    whoever ran while it was quiet; report medians.
    """
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync(device)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            sync(device)
            out[k].append((time.perf_counter() - t0) / n)
    return out


def load_baseline_augment(path: str):
    """The augment module of another checkout (e.g. a ``git worktree`` of an older commit), loaded beside ours.

    Its recipes then run in this process next to the current ones, so the two are timed in one
    run. Only a self-contained ``wrapssl/augment.py`` (one file, torch imports only) loads this way.
    """
    import importlib.util
    spec = importlib.util.spec_from_file_location("baseline_augment", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise SystemExit(f"error: --baseline {path} is not a file; pass the wrapssl/augment.py of a worktree, e.g. "
                         "git worktree add /tmp/base COMMIT && ... --baseline /tmp/base/wrapssl/augment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def small_resnet(channels: int = 3, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10) -> nn.Module:
    """A narrow ResNet for 28-32 px images: 3x3 stem, no max-pool, one BasicBlock per stage, ``avgpool``."""

    class SmallResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            blocks, w = [], widths[0]
            for i, out in enumerate(widths):
                stride = 1 if i == 0 else 2
                down = None if stride == 1 and w == out else nn.Sequential(
                    nn.Conv2d(w, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                blocks.append(BasicBlock(w, out, stride=stride, downsample=down))
                w = out
            self.layers = nn.Sequential(*blocks)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(w, num_classes)

        def forward(self, x):
            x = self.layers(self.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return SmallResNet()


def fashion_mnist(train: bool = True, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N,1,28,28) images and int64 labels, read with wrapssl.data.FashionMNIST."""
    from wrapssl.data import FashionMNIST
    ds = FashionMNIST(train=train)
    n = len(ds) if limit is None else min(limit, len(ds))
    if hasattr(ds, "images") and hasattr(ds, "labels"):
        x, y = ds.images[:n], torch.as_tensor(ds.labels[:n])
    else:
        items = [ds[i] for i in range(n)]
        x, y = torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])
    return x.contiguous(), y.long()


def knn_accuracy(train_emb, train_labels, test_emb, test_labels, k: int = 200, t: float = 0.1) -> float:
    """Weighted cosine kNN top-1 (k=200, t=0.1); wrapssl.evaluate's when present."""
    try:
        from wrapssl.evaluate import knn_accuracy as knn
        return float(knn(train_emb, train_labels, test_emb, test_labels, k=k, temperature=t))
    except ImportError:
        pass
    x, q = F.normalize(train_emb.float(), dim=1), F.normalize(test_emb.float(), dim=1)
    c = int(train_labels.max()) + 1
    correct = 0
    for s in range(0, q.shape[0], 512):
        sims, idx = (q[s:s + 512] @ x.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], c).scatter_add_(1, train_labels[idx], (sims / t).exp())
        correct += (votes.argmax(1) == test_labels[s:s + 512]).sum().item()
    return correct / q.shape[0]


@torch.no_grad()
def embed(net_to_features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
          batch_size: int = 1024) -> torch.Tensor:
    """Features of uint8 (N,C,H,W) images, in batches."""
    out = []
    for s in range(0, images.shape[0], batch_size):
        out.append(net_to_features(images[s:s + batch_size]).float().cpu())
    return torch.cat(out)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    line = "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|\n"
    return line + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
