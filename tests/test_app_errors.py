"""Every bad argument of the app (app.py) and of the wrapssl command ends it with one `error: ...` line that
names the fix, before any heavy work (no data read for the report, no kNN, no training), and without a
traceback; so do a diverging run, a full disk and an --out that cannot be written."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reset_accelerate
from wrapssl import cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--image-size", "8", "--batch-size", "16", "--knn-train", "100", "--knn-test", "50",
        "--knn-k", "5", "--no-plots", "--no-baselines", "--labels", "none"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def train_script():
    """The top-level train.py, whose main() is what `python train.py` runs."""
    spec = importlib.util.spec_from_file_location("wrapssl_train_script_errors", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(run, capsys) -> str:
    """Run ``run()``; it must exit non-zero with one error line (as SystemExit text or on stderr) and no work done."""
    with pytest.raises(SystemExit) as done:
        run()
    captured = capsys.readouterr()
    text = done.value.code if isinstance(done.value.code, str) else captured.err.strip()
    assert done.value.code not in (0, None)
    assert text.count("\n") == 0 and "error: " in text and "Traceback" not in captured.err, text
    assert "scoring" not in captured.out and "pretraining" not in captured.err  # nothing heavy ran
    return text


ArgCase = namedtuple("ArgCase", "args expected")
APP_CASES = [
    ArgCase(["--batch-size", "1"], "--batch-size: expected a whole number >= 2"),
    ArgCase(["--image-size", "0"], "--image-size: expected a positive whole number"),
    ArgCase(["--image-size", "1"], "the views cannot run on 1x1 images"),
    ArgCase(["--epochs", "inf"], "--epochs: expected a finite number > 0, got 'inf'"),
    ArgCase(["--epochs", "0"], "--epochs: expected a finite number > 0"),
    ArgCase(["--knn-k", "0"], "--eval-k/--knn-k: expected a positive whole number"),
    ArgCase(["--data", "/no/such/folder"], "unknown dataset '/no/such/folder'"),
    ArgCase(["--steps", "5", "--warmup-steps", "10"], "--warmup-steps 10 is longer than the run (--num-train-steps 5)"),
    ArgCase(["--epochs", "1", "--warmup-steps", "1000"], "warmup_steps (1000) is longer than the run (81 steps)"),
    ArgCase(["--weight-decay", "-1"], "--weight-decay: expected a finite number >= 0"),
    ArgCase(["--weight-decay", "nan"], "--weight-decay: expected a finite number >= 0, got 'nan'"),
    ArgCase(["--lr", "inf"], "--learning-rate/--lr: expected a finite number > 0, got 'inf'"),
    ArgCase(["--learning-rate", "0"], "--learning-rate/--lr: expected a finite number > 0"),
    ArgCase(["--max-grad-norm", "nan"], "--max-grad-norm: expected a finite number > 0"),
    ArgCase(["--min-crop", "1.5"], "--min-crop: expected a number in (0, 1]"),
    ArgCase(["--num-workers", "-1"], "--num-workers: expected a whole number >= 0"),
    ArgCase(["--timeout", "0"], "--collective-timeout/--timeout: expected a finite number > 0"),
    ArgCase(["--channels", "0"], "--channels: expected a positive whole number"),
    ArgCase(["--channels", "2"], "--channels 2 does not fit the data's 1-channel images; use --channels 1"),
    ArgCase(["--max-pixels", "-5"], "--max-pixels: expected a whole number >= 0"),
    ArgCase(["--init", "/no/such.pth"], "--init /no/such.pth: no such file"),
    ArgCase(["--resume", "/no/such.pt"], "--resume /no/such.pt: no such file"),
    ArgCase(["--teacher", "/no/such.pt"], "--teacher is for --method distill (this run uses simclr)"),
    ArgCase(["--method", "distill"], "--method distill needs a trained teacher: --teacher PATH"),
    ArgCase(["--method", "distill", "--teacher", "/no/such.pt"], "--teacher /no/such.pt: no such file"),
    ArgCase(["--normalize", "0.5,0.5"], "--normalize expects 'auto' or two comma-separated lists"),
    ArgCase(["--normalize", "0.5", "0"], "stds > 0"),
    ArgCase(["--method-arg", "temperature"], "--method-arg expects KEY=VALUE, got 'temperature'"),
    ArgCase(["--method-arg", "temprature=0.1"], "temprature"),
    ArgCase(["--arch", "resnet-18"], "did you mean 'resnet18'"),
]


@pytest.mark.parametrize("case", APP_CASES, ids=[" ".join(c.args) for c in APP_CASES])
def test_bad_app_arguments_give_one_line(train_script, tmp_path, capsys, case):
    text = one_line_error(lambda: train_script.main([*TINY, *case.args, "--out", str(tmp_path / "run")]), capsys)
    assert case.expected in text
    assert not (tmp_path / "run").exists()  # refused before anything was written


def names_a_flag(text: str, setting: str) -> bool:
    """Whether a message names ``setting`` (as the library does) and the app has a flag of that name to set it."""
    from wrapssl import app

    flags = {option for action in app.build_parser()._actions for option in action.option_strings}
    return setting in text and "--" + setting.replace("_", "-") in flags


def test_library_messages_name_a_flag_the_user_can_type(train_script, tmp_path, capsys):
    text = one_line_error(lambda: train_script.main([*TINY, "--epochs", "1", "--warmup-steps", "1000", "--out",
                                                     str(tmp_path / "run")]), capsys)
    assert names_a_flag(text, "warmup_steps")


def test_missing_data_names_the_flag_of_the_app(train_script, tmp_path, capsys):
    text = one_line_error(lambda: train_script.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "r")]),
                          capsys)
    assert "--data-root that_folder" in text


def test_an_out_that_cannot_be_written_is_found_first(train_script, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    text = one_line_error(lambda: train_script.main([*TINY, "--out", str(tmp_path / "file" / "run")]), capsys)
    assert f"cannot write into --out {tmp_path / 'file' / 'run'} ({tmp_path / 'file'} is a file)" in text
    assert "pick another folder" in text


def test_a_disk_too_full_for_a_checkpoint_is_found_first(train_script, tmp_path, capsys, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**16, 2**16))
    text = one_line_error(lambda: train_script.main([*TINY, "--out", str(tmp_path)]), capsys)
    assert "has 0.1 MB free" in text and "free space or pick another --out" in text


def test_a_disk_that_fills_while_training_is_one_line(train_script, tmp_path, capsys, monkeypatch):
    """torch reports a full disk as a RuntimeError from its zip writer; the app names the file and the fix."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "wrapssl.trainer":  # a checkpoint, not the backbone
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as done:
        train_script.main([*TINY, "--steps", "2", "--out", str(tmp_path)])
    text = str(done.value.code)
    assert text.startswith(f"error: could not write {tmp_path / 'checkpoint-00000002.pt'}: PytorchStreamWriter")
    assert "MB free there" in text and "\n" not in text and not list(tmp_path.glob("*.tmp"))


def test_a_diverging_run_stops_before_saving_and_says_what_to_try(train_script, tmp_path, capsys):
    """LARS at lr 1e9: finite weights of astronomic size. The run stops at the first check with a one-line
    error in the app's words; no checkpoint or backbone holds those weights."""
    with pytest.raises(SystemExit) as done:
        train_script.main([*TINY, "--steps", "6", "--log-every", "1", "--optimizer", "lars", "--lr", "1e9",
                           "--out", str(tmp_path)])
    text = str(done.value.code)
    assert text.startswith("error: the weights' norm grew from") and "at step 1 (of 6)" in text
    assert "max_grad_norm=1.0" in text and names_a_flag(text, "max_grad_norm") and names_a_flag(text, "resume")
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "backbone.pt").exists()


def test_a_user_mistake_prints_no_traceback(tmp_path):
    """The real `python train.py`: a bad argument found after the data is loaded still ends in one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "--image-size", "1", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: the views cannot run on 1x1 images")


# ----------------------------------------------------------------------------- the wrapssl command

@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    """A small embeddings file as `wrapssl embed` writes it."""
    from wrapssl.evaluate import Embeddings

    path = tmp_path_factory.mktemp("emb") / "e.npz"
    Embeddings(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 4,
               [f"f{i}" for i in range(40)]).save_npz(path)
    return path


def run_folder(tmp_path: Path) -> Path:
    """A tiny finished run to embed from."""
    from wrapssl import app

    out = tmp_path / "run"
    app.main([*TINY, "--steps", "1", "--out", str(out)])
    reset_accelerate()
    return out


def test_bad_cli_arguments_give_one_line(tmp_path, embeddings, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    partial = tmp_path / "partial.npz"
    np.savez(partial, embeddings=np.zeros((3, 2)))
    cases = [
        (["embed", "somewhere", "--batch-size", "0"], "--batch-size: expected a positive whole number"),
        (["embed", "somewhere", "--limit", "0"], "--limit: expected a positive whole number"),
        (["embed", "somewhere", "--image-size", "0"], "--image-size: expected a positive whole number"),
        (["select", str(embeddings), "-n", "5", "--duplicates", "2"], "--duplicates: expected a number in (0, 1]"),
        (["select", str(embeddings), "-n", "5", "--duplicate-cosine", "3"], "--duplicate-cosine: expected a cosine"),
        (["evaluate", "--train-embeddings", str(embeddings), "--test-embeddings", str(embeddings),
          "--temperature", "0"], "--temperature: expected a finite number > 0"),
        (["plot", str(tmp_path / "missing.npz")], "missing.npz: no such file; write it with `wrapssl embed`"),
        (["plot", str(garbage)], "garbage.npz is not an embeddings file written by `wrapssl embed`"),
        (["select", str(partial), "-n", "2"], "partial.npz is not an embeddings file written by `wrapssl embed`"),
        (["embed", str(tmp_path / "nowhere")], "no such file or folder"),
    ]
    for argv, expected in cases:
        text = one_line_error(lambda: cli.main(argv), capsys)
        assert expected in text, (argv, text)


def test_a_device_that_is_not_here_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = run_folder(tmp_path)
    capsys.readouterr()
    for device, expected in (("cuda", "--device cuda: torch sees no CUDA device here; use --device cpu"),
                             ("tpu9", "--device 'tpu9' is not a device")):
        text = one_line_error(lambda: cli.main(["embed", str(folder), "--device", device]), capsys)
        assert expected in text and not (folder / "embeddings-test.npz").exists()
