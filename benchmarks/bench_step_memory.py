"""CPU peak RSS of a BYOL training loop: the Learner against hand-written steps with one or two passes.

Each variant runs ``--steps`` steps in a fresh process on the end-to-end
benchmark's net (small ResNet 16-32-64, heads 1024/256, batch 256, 28 px grey
images repeated to 3 channels) and reports how much the peak RSS grew over the
RSS after set-up:

- ``learner``: ``Learner`` with its defaults (per-sample views, channels_last);
- ``learner-contiguous``: the same with ``channels_last=False``;
- ``one-pass``: a hand-written step, both (fixed) views in one 512-image pass,
  as wrapssl and byol-pytorch run them;
- ``two-passes``: the same with one 256-image pass per view, as lightly's
  example runs them (batch norm then normalises each view on its own).

    python benchmarks/bench_step_memory.py --steps 60
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F
from torch import nn

from common import command, machine, markdown_table, peak_rss_mb, rss_mb, save_json, small_resnet

VARIANTS = ("learner", "learner-contiguous", "one-pass", "two-passes")


def run(variant: str, steps: int) -> float:
    """Peak RSS growth in MB of ``steps`` training steps of ``variant`` in this process."""
    from wrapssl import Learner
    from wrapssl.heads import mlp
    torch.manual_seed(0)
    net = small_resnet(3, (16, 32, 64))
    images = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8)
    if variant.startswith("learner"):
        kw = {"channels_last": False} if variant == "learner-contiguous" else {}
        model = Learner(net, 28, "avgpool", projection_hidden_size=1024, projection_size=256,
                        moving_average_decay=0.99, **kw)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)

        def step():
            loss = model(images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.update_moving_average()
    else:
        net.fc = nn.Identity()
        proj, pred = mlp([64, 1024, 256]), mlp([256, 1024, 256])
        t_net, t_proj = copy.deepcopy(net), copy.deepcopy(proj)
        for p in [*t_net.parameters(), *t_proj.parameters()]:
            p.requires_grad_(False)
        opt = torch.optim.Adam([*net.parameters(), *proj.parameters(), *pred.parameters()], lr=3e-4)
        x = images.float().div(255).expand(-1, 3, -1, -1)
        v1, v2 = x.flip(-1).contiguous(), x.flip(-2).contiguous()

        def loss_fn(p, z):
            return 2 - 2 * F.cosine_similarity(p, z, dim=-1).mean()

        def step():
            if variant == "two-passes":
                p1, p2 = pred(proj(net(v1))), pred(proj(net(v2)))
                with torch.no_grad():
                    z1, z2 = t_proj(t_net(v1)), t_proj(t_net(v2))
            else:
                with torch.no_grad():
                    z1, z2 = t_proj(t_net(torch.cat([v1, v2]))).chunk(2)
                p1, p2 = pred(proj(net(torch.cat([v1, v2])))).chunk(2)
            loss = loss_fn(p1, z2) + loss_fn(p2, z1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
