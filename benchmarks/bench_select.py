"""Time wrapssl.select.select and near_duplicates on synthetic embeddings; score picks against random on real ones.

    python benchmarks/bench_select.py --n 100000 --dim 128 --select 1000 --threshold 0.95
    python benchmarks/bench_select.py --train train.npz --test test.npz --budgets 100 1000

With ``--train``/``--test`` (labelled embeddings from ``wrapssl embed RUN --split
train/test``) it prints the quality table instead: for each budget, a linear
probe (``wrapssl.evaluate.linear_probe``) trained on the picked images' labels,
scored on the whole test split, per method, as mean ± half the min-max spread
over ``--draws`` seeds (random: seed = draw; the other methods: their seed).

Two kinds of data: "isotropic" Gaussian rows (the worst case for every pruning
bound: all directions equally likely) and "power-law" rows (100 clusters, per-dim
variance ∝ 1/k, the eigenspectrum shape reported for learned representations).
Into each, ``--dups`` rows are overwritten by noisy copies of other rows
(cosine ≈ 0.99), and the script checks that near_duplicates finds every one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wrapssl.evaluate import Embeddings, linear_probe  # noqa: E402
from wrapssl.select import coverage_radius, near_duplicates, select  # noqa: E402

QUALITY_METHODS = [("random", {"method": "random"}), ("kcenter", {"method": "kcenter"}),
                   ("kcenter+density", {"method": "kcenter", "weights": "density"}),
                   ("typiclust", {"method": "typiclust"}), ("probcover", {"method": "probcover"})]


def make_data(kind: str, n: int, dim: int, dups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows of the given kind with ``dups`` planted (source, copy) pairs."""
    g = torch.Generator().manual_seed(seed)
    if kind == "isotropic":
        x = torch.randn(n, dim, generator=g)
    else:
        centres = torch.randn(100, dim, generator=g)
        x = centres[torch.randint(100, (n,), generator=g)] + torch.randn(n, dim, generator=g)
        x = x * torch.arange(1, dim + 1).float().pow(-0.5)
    x = F.normalize(x, dim=1)
    rows = torch.randperm(n, generator=g)[: 2 * dups].view(2, dups)
    src, dst = rows[0], rows[1]
    x[dst] = F.normalize(x[src] + 0.1 / dim ** 0.5 * torch.randn(dups, dim, generator=g), dim=1)
    planted = torch.stack([torch.minimum(src, dst), torch.maximum(src, dst)], dim=1)
    return x, planted


def brute_force_pairs(x: torch.Tensor, threshold: float, block: int = 2048) -> set[tuple[int, int]]:
    """Every pair i < j with cosine >= threshold by a blockwise upper-triangle matmul (reference)."""
    out = set()
    for a in range(0, len(x), block):
        i, j = (x[a:a + block] @ x[a:].T >= threshold).nonzero(as_tuple=True)
        i, j = i + a, j + a
        keep = i < j
        out.update(zip(i[keep].tolist(), j[keep].tolist()))
    return out


def plain_greedy(x: torch.Tensor, n: int, first: int) -> list[int]:
    """Textbook k-center greedy, one full distance pass per pick (slow reference)."""
    d2 = torch.full((len(x),), float("inf"))
    chosen = [first]
    while True:
        d2 = torch.minimum(d2, (2 - 2 * (x @ x[chosen[-1]])).clamp_min(0))
        if len(chosen) == n:
            return chosen
        d2[chosen] = -1.0
        chosen.append(int(d2.argmax()))


def timed(fn, repeat: int):
    """(best wall time over ``repeat`` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def quality(train_path: str, test_path: str, budgets: list[int], draws: int, json_path: str | None) -> None:
    """Print the picked-against-random table (linear probe accuracy, %) on real labelled embeddings."""
    train, test = Embeddings.load_npz(train_path), Embeddings.load_npz(test_path)
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    print(f"train {train_path} ({len(train)} x {train.embeddings.shape[1]}), test {test_path} ({len(test)}); "
          f"draws={draws} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)
    rows = {}
    for n in budgets:
        for name, kw in QUALITY_METHODS:
            accs, secs = [], []
            for seed in range(draws):
                t = time.perf_counter()
                idx = select(train.embeddings, n, seed=seed, **kw).indices
                secs.append(time.perf_counter() - t)
                accs.append(100 * linear_probe(train.embeddings[idx], train.labels[idx], test.embeddings,
                                               test.labels, num_classes=classes))
            rows[(n, name)] = {"acc": accs, "seconds": secs}
            print(f"n={n} {name}: {' '.join(f'{a:.2f}' for a in accs)} ({max(secs):.1f} s)", flush=True)
    names = [name for name, _ in QUALITY_METHODS]
    print("\n| labels | " + " | ".join(names) + " |\n|---:|" + "---:|" * len(names))
    for n in budgets:
        base = sum(rows[(n, "random")]["acc"]) / draws
        cells = []
        for name in names:
            a = rows[(n, name)]["acc"]
            mean, half = sum(a) / draws, (max(a) - min(a)) / 2
            gain = "" if name == "random" else f" ({mean - base:+.1f})"
            cells.append(f"{mean:.1f} ± {half:.1f}{gain}")
        print(f"| {n:,} | " + " | ".join(cells) + " |")
    print("\nseconds per selection (slowest draw): " + "; ".join(
        f"n={n}: " + ", ".join(f"{name} {max(rows[(n, name)]['seconds']):.1f}" for name in names) for n in budgets))
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if json_path:
        Path(json_path).write_text(json.dumps({f"{n}/{name}": v for (n, name), v in rows.items()}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="number of embeddings")
    p.add_argument("--dim", type=int, default=128, help="embedding width")
    p.add_argument("--select", type=int, default=1000, help="subset size for select()")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine threshold for near_duplicates()")
    p.add_argument("--dups", type=int, default=500, help="planted near-duplicate pairs")
    p.add_argument("--data", nargs="+", default=["power-law", "isotropic"], choices=["power-law", "isotropic"])
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--verify", action="store_true",
                   help="also time and compare against plain greedy and brute-force pair search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", help="labelled train embeddings (.npz): print the picked-against-random table instead")
    p.add_argument("--test", help="labelled test embeddings (.npz) that the probes are scored on (with --train)")
    p.add_argument("--budgets", type=int, nargs="+", default=[100, 1000], help="labels to pick (with --train)")
    p.add_argument("--draws", type=int, default=3, help="seeds per method and budget (with --train)")
    p.add_argument("--json", help="also write the per-draw accuracies and timings here (with --train)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train or args.test:
        if not (args.train and args.test):
            p.error("--train and --test go together: the probes train on picks from one and are scored on the other")
        quality(args.train, args.test, args.budgets, args.draws, args.json)
        return

    print(f"n={args.n} dim={args.dim} select={args.select} threshold={args.threshold} dups={args.dups} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f}")
    print("| data | operation | seconds | result |\n|---|---|---:|---|")
    for kind in args.data:
        x, planted = make_data(kind, args.n, args.dim, args.dups, args.seed)
        for label, kw in [("select kcenter", {"method": "kcenter"}),
                          ("select kcenter, weights=density", {"method": "kcenter", "weights": "density"}),
                          ("select random (baseline)", {"method": "random"})]:
            secs, s = timed(lambda: select(x, args.select, seed=args.seed, **kw), args.repeat)
            radius = coverage_radius(x, s.indices)
            print(f"| {kind} | {label} | {secs:.2f} | coverage radius {radius:.3f} |", flush=True)
            if args.verify and "weights" not in kw and kw["method"] == "kcenter":
                secs, ref = timed(lambda: plain_greedy(x, args.select, int(s.indices[0])), 1)
                print(f"| {kind} | plain greedy (reference) | {secs:.2f} | same picks: {ref == s.indices.tolist()} |",
                      flush=True)
        secs, (pairs, sims) = timed(lambda: near_duplicates(x, args.threshold), args.repeat)
        found = {tuple(r) for r in pairs.tolist()}
        hit = sum(tuple(r) in found for r in planted.tolist())
        note = f"{len(found)} pairs, planted found {hit}/{len(planted)}"
        print(f"| {kind} | near_duplicates >= {args.threshold} | {secs:.2f} | {note} |", flush=True)
        if args.verify:
            secs, ref = timed(lambda: brute_force_pairs(x, args.threshold), 1)
            print(f"| {kind} | brute-force pairs (reference) | {secs:.2f} | same pairs: {found == ref} |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
