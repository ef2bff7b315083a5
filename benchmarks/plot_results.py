"""benchmarks/results.png: training images/s and kNN accuracy per contender, from bench_e2e's --json.

    python benchmarks/bench_e2e.py --budget 600 --json /tmp/e2e.json
    python benchmarks/plot_results.py /tmp/e2e.json [/tmp/e2e_seed1.json ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"wrapssl": "#1f77b4", "wrapssl-compiled": "#17becf", "byol-pytorch": "#ff7f0e", "lightly": "#2ca02c",
           "random-init": "#7f7f7f"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("e2e_json", nargs="+", help="one or more --json files of bench_e2e (their runs are pooled)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.png")))
    args = ap.parse_args(argv)
    runs = [r for path in args.e2e_json for r in json.loads(Path(path).read_text())["runs"]]
    names = list(dict.fromkeys(r["contender"] for r in runs))
    by = {n: [r for r in runs if r["contender"] == n] for n in names}
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.5, 2.8), dpi=110)
    trained = [n for n in names if n != "random-init"]
    ips = [statistics.median(r["images_per_s"] for r in by[n]) for n in trained]
    a.bar(trained, ips, color=[COLOURS.get(n, "k") for n in trained])
    a.set_title("training images/s (median)", fontsize=9)
    a.set_ylim(0, 1.15 * max(ips))  # room for the value labels
    for i, v in enumerate(ips):
        a.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    knn = [100 * statistics.median(r["knn"] for r in by[n]) for n in names]
    b.bar(names, knn, color=[COLOURS.get(n, "k") for n in names])
    b.set_title("kNN top-1 % (k=200, t=0.1)", fontsize=9)
    b.set_ylim(max(0.0, min(knn) - 10), min(100.0, max(knn) + 5))
    for i, v in enumerate(knn):
        b.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        ax.tick_params(axis="y", labelsize=8)
    budget = statistics.median(r["train_s"] for n in trained for r in by[n])
    rounds = max(len(by[n]) for n in trained)
    fig.suptitle(f"BYOL on Fashion-MNIST, equal wall-clock (~{budget:.0f} s each), CPU, median of {rounds} round(s)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
