"""Memory format: contiguous against channels_last images, for the net alone and for a full wrapssl step.

For each net, a forward and backward on random images laid out contiguous
(NCHW) and channels_last (NHWC), alternating in one process; then a full BYOL
step of ``Learner`` with its default views, ``channels_last=False`` against
the default (automatic: channels_last on the CPU and under autocast). The
nets' weights stay as they are built (contiguous), as the Learner leaves them.

    python benchmarks/bench_memory_format.py                          # CPU, the default nets
    python benchmarks/bench_memory_format.py --nets resnet50 --device cuda --bf16
"""
from __future__ import annotations

import argparse
import contextlib

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
from torchvision import models

from bench_overhead import WrapsslStep, build_net, parse
from common import command, machine, markdown_table, median, race, save_json

# name: (builder, batch, image size)
NETS = {
    "small_resnet": (lambda: build_net("small"), 512, 28),
    "resnet18": (models.resnet18, 128, 32),
    "resnet18@96": (models.resnet18, 64, 96),
    "resnet50": (models.resnet50, 16, 224),
    "mobilenet_v3_small": (models.mobilenet_v3_small, 64, 96),
    "convnext_tiny": (models.convnext_tiny, 16, 96),
    "vit (patch 8, 4 layers, 128 wide)": (lambda: models.VisionTransformer(32, 8, 4, 4, 128, 256), 128, 32),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    ap.add_argument("--reps", type=int, default=5, help="timing samples per layout (layouts alternate)")
    ap.add_argument("--learner-batch", type=int, default=256, help="batch of the full Learner step (small_resnet)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = args.device
    autocast = (torch.autocast(dev.split(":")[0], dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())
    rows, out = [], {}
    for name in args.nets:
        build, batch, size = NETS[name]
        torch.manual_seed(0)
        net = build().to(dev)
        x = torch.randn(batch, 3, size, size, device=dev)
        layouts = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}

        def step(inp, net=net):
            with autocast:
                y = net(inp)
            y.float().sum().backward()
            net.zero_grad(set_to_none=True)

        t = race({k: (lambda v=v: step(v)) for k, v in layouts.items()}, reps=args.reps, n=1, device=dev)
        ratios = [b / a for a, b in zip(t["contiguous"], t["channels_last"])]
        out[name] = {k: median(v) for k, v in t.items()} | {"ratio": median(ratios)}
        rows.append([name, f"{batch}×3×{size}×{size}", f"{1e3 * median(t['contiguous']):.0f}",
                     f"{1e3 * median(t['channels_last']):.0f}", f"{median(ratios):.2f}"])
        print(rows[-1], flush=True)

    # a full wrapssl step (bench_overhead's): default BYOL views on uint8 grey images, as in the e2e benchmark
    step_args = parse(["--device", dev, "--batch", str(args.learner_batch)] + (["--bf16"] if args.bf16 else []))
    images = torch.randint(0, 256, (args.learner_batch, 1, 28, 28), dtype=torch.uint8, device=dev)
    steps = {}
    for label, kw in [("Learner(channels_last=False)", {"channels_last": False}), ("Learner() (automatic)", {})]:
        torch.manual_seed(0)
        steps[label] = (lambda w=WrapsslStep(build_net("small"), step_args, augment=True, **kw): w.step(images))
    t = race(steps, reps=args.reps, n=1, device=dev)
    a, b = t.values()
    ratio = median([y / x for x, y in zip(a, b)])
    out["learner_step"] = {k: median(v) for k, v in t.items()} | {"ratio": ratio}
    print(f"\n{command()}\n{machine(dev)}\n")
    print(markdown_table(["net", "input", "contiguous ms", "channels_last ms", "channels_last / contiguous "
                          "(median of paired ratios)"], rows))
    print(f"\nFull BYOL step, small ResNet, batch {args.learner_batch}, 28 px, default views: "
          + ", ".join(f"{k} {1e3 * median(v):.0f} ms" for k, v in t.items()) + f"; ratio {ratio:.2f}")
    return save_json(args.json, {"command": command(), "machine": machine(dev), "results": out})


if __name__ == "__main__":
    main()
