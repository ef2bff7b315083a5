"""What pretraining buys with few labels: accuracy at label budgets, against the trivial baselines.

One protocol everywhere (the training app's report, ``wrapssl evaluate``, metrics.json and
budget_curve.png). For each budget (e.g. 10 labels per class), several class-balanced draws of
labelled training images; on each draw four rows are scored on the whole test split:

- ``raw_pixels_linear``: a linear probe on the flattened images;
- ``scratch_finetuned``: the same net from its random start, trained on the draw (``finetune``);
- ``pretrained_linear``: a linear probe on the pretrained representation;
- ``pretrained_finetuned``: the pretrained net fine-tuned on the draw (``finetune``).

Each row is reported as the mean over draws with its spread (sample standard deviation, and
min/max). The linear probe is ``wrapssl.evaluate.linear_probe`` with its weight decay chosen by 3-fold
cross-validation on the draw's labelled images (``linear_probe_cv``): with 100 labels the all-label
protocol's weight decay underfits, and raw pixels and a learned representation want different values.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..checks import positive_int
from .embeddings import embed_dataset
from .metrics import linear_probe_cv
from .scores import raw_pixels

__all__ = ["Budget", "parse_budgets", "draw_labels", "label_budgets", "format_budgets", "report", "print_report",
           "fitting", "ROWS", "ROW_TITLES"]

ROWS = ("raw_pixels_linear", "scratch_finetuned", "pretrained_linear", "pretrained_finetuned")
ROW_TITLES = {"raw_pixels_linear": "raw pixels, linear", "scratch_finetuned": "from scratch, fine-tuned",
              "pretrained_linear": "pretrained, linear", "pretrained_finetuned": "pretrained, fine-tuned",
              "selected_linear": "picked by select, linear", "random_linear": "random picks, linear"}


@dataclass(frozen=True)
class Budget:
    """A number of labels: ``count`` per class, or ``count`` in all (spread over the classes as evenly as can be)."""

    count: int
    per_class: bool

    def __str__(self) -> str:
        return f"{self.count}/class" if self.per_class else str(self.count)

    def total(self, num_classes: int) -> int:
        """The labels this budget gives with ``num_classes`` classes."""
        return self.count * num_classes if self.per_class else self.count


def parse_budgets(values: str | Sequence[str]) -> list[Budget]:
    """Budgets from text: totals ("100") and per-class counts ("10/class"), comma- or space-separated; "none"
    gives no budget. ValueError naming the form for anything else."""
    parts = [p for v in ([values] if isinstance(values, str) else values) for p in str(v).replace(",", " ").split()]
    if [p.lower() for p in parts] == ["none"]:
        return []
    out = []
    for part in parts:
        text, per_class = (part[:-len("/class")], True) if part.endswith("/class") else (part, False)
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"--labels takes label counts: a total such as 100, or per class such as 10/class "
                             f"(or 'none'); got {part!r}")
        out.append(Budget(int(text), per_class))
    if not out:
        raise ValueError("--labels needs at least one count (e.g. 10/class 100/class), or 'none'")
    return sorted(set(out), key=lambda b: (b.per_class, b.count))


def draw_labels(labels: torch.Tensor, budget: Budget, seed: int = 0) -> list[int]:
    """A class-balanced random draw of ``budget`` indices among the labelled rows (label >= 0) of ``labels``.

    Per class: ``count`` of each class. A total: ``count // C`` of each class, the remainder one more
    for randomly chosen classes. ValueError (what is there, what to ask) when a class has too few.
    """
    labels = torch.as_tensor(labels).long()
    classes = sorted(int(c) for c in torch.unique(labels[labels >= 0]))
    if len(classes) < 2:
        raise ValueError("the labelled images hold fewer than two classes; a label budget needs at least two "
                         "classes (one subfolder per class)")
    g = torch.Generator().manual_seed(int(seed))
    want = {c: budget.count for c in classes} if budget.per_class else \
        {c: budget.count // len(classes) for c in classes}
    if not budget.per_class:
        if budget.count < len(classes):
            raise ValueError(f"a budget of {budget.count} labels leaves some of the {len(classes)} classes "
                             f"without a label; ask for at least {len(classes)} (or 1/class)")
        for i in torch.randperm(len(classes), generator=g)[:budget.count % len(classes)].tolist():
            want[classes[i]] += 1
    picked = []
    for c in classes:
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < want[c]:
            available = int((labels >= 0).sum())
            raise ValueError(f"budget {budget} asks for {want[c]} labels of class {c}, which has only {len(pool)} "
                             f"labelled images ({available} in all); ask for fewer labels")
        picked += pool[torch.randperm(len(pool), generator=g)[:want[c]]].tolist()
    return sorted(picked)


def _summary(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of the draws' accuracies, and the draws themselves."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "draws": list(values)}


def probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, num_classes: int | None = None
          ) -> float:
    """The few-label protocol's linear probe: ``linear_probe_cv`` (weight decay chosen on the labelled rows)."""
    return linear_probe_cv(x, y, xt, yt, num_classes=num_classes)[0]


def _linear(train: Any, test: Any, idx: list[int]) -> float:
    """Probe accuracy of the rows ``idx`` of ``train`` (Embeddings) on all of ``test``."""
    keep = test.labels >= 0
    c = int(max(train.labels.max(), test.labels.max())) + 1
    return probe(train.embeddings[idx], train.labels[idx], test.embeddings[keep], test.labels[keep], num_classes=c)


def label_budgets(memory: Dataset, queries: Dataset, budgets: Sequence[Budget], *, draws: int = 3, seed: int = 0,
                  pretrained: Any = None, scratch: nn.Module | None = None, embeddings: tuple[Any, Any] | None = None,
                  raw: tuple[Any, Any] | None = None, image_size: int | None = None, settings: Any = None,
                  rows: Sequence[str] = ROWS, log: Callable[[str], None] = print,
                  device: str | torch.device | None = None) -> dict[str, Any]:
    """Score every row of ``rows`` at every budget over ``draws`` class-balanced draws of ``memory``'s labels.

    ``pretrained``: a ``Backbone`` (the fine-tuned rows copy its net; the net itself is never changed);
    ``scratch``: the same architecture at its random start; ``embeddings``: the pretrained
    representation of (memory, queries), else computed; ``raw``: raw-pixel Embeddings of both, else
    computed at ``image_size``. ``settings``: the ``FinetuneSettings`` of the fine-tuned rows.
    The fine-tunings run in this process
    alone (on ``device``), also under ``accelerate launch``, where the others wait. Returns JSON-able results.
    """
    from ..backbone import Backbone
    from ..finetune import FinetuneSettings, dataset_labels, finetune

    draws = positive_int(draws, "draws")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose among {list(ROWS)}")
    labels = dataset_labels(memory)
    settings = settings or FinetuneSettings()
    if "pretrained_linear" in rows and embeddings is None:
        log("label budgets: embedding the training and test images with the pretrained net ...")
        with pretrained.embedder() as embedder:
            embeddings = (embed_dataset(embedder, memory, 512), embed_dataset(embedder, queries, 512))
    if "raw_pixels_linear" in rows and raw is None:
        raw = (raw_pixels(memory, image_size), raw_pixels(queries, image_size))
    results = []
    num_classes = len(torch.unique(labels[labels >= 0]))
    for budget in sorted(budgets, key=lambda b: (b.total(num_classes), b.per_class)):
        scores: dict[str, list[float]] = {}
        for draw in range(draws):
            idx = draw_labels(labels, budget, seed=seed + draw)
            subset = Subset(memory, idx)
            row: dict[str, float] = {}
            if "raw_pixels_linear" in rows:
                row["raw_pixels_linear"] = _linear(raw[0], raw[1], idx)
            if "pretrained_linear" in rows:
                row["pretrained_linear"] = _linear(embeddings[0], embeddings[1], idx)
            if "scratch_finetuned" in rows and scratch is not None:
                net = copy.deepcopy(scratch)
                row["scratch_finetuned"] = finetune(
                    net, subset, queries, settings=settings, backbone_lr_ratio=1.0, linear_init=False,
                    image_size=image_size or (pretrained.info.image_size if pretrained is not None else None),
                    progress=False, seed=settings.seed + draw, local=True, device=device).test_accuracy
            if "pretrained_finetuned" in rows and pretrained is not None:
                copy_of = Backbone(copy.deepcopy(pretrained.net), pretrained.hidden_layer, pretrained.info,
                                   pretrained.folder)
                row["pretrained_finetuned"] = finetune(copy_of, subset, queries, settings=settings,
                                                       image_size=image_size, progress=False,
                                                       seed=settings.seed + draw, local=True,
                                                       device=device).test_accuracy
            for k, v in row.items():
                scores.setdefault(k, []).append(float(v))
            log(f"label budget {budget}, draw {draw + 1}/{draws}: " +
                ", ".join(f"{ROW_TITLES.get(k, k)} {100 * v:.1f}%" for k, v in row.items()))
        results.append({"budget": str(budget), "labels": len(idx),
                        "rows": {k: _summary(v) for k, v in scores.items()}})
    return {"protocol": {"draws": draws, "seed": seed, "test_images": int((dataset_labels(queries) >= 0).sum()),
                         "linear": "wrapssl.evaluate.linear_probe_cv",
        "finetune": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}},
        "budgets": results, "titles": dict(ROW_TITLES)}


def _cell(row: dict[str, Any] | None) -> str:
    """mean ± std in percent, or '-' for a row that was not scored."""
    return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}%" if row else "-"


def format_budgets(result: dict[str, Any]) -> str:
    """The budgets as an aligned text table: one line per budget, mean ± standard deviation in percent."""
    budgets = result.get("budgets", [])
    if not budgets:
        return "(no label budgets)"
    columns = [r for r in (*ROWS, "selected_linear", "random_linear") if any(r in b["rows"] for b in budgets)]
    heads = [ROW_TITLES.get(c, c) for c in columns]
    widths = [max(len(h), 13) for h in heads]
    lines = ["labels".ljust(16) + "".join(f"  {h:>{w}}" for h, w in zip(heads, widths))]
    for b in budgets:
        cells = "".join(f"  {_cell(b['rows'].get(c)):>{w}}" for c, w in zip(columns, widths))
        name = str(b["labels"]) + (f" ({b['budget']})" if b["budget"] != str(b["labels"]) else "")
        lines.append(name.ljust(16) + cells)
    return "\n".join(lines)


def fitting(budgets: Sequence[Budget], labels: torch.Tensor) -> tuple[list[Budget], list[Budget], int]:
    """(the budgets every class has enough labelled images for, the others, the smallest class's count)."""
    labels = torch.as_tensor(labels).long()
    counts = torch.bincount(labels[labels >= 0])
    counts = counts[counts > 0]
    smallest = int(counts.min()) if len(counts) else 0
    fits = [b for b in budgets if len(counts) >= 2 and
            (b.count if b.per_class else -(-b.count // len(counts))) <= smallest]
    return fits, [b for b in budgets if b not in fits], smallest


def report(memory: Dataset, queries: Dataset, budgets: Sequence[Budget], backbone: Any, *, draws: int = 3,
           seed: int = 0, embeddings: tuple[Any, Any] | None = None, image_size: int | None = None,
           finetune_steps: int = 300, baselines: bool = True, selection: bool = True,
           log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The few-label report of the app and of `wrapssl evaluate`: ``label_budgets`` with every row (the net from
    scratch is ``backbone``'s architecture at its random start with ``seed``), and for each budget the images
    `wrapssl select` picks (its default method) against random picks; None when no budget fits the labels.
    ``baselines=False`` leaves out the raw-pixel and from-scratch rows."""
    from ..backbone import random_init
    from ..finetune import FinetuneSettings, dataset_labels
    from ..select import DEFAULT_METHOD, compare_with_random

    fits, skipped, smallest = fitting(budgets, dataset_labels(memory))
    if skipped:
        log(f"note: label budgets {', '.join(map(str, skipped))} skipped: the smallest class has {smallest} "
            "labelled training images")
    if not fits:
        return None
    log(f"scoring label budgets ({', '.join(map(str, fits))}; {_draws(draws)} of labelled images each) ...")
    rows = ROWS if baselines else ("pretrained_linear", "pretrained_finetuned")
    result = label_budgets(memory, queries, fits, draws=draws, seed=seed, pretrained=backbone,
                           scratch=random_init(backbone, seed) if baselines else None, embeddings=embeddings,
                           image_size=image_size, rows=rows, log=lambda m: None,
                           settings=FinetuneSettings(steps=finetune_steps, seed=seed))
    if selection:
        if embeddings is None:
            with backbone.embedder() as embedder:
                embeddings = (embed_dataset(embedder, memory, 512), embed_dataset(embedder, queries, 512))
        picks = {}
        for entry in result["budgets"]:
            n = entry["labels"]
            picks[str(n)] = found = compare_with_random(embeddings[0], embeddings[1], n, method=DEFAULT_METHOD,
                                                        draws=draws, seed=seed, probe=probe)
            entry["rows"]["selected_linear"] = _summary([found["picked"]])
            entry["rows"]["random_linear"] = _summary(list(found["random"]))
        result["selection"] = {"method": DEFAULT_METHOD, "budgets": picks}
    return result


def _draws(n: int) -> str:
    """'1 class-balanced draw', '3 class-balanced draws'."""
    return f"{n} class-balanced draw{'s' if n != 1 else ''}"


def print_report(result: dict[str, Any], test_images: int, log: Callable[[str], None] = print) -> None:
    """The few-label table, and the picks against random, as a user reads them."""
    draws = result["protocol"]["draws"]
    log(f"test accuracy with few labels (mean ± standard deviation over {_draws(draws)}; {test_images} test "
        "images):")
    log(format_budgets(result))
    method = (result.get("selection") or {}).get("method")
    for n, found in ((result.get("selection") or {}).get("budgets") or {}).items():
        log(f"{n} labels picked by `wrapssl select` ({method}): linear {100 * found['picked']:.1f}% against "
            f"{100 * found['random_mean']:.1f}% for random picks ({100 * found['gain']:+.1f} points)")
