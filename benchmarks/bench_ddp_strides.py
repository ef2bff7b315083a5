"""The 2-process DDP step with the net's parameters contiguous (as before issue 21) against channels_last.

Two gloo processes on the CPU each build the same Learner (the app's default net and method, with its
channels_last views) twice and wrap the copies in DDP (``static_graph=True``, as the Trainer does):
"contiguous" leaves the parameters as built, so DDP's buckets are contiguous while the gradients of the
convolutions come out channels_last: autograd copies them to the parameters' layout (the gradient
layout contract), and for 1x1 convolutions the strides still differ in their size-1 dimensions, so DDP
warns "Grad strides do not match bucket view strides". "channels_last" converts the Learner to
``torch.channels_last`` before wrapping (what the Trainer now does on multi-process runs that feed
channels_last views): buckets, parameters and gradients agree. Timed steps alternate between the two
in one run; the median of the paired ratios (neighbouring samples) is reported, for wall time and for
rank 0's CPU time (less sensitive to other jobs on a shared machine). Whether each variant warns is
checked in a fresh pair of processes of its own (torch warns once per process).

    python benchmarks/bench_ddp_strides.py                 # small ResNet, 28 px, batch 128 per process
    python benchmarks/bench_ddp_strides.py --arch resnet18 --image-size 64 --batch 32
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import time
import warnings

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from common import command, machine, markdown_table, median, save_json
from wrapssl import Learner
from wrapssl.archs import build_arch

VARIANTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def build(args) -> Learner:
    torch.manual_seed(0)
    net, layer = build_arch(args.arch, channels=3, num_classes=10, image_size=args.image_size)
    return Learner(net, image_size=args.image_size, hidden_layer=layer, method="simclr")


def step(model: DDP, opt: torch.optim.Optimizer, images: torch.Tensor) -> None:
    loss = model(images)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker(rank: int, args, port: int, which: list[str], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    base = build(args)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(rank))
    runs = {}
    for name in which:
        model = DDP(copy.deepcopy(base).to(memory_format=VARIANTS[name]), static_graph=True)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, (model, opt) in runs.items():  # warm-up (DDP learns the static graph here)
            for _ in range(2):
                step(model, opt, images)
    times, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(args.reps):
        for name, (model, opt) in runs.items():
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(model, opt, images)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
            cpu[name].append((time.process_time() - start_cpu) / args.steps * 1000)
    if rank == 0:
        out["times"], out["cpu"] = times, cpu
        out["warned"] = any("Grad strides do not match" in str(w.message) for w in caught)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, which: list[str]) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args, free_port(), which, out), nprocs=2, join=True)
        return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="small_resnet")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=128, help="images per process")
    ap.add_argument("--steps", type=int, default=3, help="steps per timing sample")
    ap.add_argument("--reps", type=int, default=7, help="timing samples per variant (the variants alternate)")
    ap.add_argument("--out", default=None, help="JSON of the results")
    args = ap.parse_args()
    warned = {name: run(argparse.Namespace(**{**vars(args), "reps": 1, "steps": 1}), [name])["warned"]
              for name in VARIANTS}
    result = run(args, list(VARIANTS))
    times, cpu = result["times"], result["cpu"]
    paired = {k: median(sorted(a / b for a, b in zip(v["channels_last"], v["contiguous"])))
              for k, v in (("wall", times), ("cpu", cpu))}
    print(f"{command()}\n{machine()}\n2 gloo processes, {args.arch} at {args.image_size} px, batch {args.batch} per "
          f"process, SimCLR with its default views; ms per step, median of {args.reps} samples of {args.steps} "
          "steps, variants alternating\n")
    print(markdown_table(["parameters", "ms/step (wall)", "rank 0's CPU ms/step", "wall samples",
                          "warns about grad strides"],
                         [[name, f"{median(t):.1f}", f"{median(cpu[name]):.1f}", " ".join(f"{x:.0f}" for x in t),
                           "yes" if warned[name] else "no"] for name, t in times.items()]))
    print(f"\nchannels_last / contiguous, median of paired samples: wall {paired['wall']:.3f}, rank 0's CPU time "
          f"{paired['cpu']:.3f}")
    save_json(args.out, {"command": command(), "machine": machine(), "args": vars(args), "times": times, "cpu": cpu,
                         "warned": warned, "paired_ratio": paired})


if __name__ == "__main__":
    main()
