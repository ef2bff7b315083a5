"""A stopped process cannot hang a multi-process run: the others end at the collective timeout with a clear error.

Each rank is a forked child of the test process with the environment torchrun gives (a process of its own, for real
signals and a real gloo group, without a new interpreter's imports); it runs the app's main() and exits as
`python -m wrapssl train` does: a message from SystemExit goes to stderr with code 1, a number is the exit code.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest

from conftest import free_port, reset_accelerate



def _rank(rank: int, port: int, args: list[str], err: str, stop_after_step: int | None) -> None:
    """One rank of a 2-process app run; stderr into the file ``err``; rank 1 stops itself (SIGSTOP, as a debugger,
    a full swap or a preempted node would) after ``stop_after_step``."""
    import torch

    from wrapssl import app
    from wrapssl.callbacks import Callback
    from wrapssl.trainer import Trainer

    os.environ.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    sys.stderr = open(err, "w", buffering=1)  # pytest's capture objects stay with the parent
    sys.stdout = open(os.devnull, "w")
    code = 1
    try:
        reset_accelerate()
        torch.set_num_threads(1)
        if stop_after_step is not None and rank == 1:
            class Stop(Callback):  # on the Trainer's public hook, after the step
                def due(self, step: int, last: bool) -> bool:
                    return step == stop_after_step

                def on_step(self, trainer, info) -> None:
                    os.kill(os.getpid(), signal.SIGSTOP)

            real = Trainer.__init__

            def init(self, *a, **k):
                real(self, *a, **k)
                self.add_callback(Stop())
            Trainer.__init__ = init
        app.main(args)
        code = 0
    except SystemExit as e:
        if isinstance(e.code, int):
            code = e.code
        elif e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)


def start_ranks(tmp_path: Path, args: list[str], stop_after_step: int | None = None) -> list:
    port = free_port()
    procs = []
    for rank in (0, 1):
        proc = multiprocessing.get_context("fork").Process(
            target=_rank, args=(rank, port, args, str(tmp_path / f"rank{rank}.err"), stop_after_step))
        proc.start()
        procs.append(proc)
    return procs


def stop_all(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)  # SIGKILL ends a stopped process too
            proc.join()


@pytest.mark.slow
def test_a_stopped_rank_ends_the_others_at_the_timeout(tmp_path):
    args = ["--data", "digits", "--image-size", "8", "--batch-size", "8", "--steps", "50", "--log-every", "1",
            "--knn-train", "50", "--knn-test", "20", "--knn-k", "5", "--no-plots", "--no-baselines",
            "--labels", "none", "--timeout", "5", "--out", str(tmp_path / "run")]
    procs = start_ranks(tmp_path, args, stop_after_step=2)
    try:
        start = time.time()
        procs[0].join(timeout=240)
        waited = time.time() - start
    finally:
        stop_all(procs)
    err = (tmp_path / "rank0.err").read_text()
    assert procs[0].exitcode == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: another process stopped answering") and "waited 5 s" in last
    assert "collective_timeout=" in last and "running the same command again continues the run" in last
    assert waited < 200


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_checkpoints_one_step_on_both(tmp_path):
    """SIGTERM reaches one rank (a cluster's reaches them at different moments): both agree on one step at the
    next log point, write its checkpoint once, exit with 143, and rank 0 alone prints the command that continues."""
    from wrapssl.checkpoints import latest_checkpoint, load_checkpoint

    out = tmp_path / "run"
    args = ["--data", "digits", "--image-size", "8", "--batch-size", "8", "--steps", "100000", "--log-every", "2",
            "--checkpoint-every", "3", "--knn-train", "50", "--knn-test", "20", "--knn-k", "5", "--eval-every",
            "100000", "--no-plots", "--no-baselines", "--labels", "none", "--out", str(out)]
    procs = start_ranks(tmp_path, args)
    try:
        deadline = time.time() + 180
        while latest_checkpoint(out) is None:
            assert all(p.is_alive() for p in procs), (tmp_path / "rank0.err").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)  # one rank hears it: the other must stop at the same step
        for p in procs:
            p.join(timeout=120)
    finally:
        stop_all(procs)
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in (0, 1)]
    assert [p.exitcode for p in procs] == [143, 143], errs[0][-2000:] + errs[1][-2000:]
    assert "Continue with:" in errs[0] and "Continue with:" not in errs[1]
    step = int(errs[0].split("at step ", 1)[1].split(";")[0])
    assert step % 2 == 0 and load_checkpoint(latest_checkpoint(out))["step"] == step  # a log point, saved
    assert "Traceback" not in errs[0] + errs[1]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_that_never_joins_ends_the_run_with_one_line_and_writes_nothing(tmp_path, rank):
    """The main machine waits for a second one that never starts (rank 0), or a second machine finds no main one
    (rank 1): after --timeout seconds, one `error:` line that says what to do, no traceback, no run folder."""
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank), "LOCAL_RANK": "0",
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", "wrapssl", "train", "--num-train-steps", "2", "--timeout", "3",
                           "--checkpoint-folder", str(out), "--labels", "none"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-2000:]
    assert last.startswith("error: the run's 2 processes did not all join within 3 s"), done.stderr[-2000:]
    assert "--machine_rank" in last and "collective_timeout" in last
    assert "Traceback" not in done.stderr and not out.exists()
