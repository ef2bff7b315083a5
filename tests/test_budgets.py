"""The few-label protocol: class-balanced draws, the rows, their summary, the report in the app."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from wrapssl.evaluate.budgets import Budget, draw_labels, format_budgets, label_budgets, parse_budgets
from wrapssl.data import TensorImages
from wrapssl.evaluate import Embeddings, linear_probe, linear_probe_cv


def test_parse_budgets():
    assert parse_budgets(["10/class", "100"]) == [Budget(100, False), Budget(10, True)]
    assert parse_budgets("10/class,100/class") == [Budget(10, True), Budget(100, True)]
    assert parse_budgets(["none"]) == []
    for bad in (["ten"], ["0"], ["-5/class"], ["10/klass"], []):
        with pytest.raises(ValueError):
            parse_budgets(bad)


@pytest.mark.parametrize("budget", [Budget(3, True), Budget(17, False), Budget(4, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_draws_are_class_balanced(budget, seed):
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (300,), generator=g)
    labels[::7] = -1  # unlabelled rows are never drawn
    idx = draw_labels(labels, budget, seed)
    assert len(set(idx)) == len(idx) == budget.total(4)
    counts = [sum(1 for i in idx if labels[i] == c) for c in range(4)]  # a loop, not bincount
    if budget.per_class:
        assert counts == [budget.count] * 4
    else:
        assert max(counts) - min(counts) <= 1 and sum(counts) == budget.count
    assert all(labels[i] >= 0 for i in idx)
    assert draw_labels(labels, budget, seed) == idx  # seeded
    assert draw_labels(labels, budget, seed + 10) != idx


def test_draw_errors_name_the_fix():
    labels = torch.tensor([0] * 5 + [1] * 50)
    with pytest.raises(ValueError, match="class 0, which has only 5"):
        draw_labels(labels, Budget(6, True))
    with pytest.raises(ValueError, match="at least 2"):
        draw_labels(labels, Budget(1, False))
    with pytest.raises(ValueError, match="two classes"):
        draw_labels(torch.zeros(10, dtype=torch.long), Budget(1, True))


def _blobs(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(3, dim, generator=g)[y] * 2 + torch.randn(n, dim, generator=g), y


def test_linear_rows_against_a_naive_computation():
    """The raw-pixel and pretrained linear rows equal the probe run by hand on the same draws."""
    x, y = _blobs(90, 8, 0)
    xt, yt = _blobs(60, 8, 1)
    images = (torch.rand(90, 1, 4, 4) * 255).to(torch.uint8)
    test_images = (torch.rand(60, 1, 4, 4) * 255).to(torch.uint8)
    memory, queries = TensorImages(images, y), TensorImages(test_images, yt)
    emb = (Embeddings(x, y, [str(i) for i in range(90)]), Embeddings(xt, yt, [str(i) for i in range(60)]))
    result = label_budgets(memory, queries, [Budget(4, True), Budget(9, False)], draws=3, seed=7, embeddings=emb,
                           rows=("raw_pixels_linear", "pretrained_linear"), log=lambda m: None)
    assert [b["labels"] for b in result["budgets"]] == [9, 12]  # ordered by the number of labels
    for entry, budget in zip(result["budgets"], [Budget(9, False), Budget(4, True)]):
        want_pre, want_raw = [], []
        for draw in range(3):
            idx = draw_labels(y, budget, seed=7 + draw)
            want_pre.append(linear_probe_cv(x[idx], y[idx], xt, yt)[0])
            flat, flat_t = images.float().div(255).flatten(1), test_images.float().div(255).flatten(1)
            want_raw.append(linear_probe_cv(flat[idx], y[idx], flat_t, yt)[0])
        for row, want in (("pretrained_linear", want_pre), ("raw_pixels_linear", want_raw)):
            got = entry["rows"][row]
            assert got["draws"] == pytest.approx(want)
            assert got["mean"] == pytest.approx(statistics.mean(want))
            assert got["std"] == pytest.approx(statistics.stdev(want))
            assert (got["min"], got["max"]) == (pytest.approx(min(want)), pytest.approx(max(want)))
    text = format_budgets(result)
    assert "12 (4/class)" in text and "pretrained, linear" in text
    mean = result["budgets"][1]["rows"]["pretrained_linear"]["mean"]
    assert f"{100 * mean:.1f} ±" in text
    json.dumps(result)  # metrics.json takes it as it is


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """Digits as PNG files in one subfolder per class, as a user's labelled photos would be."""
    from PIL import Image
    from wrapssl.data import load_dataset
    root = tmp_path_factory.mktemp("digits")
    data = load_dataset("digits", 16)
    counts: dict[int, int] = {}
    for i in range(len(data)):
        image, label = data[i]
        if label >= 4 or counts.get(label, 0) >= 40:
            continue
        counts[label] = counts.get(label, 0) + 1
        (root / f"class{label}").mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).save(root / f"class{label}" / f"{i}.png")
    return root


def test_the_few_label_probe_chooses_its_weight_decay_on_the_training_rows_only():
    x, y = _blobs(60, 30, 2)
    x = x + 3 * torch.randn(60, 30, generator=torch.Generator().manual_seed(9))  # noisy: regularising pays
    xt, yt = _blobs(200, 30, 3)
    acc, wd = linear_probe_cv(x, y, xt, yt)
    # a naive second computation: the same 3 folds, every weight decay, the best mean held-out accuracy
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    folds = order.chunk(3)
    held_out = {}
    for w in (1e-4, 1e-3, 1e-2, 1e-1):
        right = 0
        for k in range(3):
            fit = torch.cat([f for j, f in enumerate(folds) if j != k])
            right += linear_probe(x[fit], y[fit], x[folds[k]], y[folds[k]], weight_decay=w) * len(folds[k])
        held_out[w] = right
    assert wd == max(held_out, key=lambda w: (held_out[w], -w))
    assert acc == pytest.approx(linear_probe(x, y, xt, yt, weight_decay=wd))
    # the test labels play no part in the choice
    assert linear_probe_cv(x, y, xt, yt[torch.randperm(200)])[1] == wd


def test_the_app_reports_label_budgets_on_a_folder(tmp_path, digit_folder):
    """`wrapssl train` on a folder with class subfolders ends with the few-label rows, in metrics.json and
    budget_curve.png; a budget the smallest class cannot fill is skipped with a note."""
    from wrapssl.app import main
    metrics = main(["--data", str(digit_folder), "--image-size", "16", "--steps", "2", "--batch-size", "32",
                    "--labels", "3/class", "500/class", "--draws", "2", "--finetune-steps", "3",
                    "--out", str(tmp_path / "run"), "--eval-every", "2", "--knn-k", "20", "--no-plots"])
    budgets = metrics["label_budgets"]["budgets"]
    assert [b["labels"] for b in budgets] == [12]  # 500/class does not fit 32 training images per class
    rows = budgets[0]["rows"]
    assert set(rows) >= {"raw_pixels_linear", "scratch_finetuned", "pretrained_linear", "pretrained_finetuned",
                         "selected_linear", "random_linear"}
    assert all(len(rows[r]["draws"]) == 2 for r in ("raw_pixels_linear", "pretrained_finetuned"))
    picks = metrics["label_budgets"]["selection"]["budgets"]["12"]
    assert picks["n"] == 12 and rows["selected_linear"]["mean"] == picks["picked"]
    assert rows["random_linear"]["draws"] == picks["random"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["label_budgets"] == json.loads(json.dumps(metrics["label_budgets"]))


def test_evaluate_adds_the_rows_and_the_curve(tmp_path):
    """`wrapssl evaluate RUN --labels ...` on a built-in set: the rows in scores.json, budget_curve.png beside."""
    from wrapssl.archs import build_arch
    from wrapssl.backbone import BackboneInfo, save_backbone
    from wrapssl.cli import main
    torch.manual_seed(0)
    net, _ = build_arch("small_resnet", channels=3, num_classes=10, image_size=16)
    save_backbone(net, tmp_path, BackboneInfo(arch="small_resnet", image_size=16, channels=3,
                                              mean=[0.5] * 3, std=[0.25] * 3))
    main(["evaluate", str(tmp_path), "--data", "digits", "--labels", "2/class", "--draws", "2",
          "--finetune-steps", "2", "--no-baselines"])
    scores = json.loads((tmp_path / "scores.json").read_text())
    rows = scores["label_budgets"]["budgets"][0]["rows"]
    assert scores["label_budgets"]["budgets"][0]["labels"] == 20
    assert {"pretrained_linear", "pretrained_finetuned"} <= set(rows) and "raw_pixels_linear" not in rows
    assert (tmp_path / "budget_curve.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_processes_end_with_the_few_label_report(tmp_path):
    """Under `accelerate launch` with 2 processes, rank 0 scores the label budgets alone (no collective inside:
    the fine-tunings run locally) while rank 1 waits; the run ends with the rows."""
    import os
    import sys
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "wrapssl", "train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--knn-k", "20",
           "--labels", "2/class", "--draws", "1", "--finetune-steps", "2", "--no-plots", "--out", str(out)]
    from conftest import run_in_own_session
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    code, stdout, stderr = run_in_own_session(cmd, tmp_path, env, timeout=240)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    rows = metrics["label_budgets"]["budgets"][0]["rows"]
    assert {"pretrained_finetuned", "scratch_finetuned", "selected_linear"} <= set(rows)
