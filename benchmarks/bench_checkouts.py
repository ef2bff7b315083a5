"""The Trainer's step against another checkout's, side by side: same net, data, method and settings.

Each run is a fresh process that imports wrapssl from one checkout, trains the app's default net (the small
ResNet, 28 px, SimCLR, batch 256) for ``--steps`` steps on a fixed tensor of random images through
``Trainer`` (no evaluation, health, plots or checkpoints in between), and reports the images/s the
Trainer logged after its first log window (warm-up). Runs of the two checkouts alternate, the order
flipping every round, so that a shared machine's load falls on both alike; the result is the median
images/s of each and the median of the paired ratios.

    git worktree add /tmp/base <commit>
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_checkouts.py /tmp/base --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
from common import ROOT, command, machine, median, save_json

CHILD = """
import json, sys, tempfile
import torch
torch.manual_seed(0)
from wrapssl import Trainer
from wrapssl.archs import build_arch
steps, batch, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
images = torch.randint(0, 256, (batch * 8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
net, hidden = build_arch("small_resnet", channels=3, num_classes=10, image_size=28)
with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(net, dataset=images, image_size=28, hidden_layer=hidden, method="simclr",
                      num_train_steps=steps, batch_size=batch, checkpoint_folder=out, checkpoint_every=10 ** 6,
                      log_every=10, health_every=None, plot=False, progress=False, log_with=("csv",))
    trainer()
    rates = [v for _, v in trainer.history["images_per_s"]][1:]  # the first window holds the warm-up
    trainer.end()
print(json.dumps({"images_per_s": sorted(rates)[len(rates) // 2]}))
"""


def run(checkout: Path, steps: int, batch: int, threads: int) -> float:
    """images/s of one fresh process that imports wrapssl from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: its wrapssl/ must come from PYTHONPATH
        done = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(batch), str(threads)], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"error: the run in {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the other checkout (a folder holding wrapssl/)")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each checkout (alternating)")
    ap.add_argument("--steps", type=int, default=40, help="steps per run (images/s read after the first 10)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    base = Path(args.base).resolve()
    if not (base / "wrapssl" / "__init__.py").is_file():
        raise SystemExit(f"error: {base} holds no wrapssl/ package; give a checkout (git worktree add DIR COMMIT)")
    rates: dict[str, list[float]] = {"this": [], "base": []}
    for i in range(args.rounds):
        order = [("this", ROOT), ("base", base)][:: 1 if i % 2 == 0 else -1]
        for name, where in order:
            rates[name].append(run(where, args.steps, args.batch, args.threads))
        print(f"round {i + 1}: this {rates['this'][-1]:.0f} images/s, base {rates['base'][-1]:.0f} images/s",
              flush=True)
    ratios = [a / b for a, b in zip(rates["this"], rates["base"])]
    result = {"command": command(), "machine": machine(), "base": str(base), "images_per_s": rates,
              "median_this": median(rates["this"]), "median_base": median(rates["base"]),
              "median_ratio_this_over_base": median(ratios), "ratios": ratios}
    print(f"median images/s: this {result['median_this']:.0f}, base {result['median_base']:.0f}; "
          f"median paired ratio this/base {result['median_ratio_this_over_base']:.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
