"""What a new user meets first (issue 20): a tiny run's outputs, refusals, imports, versions and messages."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import reset_accelerate

STEPS = 12


def _images(folder: Path, n: int, seed: int) -> None:
    """n small random PNGs of a few odd sizes in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 18 + i % 5, 20 + i % 3
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A labelled folder (two class subfolders) and a flat, unlabelled one."""
    root = tmp_path_factory.mktemp("data")
    _images(root / "labelled" / "a", 8, 0)
    _images(root / "labelled" / "b", 8, 1)
    _images(root / "flat", 10, 2)
    return {"labelled": root / "labelled", "flat": root / "flat"}


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> dict:
    """A tiny finished `wrapssl train --no-baselines --no-plots` run on the labelled folder: its folder and what it printed."""
    import torch

    from wrapssl import app

    out = tmp_path_factory.mktemp("runs") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            app.main(["--data", str(data["labelled"]), "--image-size", "16", "--batch-size", "4", "--steps",
                      str(STEPS), "--knn-k", "3", "--no-baselines", "--no-plots", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    return {"out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_no_baselines_scores_neither_baseline(run):
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"pretrained"}
    assert "knn_before" not in metrics
    assert "random init" not in run["stdout"] and "raw pixels" not in run["stdout"]
    assert "scoring" not in run["stdout"]
    assert "pretrained" in run["stdout"]  # the report itself is still printed


def test_evaluate_refuses_unlabelled_data_before_embedding(run, data, capsys):
    from wrapssl import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["evaluate", str(run["out"]), "--data", str(data["flat"]), "-k", "3"])
    err = capsys.readouterr().err
    message = str(done.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "wrapssl plot" in message and "wrapssl select" in message and "subfolder" in message
    assert "embedding" not in err  # refused before any image was embedded


def test_the_first_unreadable_file_warning_starts_its_own_line(tmp_path, capsys):
    import sys
    import warnings

    from tqdm import tqdm

    from wrapssl.data import ImageFolder

    _images(tmp_path, 2, 3)
    (tmp_path / "9.png").write_bytes(b"not an image")
    dataset = ImageFolder(tmp_path, image_size=16)
    with warnings.catch_warnings(), tqdm(total=3, desc="pretraining", file=sys.stderr) as bar:
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        bar.update(1)
        dataset[2]  # the bad file: warned about, replaced by a readable one
        bar.update(1)
    err = capsys.readouterr().err
    shown = err[:err.index("RuntimeWarning")].replace("\r", "\n").split("\n")[-1]
    assert "pretraining" not in shown and "%|" not in shown, repr(shown)  # not glued to the bar's line
    assert err.count("pretraining") >= 2  # the bar is drawn again after the warning


def _plain_mode(folder: Path) -> int:
    """The permissions a plain open() gives a new file here."""
    probe = folder / "probe-plain-open"
    probe.write_text("")
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


def test_every_file_a_run_writes_has_the_permissions_of_a_plain_open(run, tmp_path):
    expected = _plain_mode(tmp_path)
    modes = {str(p.relative_to(run["out"])): oct(p.stat().st_mode & 0o777)
             for p in run["out"].rglob("*") if p.is_file()}
    assert {"backbone.pt", "backbone.safetensors", "metrics.json"} <= set(modes)
    assert modes == {name: oct(expected) for name in modes}


def test_a_file_moved_into_place_gets_the_permissions_of_a_plain_open(tmp_path):
    import os
    import tempfile

    from wrapssl.files import atomic_move

    fd, scratch = tempfile.mkstemp(dir=tmp_path)  # 0o600, as a writer's scratch file has
    os.close(fd)
    moved = atomic_move(scratch, tmp_path / "weights.bin")
    assert moved.stat().st_mode & 0o777 == _plain_mode(tmp_path)


def _python(code: str, *args: str, cwd: Path | None = None, env: dict | None = None):
    """Run ``python -c code`` in a fresh interpreter; returns the finished process."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env if env is not None else dict(os.environ))


def test_import_wrapssl_changes_no_environment_variable():
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = _python("import json, os\nbefore = dict(os.environ)\nimport wrapssl\n"
                   "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {}


class ShapeError(Exception):
    """A user's exception type whose constructor takes two required arguments."""

    def __init__(self, got, expected):
        super().__init__(f"got {got}, expected {expected}")
        self.got, self.expected = got, expected


@pytest.mark.parametrize("error", [lambda shape: ShapeError(shape, "(B, 3, 32, 32)"),
                                   lambda shape: ValueError(f"got {shape}")])
def test_a_nets_own_exception_keeps_its_type_and_gains_context(error):
    import traceback

    from torch import nn

    from wrapssl import Learner

    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            raise error(tuple(x.shape))

    with pytest.raises((ShapeError, ValueError)) as info:
        Learner(Picky(), image_size=16)
    expected = type(error((1,)))
    assert type(info.value) is expected
    shown = "".join(traceback.format_exception(info.value))
    assert "got (" in shown and "Check image_size" in shown  # the net's words and the Learner's advice
    if expected is ShapeError:
        assert info.value.expected == "(B, 3, 32, 32)"  # the very exception the net raised


HEAVY = ("torch", "torchvision", "accelerate", "kornia")
RUNNER = """
import contextlib, io, json, sys
from wrapssl.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([out.getvalue(), code, [m for m in %r if m in sys.modules]])
print(json.dumps(results))
""" % (HEAVY,)


def test_help_and_version_answer_without_loading_torch():
    import wrapssl

    commands = ["embed", "evaluate", "finetune", "plot", "select", "shards"]
    asked = [["--version"], ["train", "--version"], ["--help"], ["train", "--help"]] + [[c, "--help"] for c in commands]
    done = _python(RUNNER, json.dumps(asked))
    assert done.returncode == 0, done.stderr
    (version, code_v, _), (train_version, code_t, _), (help_text, code_h, _), (train_help, code_th, _), *each = \
        json.loads(done.stdout)
    assert version == train_version == f"wrapssl {wrapssl.__version__}\n" and code_v == code_t == 0
    assert help_text.startswith("usage: wrapssl") and "train" in help_text and code_h == 0
    assert train_help.startswith("usage: wrapssl train") and "--num-train-steps" in train_help and code_th == 0
    for command, (text, code, _) in zip(commands, each):
        assert text.startswith(f"usage: wrapssl {command}") and code == 0, command
    loaded = each[-1][2]  # after every answer above
    assert loaded == []  # the heavy libraries load when a command runs, not for --help or --version


def test_the_training_app_prints_its_version(capsys):
    import wrapssl
    from wrapssl import app

    with pytest.raises(SystemExit) as done:
        app.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"wrapssl {wrapssl.__version__}\n"


def test_the_script_of_a_checkout_runs_from_the_folder_that_holds_it(tmp_path):
    """Beside a clone named wrapssl, `python wrapssl/train.py`, `python -m wrapssl.train` (the app's old name) and
    `python -m wrapssl train` all run the clone's app (its package beside the script), not a half-imported one."""
    import os
    import shutil
    import subprocess
    import sys

    import wrapssl

    repo = Path(__file__).resolve().parents[1]
    checkout = tmp_path / "wrapssl"  # as `git clone ... wrapssl` makes it: no __init__.py at its top
    checkout.mkdir()
    shutil.copy(repo / "train.py", checkout / "train.py")
    (checkout / "wrapssl").symlink_to(repo / "wrapssl", target_is_directory=True)
    commands = ([os.path.join("wrapssl", "train.py")], ["-m", "wrapssl.train"], ["-m", "wrapssl", "train"])
    for command in commands:
        for flag, expected in (("--version", f"wrapssl {wrapssl.__version__}\n"), ("--help", "usage: wrapssl train")):
            done = subprocess.run([sys.executable, *command, flag], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=120, env=dict(os.environ))
            assert done.returncode == 0 and done.stdout.startswith(expected), (command, done.stderr[-800:])


def test_the_first_steps_give_an_estimate_of_the_runs_time(run):
    import re

    from wrapssl.monitor import ESTIMATE_AFTER

    lines = [line for line in run["stdout"].splitlines() if "s per step" in line]
    assert len(lines) == 1, run["stdout"]
    found = re.fullmatch(r"wrapssl: ([\d.e+-]+) s per step: about (\d+) s for the (\d+) steps left at this speed "
                         r"\(evaluations and checkpoints not counted\)", lines[0].strip())
    assert found, lines[0]
    per_step, total, left = float(found[1]), int(found[2]), int(found[3])
    assert left == STEPS - ESTIMATE_AFTER and 0 < per_step < 30
    assert abs(total - per_step * left) <= 0.5 + 0.01 * total  # the total is the speed times the steps left


def test_the_loss_curve_is_three_readable_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from wrapssl import plots
    from wrapssl.health import COLLAPSE_RANK, COLLAPSE_STD

    steps = range(0, 300, 10)
    history = {"loss": [(s, 1.938 - 1e-4 * s + 1e-3 * ((s // 10) % 3)) for s in steps],  # down 1.6%, with noise
               "lr": [(s, 1e-3) for s in steps], "momentum": [(s, 0.99) for s in steps],
               "images_per_s": [(s, 300.0) for s in steps], "train_minutes": [(s, s / 60) for s in steps],
               "knn": [(0, 0.71), (150, 0.78), (290, 0.8)], "rank": [(150, 40.0), (290, 55.0)],
               "embedding_std": [(150, 0.05), (290, 0.06)]}
    fig = plots.loss_curve_figure(history, dim=128)
    loss, knn, health = fig.axes[:3]
    assert len(fig.axes) == 4 and fig.axes[3].get_ylabel().startswith("spread")  # health's second scale
    low, high = loss.get_ylim()
    assert (1.938 - 1.909) / (high - low) < 0.2  # a 1.6% drift fills a small part of the axis, not all of it
    lo, hi = knn.get_ylim()
    assert "%" in knn.get_ylabel() and 0 <= lo <= 71 - 5 and 80 + 5 <= hi <= 100
    assert [y for y in knn.get_lines()[0].get_ydata()] == pytest.approx([71, 78, 80])
    levels = {round(float(line.get_ydata()[0]), 6) for ax in fig.axes[2:] for line in ax.get_lines()
              if len(set(line.get_ydata())) == 1}
    assert {COLLAPSE_RANK, round(COLLAPSE_STD / 128 ** 0.5, 6)} <= levels  # the collapse thresholds are drawn
    saved = plots.loss_curve(history, tmp_path / "loss_curve.png", dim=128)
    assert saved.stat().st_mode & 0o777 == _plain_mode(tmp_path)
