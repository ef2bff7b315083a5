"""Peak memory per process of a ViT trained with BYOL (EMA target included) over 2 processes: DDP against FSDP.

Each mode runs in 2 fresh processes (gloo on CPUs, NCCL on GPUs). On CPUs the number is the
process's peak resident set (``resource.getrusage(...).ru_maxrss``, with glibc told to mmap
blocks over 64 KiB so that freed memory leaves it), given in full and above the resident set
just before the model is built (torch, timm and wrapssl imported); on GPUs
``torch.cuda.max_memory_allocated``. Also the seconds per step (after one warm-up step).

    python benchmarks/bench_fsdp.py [--model vit_base_patch16_224] [--steps 3] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(rank: int, mode: str, args: argparse.Namespace, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    import timm

    from wrapssl import Learner
    from wrapssl.fsdp import shard_learner
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    base = rss_mib()
    torch.manual_seed(0)
    net = timm.create_model(args.model, img_size=args.image_size, patch_size=args.patch, num_classes=0)
    learner = Learner(net, image_size=args.image_size, method="byol").to(device)
    built = rss_mib()
    if mode == "fsdp":
        model = shard_learner(learner)
    else:
        model = torch.nn.parallel.DistributedDataParallel(learner, static_graph=True)
    opt = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    for i in range(args.steps + 1):
        if i == 1:
            start = time.perf_counter()
        model(images).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        learner.update_moving_average()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else rss_mib()
    out[(mode, rank)] = dict(peak=peak, above_imports=peak - (0 if cuda else base), built=built - base,
                             seconds=seconds,
                             params=sum(p.numel() for p in net.parameters()))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="images per process")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # glibc keeps freed small-heap memory in the resident set; with large blocks mmapped, freed memory leaves it and
    # the peak resident set is the peak of live memory (both modes run the same way)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with mp.Manager() as manager:
        out = manager.dict()
        for mode in ("ddp", "fsdp"):  # fresh processes each: the peak resident set never goes down
            mp.start_processes(worker, args=(mode, args, free_port(), out), nprocs=2, start_method="spawn")
        results = dict(out)
    unit = "MiB allocated on the GPU" if torch.cuda.is_available() else "MiB peak RSS"
    params = results[("ddp", 0)]["params"]
    print(f"{args.model} ({params / 1e6:.1f}M params), {args.image_size} px, batch {args.batch} per process, "
          f"BYOL with AdamW, 2 processes; {unit}")
    for mode in ("ddp", "fsdp"):
        for rank in range(2):
            r = results[(mode, rank)]
            print(f"{mode:4s} rank {rank}: peak {r['peak']:7.0f}  above imports {r['above_imports']:7.0f}  "
                  f"(the built Learner alone {r['built']:5.0f})  {r['seconds']:.2f} s/step")


if __name__ == "__main__":
    main()
