"""Wrapper overhead: wrapssl's BYOL step against a hand-written floor on the same net, heads and views.

The floor is the least a BYOL step can do: pre-made, pre-normalised views, the
net's children up to the pool called directly (no hook), the same projector,
predictor and loss, Adam, and one fused ``torch._foreach_lerp_`` EMA. wrapssl
runs the same step through ``Learner`` with augmentation switched off
(``augment_fn=lambda x: x``), so every extra millisecond is the wrapper's. The
floor's views are laid out as the Learner lays out its own (``channels_last`` on
the CPU and under autocast, see ``Learner(channels_last=...)``); byol-pytorch
gets them as its users pass them (contiguous, unless ``--channels-last``
converts every net).
Then a full wrapssl step (default BYOL views) is split into augment / forward /
backward / optimiser / EMA shares. With ``--baseline``, full steps with the current
recipe race full steps with the recipe of another checkout (the same Learner, net and
heads; only the views differ), alternating, as paired ratios.

    python benchmarks/bench_overhead.py --reps 5                     # CPU, small ResNet, 28 px, quick
    python benchmarks/bench_overhead.py --compile -1                 # also Learner(compile=True)
    python benchmarks/bench_gpu.py                                   # ResNet-50, 224 px, bf16 on a GPU
    git worktree add /tmp/base 634149e                               # the recipe before kornia ops, then:
    python benchmarks/bench_overhead.py --baseline /tmp/base/wrapssl/augment.py --reps 15
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from common import (command, load_baseline_augment, machine, markdown_table, median, race, save_json,
                    small_resnet, sync)
from wrapssl import Learner
from wrapssl.augment import IMAGENET_MEAN, IMAGENET_STD
from wrapssl.heads import mlp


def build_net(arch: str) -> nn.Module:
    if arch == "small":
        return small_resnet(widths=(16, 32, 64))
    return getattr(models, arch)()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class Floor:
    """A hand-written BYOL step: no hook, no checks, no augmentation, fused EMA."""

    def __init__(self, net: nn.Module, dim: int, hidden: int, out: int, lr: float, momentum: float,
                 autocast: contextlib.AbstractContextManager):
        self.trunk = nn.Sequential(*list(net.children())[:-1], nn.Flatten())  # up to and with the pool
        self.projector, self.predictor = mlp([dim, hidden, out]), mlp([out, hidden, out])
        self.t_trunk, self.t_projector = copy.deepcopy(self.trunk), copy.deepcopy(self.projector)
        for m in (self.t_trunk, self.t_projector):
            m.requires_grad_(False)
        online = [*self.trunk.parameters(), *self.projector.parameters(), *self.predictor.parameters()]
        self.opt = torch.optim.Adam(online, lr=lr)
        self.o_params = [*self.trunk.parameters(), *self.projector.parameters()]
        self.t_params = [*self.t_trunk.parameters(), *self.t_projector.parameters()]
        self.o_bufs = [*self.trunk.buffers(), *self.projector.buffers()]
        self.t_bufs = [*self.t_trunk.buffers(), *self.t_projector.buffers()]
        self.momentum, self.autocast = momentum, autocast

    def to(self, **kw) -> "Floor":
        for m in (self.trunk, self.projector, self.predictor, self.t_trunk, self.t_projector):
            m.to(**kw)
        return self

    def step(self, both: torch.Tensor, per_view: bool = False) -> None:
        """One step on ``both`` (view 1 then view 2 along the batch); ``per_view``: one pass per
        view, as lightly's example runs them (batch norm then normalises each view on its own)."""
        with self.autocast:
            if per_view:
                p1, p2 = (self.predictor(self.projector(self.trunk(v))) for v in both.chunk(2))
                with torch.no_grad():
                    t1, t2 = (self.t_projector(self.t_trunk(v)) for v in both.chunk(2))
            else:
                p1, p2 = self.predictor(self.projector(self.trunk(both))).chunk(2)
                with torch.no_grad():
                    t1, t2 = self.t_projector(self.t_trunk(both)).chunk(2)
            loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.t_params, self.o_params, 1 - self.momentum)
            torch._foreach_copy_(self.t_bufs, self.o_bufs)


class TrainStep:
    """One optimiser step of a BYOL wrapper: forward (under autocast), backward, Adam, EMA."""

    model: nn.Module
    opt: torch.optim.Optimizer
    autocast: contextlib.AbstractContextManager

    def step(self, images: torch.Tensor) -> None:
        with self.autocast:
            loss = self.model(images)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.model.update_moving_average()


class WrapsslStep(TrainStep):
    """The same step through ``Learner``; ``augment=False`` swaps the views for the identity."""

    def __init__(self, net: nn.Module, args, augment: bool, compile: bool = False, hidden_layer="avgpool",
                 **learner_kwargs):
        kw = dict(augment_fn=lambda x: x) if not augment else {}
        self.model = Learner(net, image_size=args.image_size, hidden_layer=hidden_layer,
                             projection_hidden_size=args.hidden, projection_size=args.out,
                             moving_average_decay=args.momentum, compile=compile, **kw, **learner_kwargs)
        self.model.to(args.device, memory_format=args.memory_format)
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=args.lr)
        self.autocast = args.autocast

    @property
    def learner(self) -> Learner:
        return self.model


class BYOLPytorchStep(TrainStep):
    """byol-pytorch 0.9.1 on the same net and head sizes (its own MLP heads, EMA by Python loop)."""

    def __init__(self, net: nn.Module, args, augment: bool):
        from byol_pytorch import BYOL
        kw = dict(augment_fn=lambda x: x) if not augment else {}
        self.model = BYOL(net.to(args.device, memory_format=args.memory_format), image_size=args.image_size,
                          hidden_layer="avgpool", projection_size=args.out, projection_hidden_size=args.hidden,
                          moving_average_decay=args.momentum, use_simplicial_embeddings=False, **kw)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.autocast = args.autocast


def step_memory(step, device: str) -> int:
    """Device memory one step needs above what is allocated before it (activations, workspaces); 0 on the CPU."""
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def shares(args, images: torch.Tensor) -> dict[str, float]:
    """Seconds per phase of a full wrapssl step with the default BYOL views, medians over steps."""
    torch.manual_seed(0)
    w = WrapsslStep(build_net(args.arch), args, augment=True)
    learner, t = w.learner, {"augment": [], "forward": [], "backward": [], "optimiser": [], "EMA": []}
    views_forward = learner.views.forward
    aug_time = [0.0]

    def timed_views(x):
        sync(args.device)
        t0 = time.perf_counter()
        out = views_forward(x)
        sync(args.device)
        aug_time[0] += time.perf_counter() - t0
        return out

    learner.views.forward = timed_views
    for i in range(args.steps + 2):
        aug_time[0] = 0.0
        sync(args.device)
        t0 = time.perf_counter()
        with w.autocast:
            loss = learner(images)
        sync(args.device)
        t1 = time.perf_counter()
        w.opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(args.device)
        t2 = time.perf_counter()
        w.opt.step()
        sync(args.device)
        t3 = time.perf_counter()
        learner.update_moving_average()
        sync(args.device)
        t4 = time.perf_counter()
        if i >= 2:
            for k, v in zip(t, (aug_time[0], t1 - t0 - aug_time[0], t2 - t1, t3 - t2, t4 - t3)):
                t[k].append(v)
    return {k: median(v) for k, v in t.items()}


def paired(times: dict[str, list[float]], reference: str) -> dict[str, tuple[float, float, float]]:
    """Per contender: the median and 25/75% of its samples divided by the reference's sample beside them."""
    out = {}
    for k, v in times.items():
        # neighbours in time share the machine's load: the median of their ratios is the robust number
        pair = sorted(a / b for a, b in zip(v, times[reference]))
        out[k] = (median(pair), pair[len(pair) // 4], pair[(3 * len(pair)) // 4])
    return out


def against_baseline(args, images: torch.Tensor, baseline) -> dict[str, list[float]]:
    """Seconds per full step (default BYOL views) with the current recipe and with ``baseline``'s, alternating."""
    net = build_net(args.arch)
    torch.manual_seed(1)
    steps = {"wrapssl, current views (kornia augmentations)": WrapsslStep(copy.deepcopy(net), args, augment=True),
             "wrapssl, baseline views": WrapsslStep(copy.deepcopy(net), args, augment=True,
                                                    views=baseline.byol_views(args.image_size))}
    return race({k: (lambda s=s: [s.step(images) for _ in range(args.steps)]) for k, s in steps.items()},
                reps=args.reps, n=1, device=args.device)


def parse(argv=None) -> argparse.Namespace:
    """The settings of a step (net, sizes, optimiser, device, autocast); other benchmarks build theirs here too."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="small", help="'small' (a narrow ResNet for 28 px) or a torchvision name")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024, help="projector/predictor hidden width")
    ap.add_argument("--out", type=int, default=256, help="projection size")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--momentum", type=float, default=0.99)
    ap.add_argument("--steps", type=int, default=1, help="steps per timing sample")
    ap.add_argument("--reps", type=int, default=25, help="timing samples per contender (contenders alternate)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--byol-pytorch", action="store_true", help="also time byol-pytorch's step (identity views)")
    ap.add_argument("--compile", default=None, metavar="LAYER",
                    help="also time Learner(compile=True) with this hidden_layer ('avgpool' or -1, the net's output "
                         "with fc removed); one per run: compiled code objects are shared across Learners, and two "
                         "in one process can exhaust dynamo's recompile limit")
    ap.add_argument("--baseline", default=None, metavar="AUGMENT_PY",
                    help="also race full steps with the default views against the recipe of this augment.py "
                         "(from a git worktree of an older commit), in this process")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    args.autocast = (torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.bf16
                     else contextlib.nullcontext())
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    dev = args.device
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=dev)
    x = images.float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    both = ((x - mean) / std).repeat(2, 1, 1, 1).contiguous(memory_format=args.memory_format)

    net = build_net(args.arch)
    dim = net.fc.in_features
    torch.manual_seed(1)
    floor = Floor(copy.deepcopy(net), dim, args.hidden, args.out, args.lr, args.momentum, args.autocast)
    floor.to(device=dev, memory_format=args.memory_format)
    wrap = WrapsslStep(copy.deepcopy(net), args, augment=False)
    with args.autocast:  # the floor's views get the memory format the Learner gives its net (channels_last on
        both = wrap.learner.encoder.input_format(both)  # the CPU and under autocast): the ratio is the wrapper's cost
    contenders = {"floor (hand-written)": lambda: floor.step(both),
                  "wrapssl, identity views": lambda: wrap.step(images)}
    warm = {}
    if args.byol_pytorch:
        bp = BYOLPytorchStep(copy.deepcopy(net), args, augment=False)
        xn = x.contiguous(memory_format=args.memory_format)
        contenders["byol-pytorch, identity views"] = lambda: bp.step(xn)
    if args.compile:
        layer = int(args.compile) if args.compile.lstrip("-").isdigit() else args.compile
        n = copy.deepcopy(net)
        if layer == -1:
            n.fc = nn.Identity()  # the net's own output is then the pooled feature
        c = WrapsslStep(n, args, augment=False, compile=True, hidden_layer=layer)
        t0 = time.perf_counter()
        for _ in range(3):  # online (grad) and target (no grad) compile on the first step
            c.step(images)
        sync(dev)
        warm[f"compile, hidden_layer={layer}"] = time.perf_counter() - t0
        contenders[f"wrapssl compile=True, hidden_layer={layer}, identity views"] = lambda: c.step(images)
    times = race({k: (lambda f=f: [f() for _ in range(args.steps)]) for k, f in contenders.items()},
                 reps=args.reps, n=1, device=dev)
    per_step = {k: median(v) / args.steps for k, v in times.items()}
    step_mem = {k: step_memory(f, dev) for k, f in contenders.items()}
    floor_t = times["floor (hand-written)"]
    rows = []
    for k, (mid, q1, q3) in paired(times, "floor (hand-written)").items():
        v = times[k]
        rows.append([k, f"{per_step[k] * 1e3:.1f}", f"{min(v) / args.steps * 1e3:.1f}", f"{args.batch / per_step[k]:.0f}",
                     f"{mid:.3f}", f"{q1:.3f}–{q3:.3f}", f"{min(v) / min(floor_t):.3f}"])
    print(f"\n{command()}\n{machine(dev)}\n")
    if dev.startswith("cuda"):
        for row, k in zip(rows, times):
            row.append(f"{step_mem[k] / 2**20:.0f}")
    print(markdown_table(["contender", "ms/step (median)", "ms/step (min)", "images/s (median)",
                          "× floor (median of paired ratios)", "paired ratios, 25–75%", "× floor (ratio of minima)"]
                         + (["step's peak device memory MiB"] if dev.startswith("cuda") else []), rows))
    ratios = sorted(w / f for w, f in zip(times["wrapssl, identity views"], floor_t))
    if warm:
        print("first three (compiling) steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in warm.items()))

    vs_baseline = None
    if args.baseline:
        bt = against_baseline(args, images, load_baseline_augment(args.baseline))
        reference = "wrapssl, baseline views"
        vs_baseline = {k: {"ms_per_step": median(v) / args.steps * 1e3, "ratio": r}
                       for (k, v), r in zip(bt.items(), paired(bt, reference).values())}
        print(f"\nFull steps, default BYOL views: current recipe against {args.baseline}\n")
        print(markdown_table(["contender", "ms/step (median)", "× baseline (median of paired ratios)",
                              "paired ratios, 25–75%"],
                             [[k, f"{d['ms_per_step']:.1f}", f"{d['ratio'][0]:.3f}",
                               f"{d['ratio'][1]:.3f}–{d['ratio'][2]:.3f}"] for k, d in vs_baseline.items()]))

    sh = shares(args, images)
    total = sum(sh.values())
    print("\nFull wrapssl step (default BYOL views), median per phase:\n")
    print(markdown_table(["phase", "ms", "share"],
                         [[k, f"{v * 1e3:.1f}", f"{100 * v / total:.1f}%"] for k, v in sh.items()]
                         + [["total", f"{total * 1e3:.1f}", "100%"]]))
    return save_json(args.json, {"command": command(), "machine": machine(dev), "per_step_s": per_step,
                                 "ratio_median": median(ratios), "shares_s": sh, "compile_warmup_s": warm,
                                 "against_baseline": vs_baseline,
                                 "step_peak_device_bytes": step_mem if dev.startswith("cuda") else None})


if __name__ == "__main__":
    main()
