"""train.py: help text, clear errors, a tiny run with resume, and a 2-process gloo launch with identical weights."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--image-size", "8", "--batch-size", "16", "--knn-train", "300", "--knn-test", "100",
        "--knn-k", "20", "--log-every", "1", "--no-plots"]


@pytest.fixture(scope="module")
def train_script():
    """train.py imported as a module (its main() is what `python train.py` runs)."""
    spec = importlib.util.spec_from_file_location("wrapssl_train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def naive_hash(state: dict) -> str:
    """SHA-256 over sorted keys and raw tensor bytes, written independently of train.py."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode("utf-8"))
        h.update(state[key].contiguous().numpy().tobytes() if state[key].dtype != torch.bfloat16
                 else state[key].view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def test_help_explains_every_flag_with_advice(train_script, capsys):
    with pytest.raises(SystemExit) as done:
        train_script.parse_args(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    for flag in ["--data", "--arch", "--hidden-layer", "--method", "--image-size", "--batch-size", "--steps",
                 "--epochs", "--lr", "--optimizer", "--mixed-precision", "--grad-accum", "--out", "--resume",
                 "--seed", "--eval-every", "--num-workers"]:
        assert flag in text, flag
    assert "in our runs" in text and "dataset-fashion-mnist" in text


def test_missing_fashion_mnist_says_how_to_install(train_script, tmp_path):
    with pytest.raises(SystemExit) as err:
        train_script.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)


def test_unknown_arch_is_a_clean_error(train_script, tmp_path):
    with pytest.raises(SystemExit, match="did you mean 'resnet18'"):
        train_script.main([*TINY, "--arch", "resnet-18", "--out", str(tmp_path)])


def test_tiny_run_writes_everything_and_resumes(train_script, tmp_path):
    out = tmp_path / "run"
    first = train_script.main([*TINY, "--steps", "3", "--checkpoint-every", "2", "--out", str(out)])
    for key in ("knn_before", "knn_after"):
        assert 0.0 <= first[key] <= 1.0
    assert first["steps"] == 3 and first["images_seen"] == 48
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["knn_after"] == first["knn_after"]
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert naive_hash(backbone) == first["weights_sha256"][0]
    assert (out / "checkpoint-00000003.pt").is_file() and (out / "metrics.csv").is_file()

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    second = train_script.main([*TINY, "--steps", "5", "--checkpoint-every", "2", "--out", str(out), "--resume"])
    assert second["steps"] == 5 and second["knn_before"] == first["knn_before"]  # "before" is the first run's
    assert (out / "checkpoint-00000005.pt").is_file()


def test_two_process_launch_ends_with_identical_weights(tmp_path):
    """`accelerate launch` with 2 gloo processes on CPU (with gradient accumulation): same weights everywhere."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",  # CPU processes even beside a GPU
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "train.py"), *TINY, "--batch-size", "8", "--steps", "3", "--grad-accum", "2",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 3
    assert metrics["images_seen"] == 3 * 8 * 2 * 2  # steps x batch x processes x accumulation
    hashes = metrics["weights_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert naive_hash(torch.load(out / "backbone.pt", weights_only=True)) == hashes[0]
    config = torch.load(out / "checkpoint-00000003.pt", weights_only=True)["config"]
    assert config["num_processes"] == 2 and config["global_batch"] == 16


def test_min_crop_reaches_the_global_crops_only(train_script, tmp_path):
    from conftest import crop_scales

    args = train_script.parse_args([*TINY, "--method", "dino", "--min-crop", "0.3", "--method-arg", "n_local=2",
                                    "--method-arg", "out_dim=32", "--method-arg", "hidden_size=32"])
    train = train_script.load_data(args)[0]
    trainer, _ = train_script.make_trainer(args, "digits", train, None, 10, tmp_path)
    assert crop_scales(trainer.learner.views) == [[(0.3, 1.0)]] * 2 + [[(0.05, 0.4)]] * 2  # locals keep theirs


def test_compile_and_deterministic_flags_reach_the_trainer(train_script, tmp_path):
    args = train_script.parse_args([*TINY, "--compile", "--deterministic"])
    train = train_script.load_data(args)[0]
    before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer, _ = train_script.make_trainer(args, "digits", train, None, 10, tmp_path)
        assert trainer.learner.encoder._compiled_call_impl is not None
        assert torch.are_deterministic_algorithms_enabled()
        plain, _ = train_script.make_trainer(train_script.parse_args(TINY), "digits", train, None, 10, tmp_path / "p")
        assert plain.learner.encoder._compiled_call_impl is None
    finally:
        torch.use_deterministic_algorithms(before)


def test_bad_settings_exit_with_the_reason(train_script, tmp_path):
    with pytest.raises(SystemExit, match="batch_size must be a positive int"):
        train_script.main([*TINY, "--batch-size", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="min-crop"):
        train_script.main([*TINY, "--min-crop", "1.5", "--out", str(tmp_path)])
