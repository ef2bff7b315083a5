"""One GPU benchmark that fits a lent device call (under 8 minutes on one H100): wrapssl against the peers and
its hand-written floor, the app's main job in bf16, and scaling to every GPU of the machine.

1. ResNet-50 and ViT-S/16 (timm's vit_small_patch16_224) at 224 px, bf16 autocast, channels_last, batch
   --batch, BYOL with the same head sizes: images/s and peak device memory of one optimiser step for
   - the floor: a hand-written BYOL step on pre-made views (no hook, fused EMA),
   - wrapssl with identity views (the wrapper's own cost against the floor),
   - wrapssl with its default per-sample views on the GPU (the real step),
   - byol-pytorch 0.9.1 (identity views) and lightly 1.6.0's documented BYOL (identity views, its heads,
     loss and update_momentum) on the same net, each skipped with a note when not installed.
   Contenders alternate in time (median of --reps samples of --steps steps); ratios to the floor are the
   median of neighbouring pairs.
2. The main job, `wrapssl train --mixed-precision bf16` (the app's default run, Fashion-MNIST), as a
   subprocess: wall time and its report's kNN/linear scores (skipped when the data is not installed).
3. With more than one GPU: the same ResNet-50 Trainer run on 1 GPU and on all of them (`accelerate launch
   --multi_gpu`), images/s from its log, and the speed-up.

Sections run while the time --budget (seconds) lasts and say what they skipped. Without a CUDA device
the script exits with one line; --smoke runs every section on the CPU at toy sizes to check the script.

    python benchmarks/bench_gpu.py --json benchmarks/data/gpu_h100.json
    python benchmarks/bench_gpu.py --batch 128 --nets resnet50      # less memory, one net
    python benchmarks/bench_gpu.py --smoke                           # the CPU check, about a minute
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import common  # noqa: F401  (puts the checkout on sys.path)
from common import command, machine, markdown_table, median, race, save_json, sync
from wrapssl import Learner
from wrapssl.augment import IMAGENET_MEAN, IMAGENET_STD
from wrapssl.heads import mlp

ROOT = Path(__file__).resolve().parent.parent
NETS = {"resnet50": "ResNet-50", "vit_small_patch16_224": "ViT-S/16"}


def build(name: str, image_size: int) -> nn.Module:
    """A randomly initialised torchvision ResNet or timm ViT (built for ``image_size``)."""
    if name.startswith("vit_"):
        import timm
        return timm.create_model(name, img_size=image_size, num_classes=1000)
    from torchvision import models
    return getattr(models, name)()


def trunk(net: nn.Module) -> nn.Module:
    """The net up to its pre-logits, as a module: a ResNet's children before fc, a timm ViT's forward_features and
    pooling."""
    if hasattr(net, "forward_head"):
        class PreLogits(nn.Module):
            def __init__(self, vit: nn.Module):
                super().__init__()
                self.vit = vit

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        return PreLogits(net)
    return nn.Sequential(*list(net.children())[:-1], nn.Flatten())


def width(net: nn.Module) -> int:
    return int(getattr(net, "num_features", 0) or net.fc.in_features)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class Floor:
    """A hand-written BYOL step: views made beforehand, no hook, no checks, fused EMA."""

    def __init__(self, net: nn.Module, args):
        self.online = nn.ModuleList([trunk(net), mlp([width(net), args.hidden, args.out])])
        self.predictor = mlp([args.out, args.hidden, args.out])
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.online.to(args.device, memory_format=torch.channels_last)
        self.predictor.to(args.device)
        self.target.to(args.device, memory_format=torch.channels_last)
        self.opt = torch.optim.Adam([*self.online.parameters(), *self.predictor.parameters()], lr=3e-4)
        self.pairs = (list(self.target.parameters()), list(self.online.parameters()))
        self.bufs = (list(self.target.buffers()), list(self.online.buffers()))
        self.args = args

    def step(self, both: torch.Tensor) -> None:
        with torch.autocast(self.args.device_type, dtype=torch.bfloat16):
            p1, p2 = self.predictor(self.online[1](self.online[0](both))).chunk(2)
            with torch.no_grad():
                t1, t2 = self.target[1](self.target[0](both)).chunk(2)
            loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.pairs[0], self.pairs[1], 0.01)
            torch._foreach_copy_(self.bufs[0], self.bufs[1])


class WrapsslStep:
    """A BYOL step through ``Learner`` (its own views, or the identity)."""

    def __init__(self, net: nn.Module, args, augment: bool):
        kw = {} if augment else {"augment_fn": lambda x: x}
        self.learner = Learner(net, image_size=args.image_size, method="byol", projection_hidden_size=args.hidden,
                               projection_size=args.out, moving_average_decay=0.99, **kw).to(args.device)
        self.opt = torch.optim.Adam([p for p in self.learner.parameters() if p.requires_grad], lr=3e-4)
        self.args = args

    def step(self, images: torch.Tensor) -> None:
        with torch.autocast(self.args.device_type, dtype=torch.bfloat16):
            loss = self.learner(images)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.learner.update_moving_average()


class BYOLPytorchStep:
    """byol-pytorch 0.9.1 on the same net (identity views, channels_last net and input, as its users would)."""

    def __init__(self, net: nn.Module, args):
        from byol_pytorch import BYOL
        layer = "fc_norm" if hasattr(net, "forward_head") else "avgpool"
        self.model = BYOL(net.to(args.device, memory_format=torch.channels_last), image_size=args.image_size,
                          hidden_layer=layer, projection_size=args.out, projection_hidden_size=args.hidden,
                          moving_average_decay=0.99, augment_fn=lambda x: x, use_simplicial_embeddings=False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-4)
        self.args = args

    def step(self, x: torch.Tensor) -> None:
        with torch.autocast(self.args.device_type, dtype=torch.bfloat16):
            loss = self.model(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.model.update_moving_average()


class LightlyStep:
    """lightly 1.6.0's documented BYOL (its heads, NegativeCosineSimilarity, update_momentum), identity views."""

    def __init__(self, net: nn.Module, args):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum

        self.update_momentum = update_momentum
        self.backbone = trunk(net).to(args.device, memory_format=torch.channels_last)
        self.projection = BYOLProjectionHead(width(net), args.hidden, args.out).to(args.device)
        self.prediction = BYOLPredictionHead(args.out, args.hidden, args.out).to(args.device)
        self.backbone_m, self.projection_m = copy.deepcopy(self.backbone), copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_m)
        deactivate_requires_grad(self.projection_m)
        self.criterion = NegativeCosineSimilarity()
        params = [*self.backbone.parameters(), *self.projection.parameters(), *self.prediction.parameters()]
        self.opt = torch.optim.Adam(params, lr=3e-4)
        self.args = args

    def step(self, views: tuple[torch.Tensor, torch.Tensor]) -> None:
        x0, x1 = views
        self.update_momentum(self.backbone, self.backbone_m, m=0.99)
        self.update_momentum(self.projection, self.projection_m, m=0.99)
        with torch.autocast(self.args.device_type, dtype=torch.bfloat16):
            p0, p1 = (self.prediction(self.projection(self.backbone(x))) for x in (x0, x1))
            with torch.no_grad():
                z0, z1 = (self.projection_m(self.backbone_m(x)) for x in (x0, x1))
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def peak_memory(step, device: str) -> float:
    """Peak device memory (MiB) while ``step`` runs, everything allocated before it included; 0 on the CPU."""
    if not device.startswith("cuda"):
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def net_section(name: str, args) -> dict:
    """Images/s and peak memory of each contender on one net."""
    torch.manual_seed(0)
    net = build(name, args.image_size)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           device=args.device)
    mean = torch.tensor(IMAGENET_MEAN, device=args.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=args.device).view(1, 3, 1, 1)
    x = ((images.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    both = x.repeat(2, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    builders = {
        "floor (hand-written)": lambda: (Floor(copy.deepcopy(net), args).step, both),
        "wrapssl, identity views": lambda: (WrapsslStep(copy.deepcopy(net), args, augment=False).step, images),
        "wrapssl, its views (per sample, on the GPU)": lambda: (WrapsslStep(copy.deepcopy(net), args,
                                                                            augment=True).step, images),
        "byol-pytorch 0.9.1, identity views": lambda: (BYOLPytorchStep(copy.deepcopy(net), args).step, x),
        "lightly 1.6.0, identity views": lambda: (LightlyStep(copy.deepcopy(net), args).step, (x, x)),
    }
    contenders, notes = {}, []
    for label, make in builders.items():
        try:
            fn, batch = make()
        except ImportError as e:
            notes.append(f"{label}: skipped ({e}; pip install -e '.[bench]')")
            continue
        for _ in range(2):  # warm-up: cuDNN autotuning, allocator
            fn(batch)
        sync(args.device)
        contenders[label] = (fn, batch)
    memory = {k: peak_memory(lambda f=f, b=b: f(b), args.device) for k, (f, b) in contenders.items()}
    times = race({k: (lambda f=f, b=b: [f(b) for _ in range(args.steps)]) for k, (f, b) in contenders.items()},
                 reps=args.reps, n=1, device=args.device)
    floor = times["floor (hand-written)"]
    rows = {}
    for k, v in times.items():
        ratios = sorted(a / b for a, b in zip(v, floor))
        per_step = median(v) / args.steps
        rows[k] = {"ms_per_step": 1e3 * per_step, "images_per_s": args.batch / per_step,
                   "x_floor": median(ratios), "peak_mib": memory[k]}
    del contenders
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"rows": rows, "notes": notes}


def main_job(args, budget: float) -> dict:
    """The app's default run with --mixed-precision bf16, as a subprocess: wall time and its scores."""
    out = Path(tempfile.mkdtemp(prefix="bench_gpu_main_"))
    cmd = [sys.executable, "-m", "wrapssl", "train", "--mixed-precision", "bf16", "--num-workers", "4", "--out", str(out)]
    cmd += ["--steps", "20", "--knn-train", "500", "--knn-test", "200", "--no-plots"] if args.smoke else []
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "skipped": f"did not finish within the {budget:.0f} s left"}
    wall = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["?"])[-1]
        return {"command": " ".join(cmd), "skipped": f"exit {done.returncode}: {last}"}
    metrics = json.loads((out / "metrics.json").read_text())
    scores = metrics.get("scores", {})
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "train_time_s": metrics.get("train_time_s"),
            "steps": metrics.get("steps"),
            "knn": {k: scores[k].get("knn") for k in scores}, "linear": {k: scores[k].get("linear") for k in scores}}


def scaling_worker(args) -> None:
    """Inside `accelerate launch`: a short ResNet-50 Trainer run on random images; rank 0 prints its images/s."""
    from wrapssl import Trainer
    size = args.image_size
    data = torch.randint(0, 256, (args.batch * 64, 3, size, size), dtype=torch.uint8)
    net = build("resnet50" if not args.smoke else "resnet18", size)
    steps = 30 if not args.smoke else 4
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(net, dataset=data, image_size=size, num_train_steps=steps, batch_size=args.batch,
                          log_every=steps // 2, checkpoint_every=10 * steps, checkpoint_folder=folder,
                          mixed_precision="bf16" if not args.smoke else "no", log_with=["csv"], plot=False,
                          health_every=None, progress=False, method="byol")
        trainer()
        if trainer.accelerator.is_main_process:
            rate = trainer.history["images_per_s"][-1][1]  # the second half of the run: warm
            print(f"SCALING images_per_s={rate:.1f} processes={trainer.accelerator.num_processes}", flush=True)
        trainer.end()


def scaling(args, budget: float) -> dict:
    """Images/s of the Trainer on 1 GPU and on all of them."""
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else (2 if args.smoke else 1)
    if gpus < 2:
        return {"skipped": f"{gpus} GPU on this machine: nothing to scale to"}
    rates, deadline = {}, time.perf_counter() + budget
    for n in (1, gpus):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
               "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port", "0"]
        cmd += ["--multi_gpu"] if n > 1 else []
        cmd += [__file__, "--scaling-worker", "--batch", str(args.batch), "--image-size", str(args.image_size)]
        cmd += ["--smoke"] if args.smoke else []
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if args.smoke:
            env["CUDA_VISIBLE_DEVICES"] = ""
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            return {"skipped": f"the {n}-process run did not finish in the time left", **rates}
        found = re.search(r"SCALING images_per_s=([\d.]+)", done.stdout)
        if done.returncode != 0 or not found:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            return {"skipped": f"the {n}-process run failed (exit {done.returncode}): {tail}", **rates}
        rates[n] = float(found.group(1))
    return {"images_per_s": rates, "speedup": rates[gpus] / rates[1], "gpus": gpus}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS), help="torchvision ResNets or timm ViTs")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256, help="images per step (per GPU when scaling)")
    ap.add_argument("--hidden", type=int, default=4096, help="projector/predictor hidden width")
    ap.add_argument("--out", type=int, default=256, help="projection size")
    ap.add_argument("--steps", type=int, default=3, help="steps per timing sample")
    ap.add_argument("--reps", type=int, default=5, help="timing samples per contender (contenders alternate)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for all sections; later ones are skipped")
    ap.add_argument("--skip", nargs="*", default=[], choices=["nets", "main-job", "scaling"])
    ap.add_argument("--smoke", action="store_true", help="every section on the CPU at toy sizes (checks the script)")
    ap.add_argument("--scaling-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    if args.smoke:
        args.nets = ["resnet18", "vit_tiny_patch16_224"] if args.nets == list(NETS) else args.nets
        args.image_size = 32 if args.image_size == 224 else args.image_size
        args.batch, args.hidden, args.out = min(args.batch, 8), 64, 32
        args.steps, args.reps = 1, 2
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.device_type = args.device
    if args.scaling_worker:
        scaling_worker(args)
        return
    if args.device == "cpu" and not args.smoke:
        sys.exit(f"bench_gpu.py: no CUDA device (torch {torch.__version__} sees none); run it on a machine with a "
                 "GPU (--smoke checks the script on the CPU; bench_overhead.py has the CPU numbers)")
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    result = {"command": command(), "machine": machine(args.device), "batch": args.batch,
              "image_size": args.image_size, "nets": {}}
    print(f"{command()}\n{machine(args.device)}\n")
    for name in args.nets if "nets" not in args.skip else []:
        if left() < 60:
            result["nets"][name] = {"skipped": "time budget spent"}
            print(f"{name}: skipped (time budget spent)")
            continue
        section = net_section(name, args)
        result["nets"][name] = section
        print(f"{NETS.get(name, name)} at {args.image_size} px, batch {args.batch}, bf16 autocast, channels_last, "
              f"BYOL (heads {args.hidden}/{args.out}); median of {args.reps} samples of {args.steps} steps:\n")
        print(markdown_table(["contender", "images/s", "ms/step", "x floor (paired)", "peak memory MiB"],
                             [[k, f"{r['images_per_s']:.0f}", f"{r['ms_per_step']:.1f}", f"{r['x_floor']:.3f}",
                               f"{r['peak_mib']:.0f}"] for k, r in section["rows"].items()]))
        for note in section["notes"]:
            print(f"  {note}")
        print()
    if "main-job" not in args.skip:
        job = main_job(args, max(30.0, left() - 60))
        result["main_job"] = job
        print(f"main job: {job['command']}\n  " + (f"skipped: {job['skipped']}" if "skipped" in job else
              f"{job['wall_s']} s wall ({job['train_time_s']} s training, {job['steps']} steps); kNN "
              f"{job['knn']}, linear {job['linear']}") + "\n")
    if "scaling" not in args.skip:
        sc = scaling(args, max(30.0, left()))
        result["scaling"] = sc
        print("scaling: " + (f"skipped: {sc['skipped']}" if "skipped" in sc else
                             f"{sc['images_per_s']} images/s, {sc['speedup']:.2f}x on {sc['gpus']} "
                             f"{'GPUs' if args.device == 'cuda' else 'CPU processes (smoke)'}"))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
