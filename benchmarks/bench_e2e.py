"""End to end: BYOL on Fashion-MNIST with wrapssl, byol-pytorch 0.9.1 and lightly 1.6.0 at equal wall-clock.

Each contender trains in its own fresh subprocess (so its peak RSS is its own)
for --budget seconds of training, then the backbone is frozen and scored by a
weighted cosine kNN (k=200, t=0.1) on its pooled features, train split →
test split. A random-init backbone is scored the same way. The contenders take
turns of --slice seconds while the others are paused (SIGSTOP on the whole
process group, DataLoader workers included), so on a shared machine all of them
train under the same background load; set-up and evaluation are not timed.

What is held equal (the fairness contract):
- backbone: the same narrow ResNet (3x3 stem, BasicBlocks 16/32/64, global
  pool; grey images repeated to 3 channels), the same initial weights;
- heads: projector Linear(64, H)-BN-ReLU-Linear(H, P) and a predictor of the same
  shape, H=--hidden (1024), P=--out (256), in all three;
- optimiser Adam, lr --lr, no weight decay; batch --batch; EMA momentum --momentum,
  constant (no schedule); ImageNet mean/std normalisation of the views;
- the BYOL view recipe (Grill et al. table 6: crop 0.08-1, flip, jitter
  0.4/0.4/0.2/0.1 p=0.8, grey p=0.2, blur p=1.0/0.1, solarize p=0/0.2) at 28 px:
  wrapssl per sample on the batch (fused torch ops); lightly per sample with
  its BYOLTransform on PIL images in DataLoader workers (its documented way);
  byol-pytorch with the same recipe in torchvision called on the whole batch
  (its way: one random draw per batch) — or its own default recipe with
  --byol-pytorch-aug default;
- the loss: BYOL's symmetric regression; lightly's NegativeCosineSimilarity
  averaged over the two directions differs from 2-2cos only by a constant
  factor and offset, which Adam does not see.
Each follows its own documented forward: wrapssl and byol-pytorch put the two
views through the net as one batch, lightly's example runs them separately.
Each runs with its defaults otherwise: wrapssl's Learner hands the net
channels_last views on the CPU (``Learner(channels_last=None)``), the others
hand it what their augmentation returns (contiguous).

Memory: each process's peak RSS; for lightly, whose job is a main process and
DataLoader workers, also the job's memory (main RSS + the workers' private
memory, sampled every second of its turns; see ``Contender``).

    python benchmarks/bench_e2e.py --budget 60                 # a quick run (~6 min)
    python benchmarks/bench_e2e.py --budget 300 --rounds 2      # the recorded run (~35 min)
    python benchmarks/bench_e2e.py --budget 300 --contenders wrapssl-compiled wrapssl byol-pytorch

The optional ``wrapssl-compiled`` contender is wrapssl with ``compile=True`` on
the same net with its fc removed (``hidden_layer=-1``): the same model and
features, compiled; its compilation happens in its first steps and counts
against its budget.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common import (ROOT, command, fashion_mnist, knn_accuracy, machine, markdown_table, median, peak_rss_mb,
                    rss_mb, save_json, small_resnet)
from wrapssl.augment import IMAGENET_MEAN, IMAGENET_STD

CONTENDERS = ("wrapssl", "byol-pytorch", "lightly", "random-init", "wrapssl-compiled")
DEFAULT_CONTENDERS = CONTENDERS[:4]
WIDTHS = (16, 32, 64)


def backbone(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return small_resnet(channels=3, widths=WIDTHS)


class Normalised(nn.Module):
    """uint8 (B,1|3,H,W) → ImageNet-normalised float with 3 channels, for evaluation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, u8: torch.Tensor) -> torch.Tensor:
        x = u8.float().div(255).expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


@torch.no_grad()
def knn_score(net: nn.Module, data) -> float:
    """kNN top-1 of the pooled features of ``net`` (its fc skipped), train → test."""
    net = copy.deepcopy(net).eval()
    net.fc = nn.Identity()
    norm = Normalised()
    (xtr, ytr), (xte, yte) = data

    def feats(x):
        return torch.cat([net(norm(x[s:s + 1000])) for s in range(0, len(x), 1000)])

    return knn_accuracy(feats(xtr), ytr, feats(xte), yte, k=200, t=0.1)


class Uint8Images(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class LightlyPIL(Dataset):
    """Fashion-MNIST as RGB PIL images through lightly's BYOLTransform, as lightly's examples feed it."""

    def __init__(self, images: torch.Tensor, size: int):
        from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
        self.images = images
        self.t = BYOLTransform(BYOLView1Transform(input_size=size), BYOLView2Transform(input_size=size))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image
        return tuple(self.t(Image.fromarray(self.images[i, 0].numpy()).convert("RGB")))


def batches(loader: DataLoader):
    while True:  # epochs back to back
        yield from loader


def byol_pytorch_views(size: int):
    """The BYOL pair in torchvision (v1) transforms, called on whole batches as byol-pytorch does."""
    from torchvision import transforms as T

    from wrapssl.augment import blur_kernel
    k = blur_kernel(size)

    def view(blur_p, solarize_p):
        return nn.Sequential(
            T.RandomResizedCrop((size, size), scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=blur_p), T.RandomSolarize(0.5, p=solarize_p),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD))

    return view(1.0, 0.0), view(0.1, 0.2)


def worker(args) -> dict:
    """Train one contender for the budget in this process, then score it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    train = fashion_mnist(train=True, limit=args.limit)
    test = fashion_mnist(train=False)
    net = backbone(args.seed)
    size, name = 28, args.worker
    out = {"contender": name, "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}
    torch.manual_seed(args.seed + 1)
    if name == "random-init":
        os.kill(os.getpid(), signal.SIGSTOP)  # same protocol as the others: set up, then wait
        out.update(steps=0, images=0, knn=knn_score(net, (train, test)))
        return out

    gen = torch.Generator().manual_seed(args.seed)
    if name == "lightly":
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum

        class BYOL(nn.Module):  # lightly's documented BYOL example, with our head sizes
            def __init__(self, backbone):
                super().__init__()
                self.backbone = backbone
                self.projection_head = BYOLProjectionHead(WIDTHS[-1], args.hidden, args.out)
                self.prediction_head = BYOLPredictionHead(args.out, args.hidden, args.out)
                self.backbone_momentum = copy.deepcopy(self.backbone)
                self.projection_head_momentum = copy.deepcopy(self.projection_head)
                deactivate_requires_grad(self.backbone_momentum)
                deactivate_requires_grad(self.projection_head_momentum)

            def forward(self, x):
                return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

            def forward_momentum(self, x):
                return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

        trunk = net
        trunk.fc = nn.Identity()  # the backbone gives pooled features; the same weights are scored later
        model = BYOL(trunk)
        criterion = NegativeCosineSimilarity()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        loader = DataLoader(LightlyPIL(train[0], size), batch_size=args.batch, shuffle=True, drop_last=True,
                            num_workers=args.workers, generator=gen, persistent_workers=args.workers > 0)

        def step(views):
            x0, x1 = views
            update_momentum(model.backbone, model.backbone_momentum, m=args.momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=args.momentum)
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        score_net = lambda: trunk  # noqa: E731
    else:
        loader = DataLoader(Uint8Images(train[0]), batch_size=args.batch, shuffle=True, drop_last=True,
                            num_workers=0, generator=gen)
        if name.startswith("wrapssl"):
            from wrapssl import Learner
            compiled = name == "wrapssl-compiled"
            if compiled:  # compile pays when the hidden layer is the net's own output (benchmarks/RESULTS.md)
                net.fc = nn.Identity()  # the scored features are the same pooled ones
            model = Learner(net, image_size=size, hidden_layer=-1 if compiled else "avgpool", method="byol",
                            projection_hidden_size=args.hidden, projection_size=args.out,
                            moving_average_decay=args.momentum, compile=compiled)

            def prep(u8):
                return u8  # uint8 (B,1,28,28): the learner converts, repeats to 3 channels, augments
        else:
            from byol_pytorch import BYOL
            if args.byol_pytorch_aug == "recipe":
                v1, v2 = byol_pytorch_views(size)
                aug = dict(augment_fn=v1, augment_fn2=v2)
            else:
                aug = {}
            model = BYOL(net, image_size=size, hidden_layer="avgpool", projection_size=args.out,
                         projection_hidden_size=args.hidden, moving_average_decay=args.momentum,
                         use_simplicial_embeddings=False, **aug)

            def prep(u8):
                return u8.float().div(255).expand(-1, 3, -1, -1)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

        def step(u8):
            loss = model(prep(u8))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.update_moving_average()
            return loss

        score_net = lambda: net  # noqa: E731

    rss_before = rss_mb()
    it = batches(loader)
    batch = next(it)  # start-up (worker fork, first batch) is not charged to the budget
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    os.kill(os.getpid(), signal.SIGSTOP)  # ready: the controller resumes us in time slices
    steps, losses = 0, []
    while not stop and not (args.steps and steps >= args.steps):
        losses.append(step(batch).item())
        steps += 1
        batch = next(it)
    print(f"trained {steps}", file=args.protocol, flush=True)  # the controller stops our clock here
    out.update(steps=steps, images=steps * args.batch, loss_first=losses[0], loss_last=median(losses[-5:]),
               rss_before_mb=rss_before, peak_rss_mb=peak_rss_mb())
    del it, loader
    out["peak_rss_worker_mb"] = peak_rss_mb(resource.RUSAGE_CHILDREN) if name == "lightly" else 0.0
    out["knn"] = knn_score(score_net(), (train, test))
    return out


SAMPLE_S = 1.0  # how often the memory of a contender with DataLoader workers is sampled while it runs


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group (a contender and its DataLoader workers)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(d))
    return pids


def proc_kb(path: str, keys: tuple[str, ...]) -> int:
    """The sum of the ``keys`` (kB lines) of a /proc status-like file; 0 once the process is gone."""
    total = 0
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    total += int(rest.split()[0])
    except OSError:
        return 0
    return total


class Contender:
    """A worker subprocess (and its DataLoader workers, one process group) that we pause and resume.

    A contender with DataLoader workers is one job in several processes: besides its main
    process's peak RSS we sample, every SAMPLE_S s of its turns, the main process's RSS plus the
    workers' private memory (what they add: their shared pages are the main process's, already
    counted). The largest such sum is the job's memory; sampling can only miss the true peak, so
    it is a lower bound for such a contender. Single-process contenders are not sampled (their
    job peak is their exact peak RSS) and pay no sampling cost.
    """

    def __init__(self, name: str, argv: list[str]):
        self.name, self.active, self.steps = name, 0.0, None
        fd, self.out_path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker", name,
                                      "--worker-out", self.out_path], cwd=ROOT, stdout=subprocess.PIPE,
                                     start_new_session=True, text=True)
        _, status = os.waitpid(self.proc.pid, os.WUNTRACED)  # set up, first batch in hand, stopped
        if not os.WIFSTOPPED(status):
            raise RuntimeError(f"{name} exited during set-up (status {status})")
        self.workers = [p for p in group_pids(self.proc.pid) if p != self.proc.pid]  # persistent loader workers
        self.job_peak_kb = 0

    def sample_memory(self) -> None:
        main = proc_kb(f"/proc/{self.proc.pid}/status", ("VmRSS",))
        added = sum(proc_kb(f"/proc/{w}/smaps_rollup", ("Private_Clean", "Private_Dirty")) for w in self.workers)
        self.job_peak_kb = max(self.job_peak_kb, main + added)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def run_for(self, seconds: float) -> bool:
        """Resume for up to ``seconds``; True once it reports the end of training."""
        self.signal(signal.SIGCONT)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            wait = max(0.0, deadline - time.perf_counter())
            ready, _, _ = select.select([self.proc.stdout], [], [], min(wait, SAMPLE_S) if self.workers else wait)
            if ready or time.perf_counter() >= deadline:
                break
            self.sample_memory()
        if ready:
            self.steps = int(self.proc.stdout.readline().split()[1])
        self.active += time.perf_counter() - t0
        if not ready:
            self.signal(signal.SIGSTOP)
        return bool(ready)

    def finish(self) -> dict:
        """Let it evaluate (everyone else stays paused) and collect its result."""
        self.proc.wait()
        if self.proc.returncode:
            raise RuntimeError(f"{self.name} failed with exit code {self.proc.returncode}")
        with open(self.out_path) as f:
            res = json.load(f)
        os.unlink(self.out_path)
        res.update(train_s=self.active, images_per_s=res["images"] / self.active if self.active else 0.0)
        if "peak_rss_mb" in res:  # the job is never smaller than its main process's exact peak
            res["job_peak_mb"] = max(self.job_peak_kb / 1024, res["peak_rss_mb"])
            res["job_peak_sampled"] = bool(self.workers)
        return res


def time_sliced(order: list[str], argv: list[str], args, round_: int) -> list[dict]:
    """Train the contenders in turns of --slice seconds until each has had --budget seconds of CPU turns.

    Everyone runs under the same background load (the machine may be shared);
    a paused contender (its DataLoader workers too) neither computes nor prefetches.
    """
    results = []
    if "random-init" in order:
        c = Contender("random-init", argv)
        c.signal(signal.SIGCONT)
        results.append(c.finish())
        order = [n for n in order if n != "random-init"]
    live = [Contender(n, argv) for n in order]
    while live:
        for c in list(live):
            remaining = args.budget - c.active
            if c.run_for(min(args.slice, remaining)) or c.active >= args.budget:
                if c.steps is None:  # budget spent: ask it to stop after the current step
                    c.signal(signal.SIGCONT)
                    c.proc.send_signal(signal.SIGUSR1)  # the main process only: it would kill loader workers
                    c.run_for(3600)
                results.append(c.finish())
                live.remove(c)
    for res in results:
        res["round"] = round_
        print(json.dumps(res), flush=True)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=600, help="training seconds per contender")
    ap.add_argument("--steps", type=int, default=0, help="stop earlier after this many steps (0: budget only)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all contenders (seed + round)")
    ap.add_argument("--slice", type=float, default=10.0, help="seconds per turn when contenders take turns")
    ap.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS), choices=CONTENDERS,
                    help="wrapssl-compiled: Learner(compile=True) on the net with fc removed (hidden_layer=-1); "
                         "its compilation, on the first steps, is charged to its budget")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--momentum", type=float, default=0.99)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each contender's process")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="lightly's DataLoader workers")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--byol-pytorch-aug", choices=("recipe", "default"), default="recipe")
    ap.add_argument("--json", default=None, help="write all runs here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.protocol = os.fdopen(os.dup(1), "w")  # our stdout is the controller's pipe; prints go to stderr
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        res = worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(res, f)
        return res

    if args.threads:
        torch.set_num_threads(args.threads)
    cmd, where = command(), machine()
    passthrough = list(sys.argv[1:] if argv is None else argv)
    if "--json" in passthrough:
        i = passthrough.index("--json")
        passthrough = passthrough[:i] + passthrough[i + 2:]
    runs = []
    for r in range(args.rounds):
        order = list(args.contenders) if r % 2 == 0 else list(reversed(args.contenders))
        runs += time_sliced(order, passthrough + ["--seed", str(args.seed + r)], args, r)
    rows = []
    for name in args.contenders:
        rs = [x for x in runs if x["contender"] == name]
        ips = [x.get("images_per_s", 0.0) for x in rs]
        rows.append([name, len(rs), f"{median([x['steps'] for x in rs]):.0f}",
                     f"{median(ips):.0f}" if name != "random-init" else "-",
                     f"{100 * median([x['knn'] for x in rs]):.2f}",
                     " / ".join(f"{100 * x['knn']:.2f}" for x in rs),
                     f"{median([x.get('peak_rss_mb', 0.0) for x in rs]):.0f}" if name != "random-init" else "-",
                     f"{median([x['peak_rss_mb'] - x['rss_before_mb'] for x in rs]):.0f}" if name != "random-init"
                     else "-",
                     f"{median([x.get('peak_rss_worker_mb', 0.0) for x in rs]):.0f}" if name == "lightly" else "-",
                     f"{median([x.get('job_peak_mb', 0.0) for x in rs]):.0f}" if name != "random-init" else "-"])
    print(f"\n{cmd}\n{where}\n")
    print(markdown_table(["contender", "runs", "steps (median)", "train images/s (median)", "kNN top-1 % (median)",
                          "kNN per run", "peak RSS main MB", "training's RSS growth MB", "peak RSS largest worker MB",
                          "job peak MB (main RSS + workers' private)"], rows))
    return save_json(args.json, {"command": cmd, "machine": where, "runs": runs})


if __name__ == "__main__":
    main()
