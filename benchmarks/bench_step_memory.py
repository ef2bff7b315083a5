"""CPU peak RSS of a BYOL training loop: the Learner against hand-written steps with one or two passes.

Each variant runs ``--steps`` steps in a fresh process on the end-to-end
benchmark's net (small ResNet 16-32-64, heads 1024/256, batch 256, 28 px grey
images repeated to 3 channels) and reports how much the peak RSS grew over the
RSS after set-up:

- ``learner``: ``Learner`` with its defaults (per-sample views, channels_last);
- ``learner-contiguous``: the same with ``channels_last=False``;
- ``one-pass``: bench_overhead's hand-written floor step, both (fixed) views
  in one 512-image pass, as wrapssl and byol-pytorch run them;
- ``two-passes``: the same with one 256-image pass per view, as lightly's
  example runs them (batch norm then normalises each view on its own).

    python benchmarks/bench_step_memory.py --steps 60
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import common  # noqa: F401  (puts the checkout on sys.path)
import torch

from bench_overhead import Floor, WrapsslStep, build_net, parse
from common import command, machine, markdown_table, peak_rss_mb, rss_mb, save_json

VARIANTS = ("learner", "learner-contiguous", "one-pass", "two-passes")


def run(variant: str, steps: int) -> float:
    """Peak RSS growth in MB of ``steps`` training steps of ``variant`` in this process."""
    args = parse([])  # bench_overhead's defaults: small ResNet, heads 1024/256, batch 256, Adam 3e-4, EMA 0.99
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 1, 28, 28), dtype=torch.uint8)
    if variant.startswith("learner"):
        kw = {"channels_last": False} if variant == "learner-contiguous" else {}
        w = WrapsslStep(build_net(args.arch), args, augment=True, **kw)

        def step():
            w.step(images)
    else:
        net = build_net(args.arch)
        floor = Floor(net, net.fc.in_features, args.hidden, args.out, args.lr, args.momentum, args.autocast)
        x = images.float().div(255).expand(-1, 3, -1, -1)
        both = torch.cat([x.flip(-1), x.flip(-2)])  # two fixed views

        def step():
            floor.step(both, per_view=variant == "two-passes")
    before = rss_mb()
    for _ in range(steps):
        step()
    return peak_rss_mb() - before


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one variant, in a child process
    args = ap.parse_args(argv)
    if args.variant:
        print(run(args.variant, args.steps))
        return {}
    growth = {}
    for v in args.variants:  # a fresh process each: peak RSS is a per-process high-water mark
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", v, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        growth[v] = float(out.stdout.split()[-1])
        print(v, f"{growth[v]:.0f} MB", flush=True)
    print(f"\n{command()}\n{machine()}\n")
    print(markdown_table(["variant", f"peak RSS growth over {args.steps} steps, MB"],
                         [[v, f"{g:.0f}"] for v, g in growth.items()]))
    return save_json(args.json, {"command": command(), "machine": machine(), "steps": args.steps,
                                 "growth_mb": growth})


if __name__ == "__main__":
    main()
