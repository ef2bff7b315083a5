"""The main job against issue #15's targets: `python train.py` with its defaults, timed as a user runs it.

Runs the README's command in a fresh --out, measures its whole wall time (start-up, baselines,
the learning curve's evaluations and the final scores included) and reads its metrics.json.
Prints the report's table and each target with met / not met:

- wall time <= 10 minutes on a 2-core CPU;
- kNN (k=200, t=0.1, all 60,000 training images as memory) >= 88% on the test split;
- linear probe >= 90%.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_main_job.py --json main_job.json [-- extra train.py flags]
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

from common import ROOT, command, machine, save_json

TARGETS = {"wall_minutes": 10.0, "knn": 0.88, "linear": 0.90}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("extra", nargs="*", help="flags for train.py after --, e.g. -- --steps 600")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="main_job_") as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "train.py", "--out", str(out), *args.extra], cwd=ROOT,
                              env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"error: train.py exited with {done.returncode}:\n{done.stdout[-2000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
    scores = metrics["scores"]
    print(f"{'':>12} {'kNN':>8} {'linear':>8}")
    for row in ("raw_pixels", "random_init", "pretrained"):
        print(f"{row:>12} {scores[row]['knn']:8.2%} {scores[row]['linear']:8.2%}")
    got = {"wall_minutes": wall / 60, "knn": scores["pretrained"]["knn"], "linear": scores["pretrained"]["linear"]}
    met = {"wall_minutes": got["wall_minutes"] <= TARGETS["wall_minutes"],
           "knn": got["knn"] >= TARGETS["knn"], "linear": got["linear"] >= TARGETS["linear"]}
    for key, target in TARGETS.items():
        print(f"{key:>12}: {got[key]:.4g} (target {'<=' if key == 'wall_minutes' else '>='} {target:g}) "
              f"{'met' if met[key] else 'NOT met'}")
    save_json(args.json, {"command": command(), "machine": machine(), "extra_flags": args.extra, "wall_s": wall,
                          "train_minutes": metrics["train_minutes"], "scores": scores,
                          "learning_curve": metrics["learning_curve"], "health": metrics["health"],
                          "targets": TARGETS, "met": met})


if __name__ == "__main__":
    main()
