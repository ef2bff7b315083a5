"""Score pretraining runs at small label budgets (issue 19, part 4).

For each run folder written by `python train.py --out RUN`: embeds the Fashion-MNIST train and
test splits with the run's backbone (`wrapssl embed`, cached as RUN/emb-{train,test}.npz or in --cache), then
reports kNN (t=0.1, all 60k training images as memory) at k=20 and k=200, the linear probe
(`wrapssl.evaluate.linear_probe`) on all labels, and the linear probe on class-balanced draws of
10 and 100 labels per class (--draws draws, mean ± half the spread), beside the run's steps and
train_time_s from its metrics.json.

    python benchmarks/bench_recipe.py /tmp/h5/run-a /tmp/h5/run-b [--raw] [--json out.json]

--raw adds the raw-pixel row on the same protocol.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from wrapssl.evaluate import Embeddings, knn_accuracy, linear_probe


def balanced_draw(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` images of every class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                           for c in np.unique(labels)])


def budget_scores(train: Embeddings, test: Embeddings, budgets=(10, 100), draws: int = 3) -> dict[str, list[float]]:
    """Linear-probe accuracy (%) for each budget of labels per class, one value per draw."""
    y = train.labels.numpy()
    out = {}
    for per_class in budgets:
        accs = []
        for seed in range(draws):
            idx = torch.from_numpy(balanced_draw(y, per_class, seed))
            accs.append(100 * linear_probe(train.embeddings[idx], train.labels[idx], test.embeddings, test.labels))
        out[f"linear_{per_class}pc"] = accs
    return out


def score(train: Embeddings, test: Embeddings, draws: int, linear_all: float | None = None) -> dict:
    row = {f"knn_k{k}": 100 * knn_accuracy(train.embeddings, train.labels, test.embeddings, test.labels, k=k)
           for k in (20, 200)}
    row["linear_all"] = linear_all if linear_all is not None else \
        100 * linear_probe(train.embeddings, train.labels, test.embeddings, test.labels)
    row.update(budget_scores(train, test, draws=draws))
    return row


def embeddings(run: Path, split: str, cache: Path | None = None) -> Embeddings:
    path = (cache / f"{run.name}-{split}.npz") if cache else run / f"emb-{split}.npz"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "wrapssl", "embed", str(run), "--data", "fashion-mnist",
                        "--split", split, "--device", "cpu", "--out", str(path)], check=True, stderr=subprocess.DEVNULL)
    return Embeddings.load_npz(path)


def raw_row(draws: int) -> dict:
    from wrapssl.data import load_dataset
    from wrapssl.evaluate import raw_pixels
    train, test = (raw_pixels(load_dataset("fashion-mnist", 28, split=s)) for s in ("train", "test"))
    return score(train, test, draws)


def fmt(v) -> str:
    if isinstance(v, list):
        a = np.asarray(v)
        return f"{a.mean():.2f} ± {(a.max() - a.min()) / 2:.2f}"
    return "—" if v is None else f"{v:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--raw", action="store_true", help="also score raw pixels")
    p.add_argument("--cache", type=Path, help="folder for the embeddings (default: each run's folder)")
    p.add_argument("--json", type=Path, help="append the rows to this JSON file")
    args = p.parse_args()
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    rows = {}
    if args.raw:
        rows["raw pixels"] = raw_row(args.draws)
    for run in args.runs:
        metrics = json.loads((run / "metrics.json").read_text())
        lin = metrics.get("scores", {}).get("pretrained", {}).get("linear")  # the app's probe on all labels
        row = score(embeddings(run, "train", args.cache), embeddings(run, "test", args.cache), args.draws,
                    None if lin is None else 100 * lin)
        row.update(steps=metrics.get("steps"), train_time_s=metrics.get("train_time_s"))
        rows[run.name] = row
    print("| run | steps | train s | kNN k=20 | kNN k=200 | linear all | linear 10/class | linear 100/class |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = r.get("train_time_s")
        print(f"| {name} | {r.get('steps') or ''} | {'' if t is None else f'{t:.0f}'} | {fmt(r['knn_k20'])} | "
              f"{fmt(r['knn_k200'])} | {fmt(r['linear_all'])} | {fmt(r['linear_10pc'])} | {fmt(r['linear_100pc'])} |")
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        args.json.write_text(json.dumps({**old, **rows}, indent=1))


if __name__ == "__main__":
    main()
