"""Ctrl-C and SIGTERM keep work: the app checkpoints the step it reached, exits with the signal's code and prints
the command that continues; that command ends with the weights of an uninterrupted run."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import reset_accelerate
from wrapssl import app, pretrain
from wrapssl.callbacks import Callback
from wrapssl.checkpoints import latest_checkpoint, load_checkpoint
from wrapssl.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RUN = ["--data", "digits", "--image-size", "8", "--batch-size", "16", "--knn-train", "200", "--knn-test", "50",
       "--knn-k", "5", "--log-every", "1", "--checkpoint-every", "4", "--no-plots", "--no-baselines",
       "--labels", "none"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Make the running app receive ``signum`` right after optimiser step ``step``, as from a terminal or a cluster:
    every Trainer gets a callback on its public hook that sends it."""
    class SendSignal(Callback):
        def due(self, at: int, last: bool) -> bool:
            return at == step

        def on_step(self, trainer, info) -> None:
            os.kill(os.getpid(), signum)

    real = Trainer.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.add_callback(SendSignal())
    monkeypatch.setattr(Trainer, "__init__", init)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_the_printed_command_continues_exactly(tmp_path, monkeypatch, capsys,
                                                                                signum):
    uninterrupted = app.main([*RUN, "--steps", "6", "--out", str(tmp_path / "whole")])
    reset_accelerate()
    signal_at(monkeypatch, 3, signum)
    with pytest.raises(SystemExit) as stopped:
        app.main([*RUN, "--steps", "6", "--out", str(tmp_path / "cut")])
    assert stopped.value.code == 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name} received: stopping after this step" in err
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-00000003.pt"  # not a checkpoint step: written
    assert load_checkpoint(tmp_path / "cut" / "checkpoint-00000003.pt")["step"] == 3
    command = err.split("Continue with:\n", 1)[1].strip().splitlines()[0]
    words = shlex.split(command)
    assert words[-1] == "--resume" and "Traceback" not in err
    monkeypatch.undo()
    reset_accelerate()
    start = words.index("--data")  # the program part (wrapssl train / python train.py) is how it was started
    resumed = app.main(words[start:])
    assert resumed["steps"] == 6 and resumed["weights_sha256"] == uninterrupted["weights_sha256"]


def test_ctrl_c_before_training_keeps_what_was_there(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain, "score_baselines", interrupted)
    with pytest.raises(SystemExit) as stopped:
        app.main([*RUN, "--steps", "2", "--out", str(tmp_path)])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT" in err and "--resume" in err and "Traceback" not in err


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, "0"), (signal.SIGINT, "2")])
def test_a_signal_to_python_train_py(tmp_path, signum, workers):
    """The real script in its own process group, signalled as a cluster (SIGTERM) or a terminal's Ctrl-C (SIGINT
    to the whole group, DataLoader workers included): it ends with 143 / 130, the latest checkpoint holds the
    step it names, and stderr has the command to continue, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "run"
    args = [*RUN, "--steps", "100000", "--checkpoint-every", "5", "--knn-train", "50", "--eval-every", "100000",
            "--num-workers", workers, "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    step = int(err.split(f"stopped by {signal.Signals(signum).name} at step ", 1)[1].split(";")[0])
    assert load_checkpoint(latest_checkpoint(out))["step"] == step
    command = err.split("Continue with:\n", 1)[1].strip().splitlines()[0]
    assert shlex.split(command) == ["python", str(REPO / "train.py"), *args, "--resume"]
