"""One run per folder: a second run into a folder whose run is alive is refused with one line naming the holder;
after the holder is killed with SIGKILL the same command continues its run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import reset_accelerate, small_cnn
from wrapssl import Trainer
from wrapssl import app
from wrapssl.runs import RunLockedError

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

REPO = Path(__file__).resolve().parents[1]
# a flat folder of 8-px images (no labels: no kNN report, only the run), global batch 16: a step takes milliseconds
RUN = ["--image-size", "8", "--batch-size", "16", "--log-every", "1", "--checkpoint-every", "2", "--no-plots",
       "--steps", "4"]

# The app, stalled after its step-2 checkpoint (a marker file says it got there), as a run a scheduler would kill.
STALLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from wrapssl import app
    from wrapssl.trainer import Trainer

    save = Trainer.save_checkpoint
    def save_then_stall(self):
        path = save(self)
        Path(sys.argv[1]).write_text("saved")
        time.sleep(3600)
    Trainer.save_checkpoint = save_then_stall
    app.main(sys.argv[2:])
""")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def stalled_run(tmp_path):
    """(the process of a live run stalled after step 2 into tmp_path / 'run', its --out, the run's arguments)."""
    out, marker, images = tmp_path / "run", tmp_path / "saved", tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(torch.randint(0, 256, (48, 8, 8, 3), generator=torch.Generator().manual_seed(0))):
        Image.fromarray(image.numpy().astype(np.uint8)).save(images / f"{i:02d}.png")
    args = ["--data", str(images), *RUN, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", STALLED, str(marker), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its checkpoint:\n{proc.stdout.read().decode()[-3000:]}")
            if time.time() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.05)
        yield proc, out, args
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_run_into_a_live_runs_folder_is_refused_and_after_sigkill_the_same_command_continues(
        stalled_run, capsys):
    proc, out, args = stalled_run
    before = snapshot(out)
    assert (out / ".lock").read_text().splitlines()[0] == f"pid {proc.pid}"

    reset_accelerate()
    with pytest.raises(SystemExit) as refused:
        app.main(args)
    message = str(refused.value)
    assert message.startswith(f"error: {out} is being trained by process {proc.pid} on {socket.gethostname()} "
                              "since 20")
    assert message.endswith("; wait for it, stop it, or pick another checkpoint_folder") and "\n" not in message
    assert snapshot(out) == before  # the refused run wrote nothing: no metrics.csv, no checkpoint touched

    reset_accelerate()  # the library says the same in its own words
    with pytest.raises(RunLockedError, match=rf"is being trained by process {proc.pid} .* another checkpoint_folder"):
        Trainer(small_cnn(1, 8), dataset=torch.zeros(32, 1, 8, 8, dtype=torch.uint8), hidden_layer=-2,
                num_train_steps=4, batch_size=16, checkpoint_folder=out, log_with=["csv"], progress=False,
                plot=False, health_every=None)

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    capsys.readouterr()
    reset_accelerate()
    metrics = app.main(args)  # the same command, at once: the kernel freed the lock
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint-00000002.pt'} at step 2 of 4" in printed
    assert metrics["steps"] == 4 and (out / "backbone.pt").is_file()
    assert (out / ".lock").read_text() == ""  # the finished run let go of the folder


def test_trainers_of_one_process_share_the_lock_and_release_it_at_end(tmp_path):
    data = torch.zeros(32, 1, 8, 8, dtype=torch.uint8)

    def make() -> Trainer:
        reset_accelerate()
        return Trainer(small_cnn(1, 8), dataset=data, hidden_layer=-2, num_train_steps=1, batch_size=16,
                       checkpoint_folder=tmp_path, log_with=["csv"], progress=False, plot=False, health_every=None)
    first, second = make(), make()  # a script that builds a second Trainer to resume the first's run
    first.end()
    probe = [sys.executable, "-c", "import sys, fcntl; f = open(sys.argv[1], 'a'); "
             "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / ".lock")]
    assert subprocess.run(probe, capture_output=True).returncode != 0  # the second Trainer still holds it
    second.end()
    assert subprocess.run(probe, capture_output=True).returncode == 0
