"""Augmentation throughput of the two-view BYOL recipe, four ways.

- wrapssl: ``byol_views`` on the whole batch where it lives (per-sample parameters; kornia
  augmentations whose transforms are wrapssl's fused kernels). With ``--baseline``, also the
  recipe of another checkout's ``augment.py`` (e.g. the plain fused ops before they became kornia
  augmentations), in the same process.
- kornia: the same recipe from kornia.augmentation's own ops (wrapssl's implementation before #6).
- torchvision per sample in DataLoader workers (lightly's way): torchvision.transforms.v2 on each
  uint8 tensor, and, when lightly is installed, lightly's own BYOLTransform on PIL images.
- byol-pytorch's way: torchvision.transforms called once on the whole batch (one draw per batch).

Every contender makes two normalised float views per image from uint8 images of
side --sizes; images/s counts source images. CPU time includes DataLoader
workers. In-process contenders alternate within each repetition; DataLoader
contenders get a fresh loader per repetition, timed from its first batch (so
worker start-up is not counted in images/s, but is in CPU time).

    python benchmarks/bench_augment.py --batches 4 --reps 3        # a quick run
    python benchmarks/bench_augment.py --per-op --reps 7           # each op, wrapssl vs kornia
    git worktree add /tmp/base 634149e                             # the fused ops before kornia, then:
    python benchmarks/bench_augment.py --baseline /tmp/base/wrapssl/augment.py --skip tv lightly bp
"""
from __future__ import annotations

import argparse
import resource
import time

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
from torch.utils.data import DataLoader, Dataset

from common import command, load_baseline_augment, machine, markdown_table, median, save_json, sync
from wrapssl.augment import IMAGENET_MEAN, IMAGENET_STD, Normalize, blur_kernel, byol_views, to_float


def kornia_views(size: int):
    """The BYOL pair from kornia.augmentation, as wrapssl built it before the fused ops."""
    from kornia import augmentation as K
    from torch import nn

    def view(blur_p, solarize_p):
        k = blur_kernel(size)
        ops = [K.RandomResizedCrop((size, size), scale=(0.08, 1.0)), K.RandomHorizontalFlip(),
               K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
               K.RandomGaussianBlur((k, k), (0.1, 2.0), p=blur_p)]
        if solarize_p:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))
        return nn.Sequential(*ops)

    return [view(1.0, 0.0), view(0.1, 0.2)]


def torchvision_views(size: int, v2: bool = True):
    """The BYOL pair from torchvision transforms (v2 per sample; v1 as byol-pytorch calls it)."""
    if v2:
        from torchvision.transforms import v2 as T
    else:
        from torchvision import transforms as T
    k = blur_kernel(size)

    def view(blur_p, solarize_p):
        ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip(),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
               T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=blur_p), T.RandomSolarize(0.5, p=solarize_p),
               T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return T.Compose(ops)

    return [view(1.0, 0.0), view(0.1, 0.2)]


class PerSample(Dataset):
    """uint8 images through a two-view transform, one image at a time (in DataLoader workers)."""

    def __init__(self, images: torch.Tensor, kind: str):
        self.images, self.kind = images, kind
        size = images.shape[-1]
        if kind == "lightly":
            from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
            self.t = BYOLTransform(BYOLView1Transform(input_size=size), BYOLView2Transform(input_size=size))
        else:
            self.t = torchvision_views(size, v2=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.kind == "lightly":
            from PIL import Image
            return tuple(self.t(Image.fromarray(img.permute(1, 2, 0).numpy())))
        x = img.float().div(255)
        return tuple(t(x) for t in self.t)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_loader(images: torch.Tensor, kind: str, batch: int, batches: int, workers: int) -> tuple[float, float]:
    """(seconds for ``batches`` batches after the first, CPU seconds of the whole epoch incl. workers)."""
    loader = DataLoader(PerSample(images[: batch * (batches + 1)], kind), batch_size=batch, num_workers=workers,
                        drop_last=True)
    cpu0, ch0 = time.process_time(), children_cpu()
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    wall = time.perf_counter() - t0
    del it  # joins the workers, so their CPU time is counted
    if n != batches:
        raise RuntimeError(f"expected {batches} timed batches, got {n}")
    return wall, (time.process_time() - cpu0) + (children_cpu() - ch0)


def in_process(fn, images: torch.Tensor, batch: int, batches: int) -> tuple[float, float]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    for b in range(batches):
        fn(images[b * batch:(b + 1) * batch])
    sync(images.device)
    return time.perf_counter() - t0, time.process_time() - cpu0


def recipe_ops(A, size: int) -> dict[str, torch.nn.Module]:
    """The ops of the BYOL recipe from the augment module ``A`` (the current one or a baseline's)."""
    k = blur_kernel(size)
    return {"crop + flip": A.RandomResizedCrop(size, flip_p=0.5),
            "colour jitter p=0.8": A.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            "colour jitter, no hue": A.ColorJitter(0.4, 0.4, 0.2, 0.0, p=0.8),
            "grayscale p=0.2": A.RandomGrayscale(0.2),
            f"gaussian blur {k}x{k} p=1.0": A.RandomGaussianBlur(k, p=1.0),
            f"gaussian blur {k}x{k} p=0.1": A.RandomGaussianBlur(k, p=0.1),
            "solarize p=0.2": A.RandomSolarize(0.5, 0.2)}


def per_op(size: int, batch: int, reps: int, baseline=None) -> tuple[list[str], list[list[object]]]:
    """Each op of the recipe: wrapssl's, kornia's own (and the baseline's), alternating; ms per call."""
    from kornia import augmentation as K

    from common import race
    from wrapssl import augment as A
    k = blur_kernel(size)
    theirs = [torch.nn.Sequential(K.RandomResizedCrop((size, size)), K.RandomHorizontalFlip()),
              K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), K.ColorJitter(0.4, 0.4, 0.2, 0.0, p=0.8),
              K.RandomGrayscale(p=0.2), K.RandomGaussianBlur((k, k), (0.1, 2.0), p=1.0),
              K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.1), K.RandomSolarize(0.0, 0.0, p=0.2)]
    old = list(recipe_ops(baseline, size).values()) if baseline else [None] * len(theirs)
    x = torch.rand(batch, 3, size, size)
    rows = []
    for (name, ours), kornia_op, base in zip(recipe_ops(A, size).items(), theirs, old):
        fns = {"wrapssl": lambda: ours(x), "kornia": lambda: kornia_op(x)}
        if base is not None:
            fns["baseline"] = lambda: base(x)
        t = {key: median(v) * 1e3 for key, v in race(fns, reps=reps, n=2).items()}
        row = [f"{size}", name, f"{t['kornia']:.2f}", f"{t['wrapssl']:.2f}", f"{t['kornia'] / t['wrapssl']:.1f}×"]
        if base is not None:
            row += [f"{t['baseline']:.2f}", f"{t['wrapssl'] / t['baseline']:.3f}"]
        rows.append(row)
    header = ["size", "op", "kornia ms", "wrapssl ms", "speed-up"]
    return header + (["baseline ms", "wrapssl / baseline"] if baseline else []), rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (medians reported)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: nproc)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    ap.add_argument("--device", default="cpu", help="where the in-process contenders run (the DataLoader "
                    "contenders always augment on the CPU, in workers)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="contenders to leave out (wrapssl baseline kornia tv lightly bp)")
    ap.add_argument("--per-op", action="store_true", help="time each op, wrapssl's against kornia's, and stop")
    ap.add_argument("--baseline", default=None, metavar="AUGMENT_PY",
                    help="also time the recipe (and ops) of this augment.py, e.g. from a git worktree of an older "
                         "commit, in this process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_baseline_augment(args.baseline) if args.baseline else None
    if args.per_op:
        tables = [per_op(size, args.batch, args.reps, baseline) for size in args.sizes]
        rows = [r for _, table in tables for r in table]
        print(f"\n{command()}\n{machine()}\n")
        print(markdown_table(tables[0][0], rows))
        return save_json(args.json, {"command": command(), "machine": machine(), "per_op": rows})
    import os
    workers = args.workers or os.cpu_count() or 1
    try:
        import lightly  # noqa: F401
        have_lightly = True
    except ImportError:
        have_lightly = False
    dev = args.device
    norm = Normalize().to(dev)
    results = {}
    print(f"\n{command()}\n{machine(dev)}\n")
    for size in args.sizes:
        torch.manual_seed(size)
        n_img = args.batch * (args.batches + 1)
        images = torch.randint(0, 256, (n_img, 3, size, size), dtype=torch.uint8)
        on_dev = images.to(dev)
        ours = byol_views(size).to(dev)
        base = baseline.byol_views(size).to(dev) if baseline else None
        kv = [t.to(dev) for t in kornia_views(size)] if "kornia" not in args.skip else []
        bp = torchvision_views(size, v2=False)

        def wrapssl_fn(u8):
            return [norm(v) for v in ours(to_float(u8))]

        def baseline_fn(u8):
            return [norm(v) for v in base(to_float(u8))]

        def kornia_fn(u8):
            x = to_float(u8)
            return [norm(t(x)) for t in kv]

        def bp_fn(u8):
            x = to_float(u8)
            return [t(x) for t in bp]

        contenders = {"wrapssl (kornia augmentations, fused kernels, per sample)": ("wrapssl", lambda: in_process(
                          wrapssl_fn, on_dev, args.batch, args.batches)),
                      f"baseline recipe ({args.baseline})": ("baseline", lambda: in_process(
                          baseline_fn, on_dev, args.batch, args.batches)),
                      "kornia's own ops (wrapssl before #6), per sample": ("kornia", lambda: in_process(
                          kornia_fn, on_dev, args.batch, args.batches)),
                      f"torchvision v2 per sample, {workers} DataLoader workers": ("tv", lambda: run_loader(
                          images, "tv", args.batch, args.batches, workers)),
                      "byol-pytorch way: torchvision on the whole batch (one draw per batch)": ("bp", lambda: in_process(
                          bp_fn, on_dev, args.batch, args.batches))}
        if have_lightly:
            contenders[f"lightly BYOLTransform (PIL) per sample, {workers} DataLoader workers"] = (
                "lightly", lambda: run_loader(images, "lightly", args.batch, args.batches, workers))
        contenders = {k: v for k, v in contenders.items() if v[0] not in args.skip and (v[0] != "baseline" or base)}
        for _, fn in contenders.values():  # warm-up
            fn()
        walls = {k: [] for k in contenders}
        cpus = {k: [] for k in contenders}
        for _ in range(args.reps):
            for k, (_, fn) in contenders.items():
                w, c = fn()
                walls[k].append(w)
                cpus[k].append(c)
        rows, res = [], {}
        reference = next((k for k, (tag, _) in contenders.items() if tag == "baseline"), None)
        for k in contenders:
            ips = args.batch * args.batches / median(walls[k])
            loader = "DataLoader" in k
            cpu_per_1k = median(cpus[k]) / (args.batch * (args.batches + (1 if loader else 0))) * 1000
            res[k] = {"images_per_s": ips, "cpu_s_per_1000": cpu_per_1k}
            rows.append([k, f"{ips:.0f}", f"{1e3 * args.batch / ips:.2f}", f"{cpu_per_1k:.2f}"])
            if reference:  # each repetition's time over the baseline's in the same repetition: same load
                res[k]["time_vs_baseline"] = median([a / b for a, b in zip(walls[k], walls[reference])])
                rows[-1].append(f"{res[k]['time_vs_baseline']:.3f}")
        results[size] = res
        print(f"### {size}x{size}, batch {args.batch}, two views per image\n")
        print(markdown_table(["contender", "images/s (median)", "ms per batch", "CPU s per 1000 images"]
                             + (["time × baseline (median of paired ratios)"] if reference else []), rows))
    save_json(args.json, {"command": command(), "machine": machine(dev), "results": results})
    return results


if __name__ == "__main__":
    main()
