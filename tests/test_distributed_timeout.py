"""A stopped process cannot hang a multi-process run: the others end at the collective timeout with a clear error."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One rank of a 2-process app run (the environment torchrun gives), where rank 1 stops itself (SIGSTOP, as a
# debugger, a full swap or a preempted node would) after its second step.
RANK = textwrap.dedent("""
    import os, signal, sys
    from wrapssl.trainer import Trainer
    from wrapssl.train import main

    real = Trainer._after_step
    def after_step(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.step == 2 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGSTOP)
    Trainer._after_step = after_step
    main(sys.argv[1:])
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_others_at_the_timeout(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    port = free_port()
    args = ["--data", "digits", "--image-size", "8", "--batch-size", "8", "--steps", "50", "--log-every", "1",
            "--knn-train", "50", "--knn-test", "20", "--knn-k", "5", "--no-plots", "--no-baselines",
            "--labels", "none", "--timeout", "5", "--out", str(tmp_path / "run")]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        start = time.time()
        _, err = procs[0].communicate(timeout=240)
        waited = time.time() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL ends a stopped process too
                proc.wait()
    assert procs[0].returncode == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: another process stopped answering") and "waited 5 s" in last
    assert "--timeout" in last and "running the same command again continues the run" in last
    assert waited < 200


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_checkpoints_one_step_on_both(tmp_path):
    """SIGTERM reaches one rank (a cluster's reaches them at different moments): both agree on one step at the
    next log point, write its checkpoint once, exit with 143, and rank 0 alone prints the command that continues."""
    from wrapssl.checkpoints import latest_checkpoint, load_checkpoint

    port, out = free_port(), tmp_path / "run"
    args = ["--data", "digits", "--image-size", "8", "--batch-size", "8", "--steps", "100000", "--log-every", "2",
            "--checkpoint-every", "3", "--knn-train", "50", "--knn-test", "20", "--knn-k", "5", "--eval-every",
            "100000", "--no-plots", "--no-baselines", "--labels", "none", "--out", str(out)]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        procs.append(subprocess.Popen([sys.executable, "-m", "wrapssl.train", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 180
        while latest_checkpoint(out) is None:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # one rank hears it: the other must stop at the same step
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [143, 143], errs[0][-2000:] + errs[1][-2000:]
    assert "Continue with:" in errs[0] and "Continue with:" not in errs[1]
    step = int(errs[0].split("at step ", 1)[1].split(";")[0])
    assert step % 2 == 0 and load_checkpoint(latest_checkpoint(out))["step"] == step  # a log point, saved
    assert "Traceback" not in errs[0] + errs[1]
