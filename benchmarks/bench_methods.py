"""The method table: every joint-embedding method on the same backbone and the same CPU wall-clock budget.

1. Calibration: for each method, the seconds of one training step (Learner forward, backward and AdamW
   step on a batch of 256 Fashion-MNIST images at 28 px, the app's default net), timed back to back
   in one process so the ratios are fair on a shared machine.
2. Each method then trains through the app (`python -m wrapssl.train --method M --steps N`) for
   N = budget / step-seconds steps, with the app's own settings for it (`wrapssl.train.method_defaults`:
   smaller heads than the ImageNet papers, EMA momentum 0.99 as lightly's CIFAR-10 benchmarks use,
   DINO's teacher-temperature warm-up scaled to the run), and is scored by the app's report protocol: kNN (k=200, t=0.1, all 60,000
   training images as memory, the 10,000 test images as queries) and a linear probe, beside raw
   pixels and the random-init net (scored once, by the first run).

`mae` is left out (it trains ViTs only, not this backbone) and so is `distill` (it needs a trained
teacher; benchmarks/bench_distill.py compares it with SimCLR).

    nice python benchmarks/bench_methods.py --budget 120 --json methods.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import ROOT, command, machine, save_json  # noqa: E402
from wrapssl import Learner  # noqa: E402
from wrapssl.archs import build_arch  # noqa: E402
from wrapssl.data import load_dataset  # noqa: E402
from wrapssl.train import DEFAULTS, MIN_CROP, method_defaults  # noqa: E402


METHODS = ["simclr", "moco", "nnclr", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "swav"]


def step_seconds(method: str, lr: float, kwargs: dict, images: torch.Tensor, reps: int) -> float:
    """Median seconds of one training step of ``method`` on the app's default net (two warm-up steps)."""
    torch.manual_seed(0)
    net, hidden = build_arch(DEFAULTS["arch"], channels=3, num_classes=10, image_size=28)
    learner = Learner(net, 28, hidden, method=method, crop_scale=(MIN_CROP["fashion-mnist"], 1.0), **kwargs)
    opt = torch.optim.AdamW(learner.parameters(), lr=lr)
    times = []
    for i in range(reps + 2):
        batch = images[torch.randint(0, len(images), (256,))]
        start = time.perf_counter()
        loss = learner(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per method (calibrated)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--reps", type=int, default=8, help="timed steps per method in the calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: {unknown} cannot train this backbone alone; choose from {', '.join(METHODS)}")
    images = load_dataset("fashion-mnist", 28).images[:4096]
    calib = {m: step_seconds(m, *method_defaults(m, 1000), images, args.reps) for m in methods}
    print("seconds per step:", {m: round(t, 3) for m, t in calib.items()}, flush=True)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_methods_"))
    result = {"command": command(), "machine": machine(), "budget_s": args.budget, "step_seconds": calib,
              "runs": {}}
    for i, m in enumerate(methods):
        steps = max(10, round(args.budget / calib[m]))
        lr, kwargs = method_defaults(m, steps)
        cmd = [sys.executable, "-m", "wrapssl.train", "--method", m, "--steps", str(steps), "--seed", str(args.seed),
               "--eval-every", str(steps), "--no-plots", "--baselines" if i == 0 else "--no-baselines",
               "--out", str(out / m)]
        print(" ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{m} failed:\n{done.stderr[-2000:]}", flush=True)
            result["runs"][m] = {"error": done.stderr.strip().splitlines()[-1:], "steps": steps}
            continue
        metrics = json.loads((out / m / "metrics.json").read_text())
        if i == 0:
            result["baselines"] = {k: v for k, v in metrics["scores"].items() if k != "pretrained"}
        result["runs"][m] = {"steps": steps, "lr": lr, "method_args": {k: repr(v) for k, v in kwargs.items()},
                             "train_minutes": metrics["train_minutes"], "wall_s": round(time.perf_counter() - start),
                             "scores": metrics["scores"]["pretrained"], "health": metrics["health"]}
        s = metrics["scores"]["pretrained"]
        print(f"{m:>13}: {steps} steps, {metrics['train_minutes']:.1f} min training, kNN {s['knn']:.2%}, "
              f"linear {s['linear']:.2%}", flush=True)
    for name, s in result.get("baselines", {}).items():
        print(f"{name:>13}: kNN {s['knn']:.2%}, linear {s['linear']:.2%}")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
