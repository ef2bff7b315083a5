"""GPU preset of bench_overhead: ResNet-50, 224 px, batch 256, bf16 autocast, channels_last.

Reports wrapssl's step time against the hand-written floor (identity views),
byol-pytorch's step on the same net and heads (identity views), and the phase
shares of a full wrapssl step with its per-sample views on the GPU. Extra
arguments go to bench_overhead (e.g. --batch 128 if memory is short,
--compile -1 or --compile avgpool to add a Learner(compile=True) contender).

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --batch 128 --compile avgpool
"""
from __future__ import annotations

import sys

import torch

import bench_overhead

PRESET = ["--device", "cuda", "--arch", "resnet50", "--image-size", "224", "--batch", "256", "--bf16",
          "--channels-last", "--hidden", "4096", "--out", "256", "--byol-pytorch", "--steps", "5", "--reps", "7"]

if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device; run bench_overhead.py for the CPU numbers")
    torch.backends.cudnn.benchmark = True
    bench_overhead.main(PRESET + sys.argv[1:])  # later flags override the preset
