"""A run users can trust, through the app's entry point: re-running continues, other settings are refused,
--resume with more steps or a new lr rebuilds the schedule, and the folder's files never mix two runs."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import reset_accelerate
from wrapssl import app

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

# digits at 8 px, global batch 16: a step takes milliseconds; no warmup in an 8-step run (8 // 10 = 0)
RUN = ["--data", "digits", "--image-size", "8", "--batch-size", "16", "--knn-train", "200", "--knn-test", "50",
       "--knn-k", "5", "--log-every", "1", "--checkpoint-every", "2", "--no-plots", "--no-baselines",
       "--labels", "none"]


def run(out: Path, *extra: str) -> dict:
    """The app in this process, as `wrapssl train` runs it, on a fresh Accelerate state."""
    reset_accelerate()
    return app.main([*RUN, "--out", str(out), *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logged(folder: Path, name: str) -> dict[int, float]:
    """{step: value} of one logged quantity in metrics.csv."""
    with open(folder / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == name}


def cosine_lr(base: float, step: int, total: int) -> float:
    """The lr of optimiser step ``step`` (1-based) of a ``total``-step cosine without warmup, written out."""
    return base * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))


def test_the_same_command_again_continues_and_trains_nothing_more(tmp_path, capsys):
    first = run(tmp_path, "--steps", "4")
    files = {k: v for k, v in snapshot(tmp_path).items() if k.startswith("checkpoint-")}
    capsys.readouterr()
    again = run(tmp_path, "--steps", "4")
    out = capsys.readouterr().out
    assert "re-run with the same settings: resumed from" in out and "is complete (step 4)" in out
    assert again["steps"] == 4 and again["weights_sha256"] == first["weights_sha256"]
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("checkpoint-")} == files
    assert sorted(logged(tmp_path, "loss")) == [1, 2, 3, 4]  # no step logged twice


def test_more_steps_with_resume_rebuild_the_schedule(tmp_path, capsys):
    """An 4-step run extended to 8: steps 5-8 train at the lr of an 8-step cosine (not the old schedule's 0)."""
    first = run(tmp_path, "--steps", "4", "--baselines")  # the baselines give the report its "before"
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # without --resume, other settings are refused ...
        run(tmp_path, "--steps", "8", "--baselines")
    message = str(refused.value)
    assert message.startswith("error: ") and "\n" not in message
    assert "num_train_steps 4 -> 8" in message and "resume='auto'" in message and "checkpoint_folder" in message
    assert not (tmp_path / "checkpoint-00000006.pt").exists()
    extended = run(tmp_path, "--steps", "8", "--baselines", "--resume")  # ... and continued with them when asked
    assert "schedule rebuilt for the new settings (num_train_steps 4 -> 8" in capsys.readouterr().out.replace(
        "--steps", "num_train_steps")
    base = app.parse_args([]).learning_rate * 16 / 256
    lrs = logged(tmp_path, "lr")
    for step in range(1, 5):  # the first run's own 4-step schedule
        assert lrs[step] == pytest.approx(cosine_lr(base, step, 4), rel=1e-9)
    for step in range(5, 9):  # rebuilt: as if the run had been planned for 8 steps
        assert lrs[step] == pytest.approx(cosine_lr(base, step, 8), rel=1e-9) and lrs[step] > 0
    assert extended["steps"] == 8 and extended["weights_sha256"] != first["weights_sha256"]
    assert extended["knn_before"] == first["knn_before"]  # the report keeps the first run's "before"


def test_a_new_learning_rate_on_resume_is_used(tmp_path):
    run(tmp_path, "--steps", "2")
    run(tmp_path, "--steps", "4", "--lr", "0.01", "--resume")
    lrs, base = logged(tmp_path, "lr"), 0.01 * 16 / 256
    assert lrs[3] == pytest.approx(cosine_lr(base, 3, 4), rel=1e-9)
    assert lrs[4] == pytest.approx(cosine_lr(base, 4, 4), rel=1e-9)


def test_other_settings_into_a_used_out_change_nothing(tmp_path):
    run(tmp_path, "--steps", "4")
    before = snapshot(tmp_path)
    for other in (["--seed", "1"], ["--batch-size", "8"], ["--arch", "resnet18"], ["--method", "byol"]):
        with pytest.raises(SystemExit) as refused:
            run(tmp_path, "--steps", "4", *other)
        assert str(refused.value).startswith(f"error: {tmp_path} holds a run at step 4 of 4"), other
    assert snapshot(tmp_path) == before  # not a byte written: no truncated CSV, no pruned checkpoint


def test_resuming_from_an_older_checkpoint_is_refused(tmp_path):
    """Continuing from step 2 while step 4 exists would leave the later checkpoint as the folder's 'latest'."""
    run(tmp_path, "--steps", "4")
    with pytest.raises(SystemExit, match="after step 2 of checkpoint-00000002.pt, which you resume from"):
        run(tmp_path, "--steps", "4", "--resume", str(tmp_path / "checkpoint-00000002.pt"))


def test_a_damaged_or_diverged_checkpoint_is_refused_by_name(tmp_path):
    run(tmp_path, "--steps", "4")
    state = torch.load(tmp_path / "checkpoint-00000004.pt", weights_only=True)
    key = next(k for k, v in state["learner"].items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    state["learner"][key].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "checkpoint-00000004.pt")
    with pytest.raises(SystemExit) as refused:
        run(tmp_path, "--steps", "6", "--resume")
    message = str(refused.value)
    assert "holds NaN or infinite weights" in message and key in message and "checkpoint-00000002.pt" in message


def test_metrics_json_of_a_continued_run_keeps_its_arguments(tmp_path):
    run(tmp_path, "--steps", "2")
    run(tmp_path, "--steps", "3", "--resume")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 3 and saved["args"]["num_train_steps"] == 3 and saved["args"]["resume"] == "auto"
