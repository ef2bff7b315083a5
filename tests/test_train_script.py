"""The training app (wrapssl/app.py, `wrapssl train`, `python -m wrapssl train`, the top-level train.py): flags named
after the settings they set, help that shows the values used without an option, clear errors, a tiny run with
resume, named data sets, and a 2-process gloo launch."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import help_blocks, reset_accelerate
from test_torchvision_formats import write_cifar, write_stl
from wrapssl import app, cli, recipes
from wrapssl.pretrain import make_trainer, trainer_fields
from wrapssl.rundata import load_data
from wrapssl.archs import build_arch
from wrapssl.methods import available_methods

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--image-size", "8", "--batch-size", "16", "--knn-train", "300", "--knn-test", "100",
        "--knn-k", "20", "--log-every", "1", "--no-plots", "--labels", "none"]


@pytest.fixture(scope="module")
def train_script():
    """The top-level train.py imported as a module (its main() is what `python train.py` runs)."""
    spec = importlib.util.spec_from_file_location("wrapssl_train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def naive_hash(state: dict) -> str:
    """SHA-256 over sorted keys and raw tensor bytes, written independently of the app."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode("utf-8"))
        h.update(state[key].contiguous().numpy().tobytes() if state[key].dtype != torch.bfloat16
                 else state[key].view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def subprocess_env() -> dict:
    """CPU-only, one thread, this checkout importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    return env


def shows(text: str, value) -> bool:
    """Whether help text shows ``value``: a number written in any form (8e-3 for 0.008), a word, every item."""
    if isinstance(value, (list, tuple)):
        return all(shows(text, v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return any(float(n) == value for n in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text))
    return str(value) in text


def test_help_shows_the_value_each_option_takes_when_not_given(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0
    blocks = help_blocks(capsys.readouterr().out)
    assert {"--data", "--data-root", "--arch", "--method", "--batch-size", "--num-train-steps",
            "--gradient-accumulation-steps", "--checkpoint-folder", "--resume", "--plot"} <= set(blocks)
    taken = vars(app.parse_args([]))  # what a run without the option uses
    # options whose value is worked out at run time (None here) describe the rule instead
    fixed = {flag: taken[flag.lstrip("-").replace("-", "_")] for flag in blocks
             if taken.get(flag.lstrip("-").replace("-", "_")) not in (None, [])}
    assert {"--batch-size", "--method", "--num-train-steps", "--learning-rate", "--eval-k"} <= set(fixed)
    hidden = [flag for flag, value in fixed.items() if not shows(blocks[flag], value)]
    assert not hidden, f"the help of {hidden} does not show the value used without it"


def test_every_flag_is_named_after_the_setting_it_sets():
    """A flag is a Trainer setting or an app setting of the same name (--num-train-steps: num_train_steps), so a
    message that names a setting names a flag; the short forms users know set the same settings."""
    parser = app.build_parser()
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest not in ("help", "version")}
    settings = trainer_fields() | {f.name for f in dataclasses.fields(app.AppSettings)}
    assert set(flags) <= settings, set(flags) - settings
    assert {f.name for f in dataclasses.fields(app.AppSettings)} <= set(flags)
    for dest, options in flags.items():
        assert options[0] == "--" + dest.replace("_", "-"), (dest, options)
    short = app.parse_args(["--steps", "7", "--lr", "0.5", "--grad-accum", "2", "--out", "o", "--timeout", "9",
                            "--knn-k", "3", "--no-plots"])
    full = app.parse_args(["--num-train-steps", "7", "--learning-rate", "0.5", "--gradient-accumulation-steps", "2",
                           "--checkpoint-folder", "o", "--collective-timeout", "9", "--eval-k", "3", "--no-plot"])
    assert vars(short) == vars(full)
    assert app.AppSettings.from_args(app.parse_args([])) == app.AppSettings()  # the dataclass holds the defaults
    assert app.AppSettings.from_args(app.parse_args(["--data", "digits", "--knn-test", "5"])) == \
        app.AppSettings(data="digits", knn_test=5)
    assert (full.num_train_steps, full.learning_rate, full.gradient_accumulation_steps, full.checkpoint_folder,
            full.collective_timeout, full.eval_k, full.plot) == (7, 0.5, 2, "o", 9.0, 3, False)


def test_the_parsers_names_are_the_registries():
    """The parser builds without torch from copies of the registries' names; they must not drift apart."""
    from wrapssl import data, optim

    assert sorted(recipes.METHODS) == sorted(available_methods())
    assert recipes.OPTIMIZERS == optim.OPTIMIZERS and recipes.DATASETS == data.DATASETS
    assert (recipes.FASHION_MNIST_DIR, recipes.MAX_PIXELS) == (data.FASHION_MNIST_DIR, data.MAX_PIXELS)
    assert set(recipes.DATA) == set(data.DATASETS) and set(recipes.METHOD) == set(available_methods())


def test_the_flags_defaults_are_the_configs_or_the_default_runs():
    """Without flags, each Trainer setting is TrainConfig's default or the default run's (recipes.DEFAULT_RUN);
    the learning rate is the method's and the folder is worked out from the method and the data."""
    from wrapssl.config import TrainConfig

    taken = vars(app.parse_args([]))
    config = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    for name in trainer_fields() & set(taken):
        if name == "learning_rate":
            assert taken[name] == recipes.method_defaults(taken["method"])[0]
        elif name == "checkpoint_folder":
            assert taken[name] is None  # runs/<method>-<data>
        else:
            assert taken[name] == recipes.DEFAULT_RUN.get(name, config[name]), name
    assert (taken["batch_size"], taken["num_train_steps"], taken["method"]) == (256, 1000, "simclr")


def test_missing_fashion_mnist_says_how_to_install(train_script, tmp_path):
    with pytest.raises(SystemExit) as err:
        train_script.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)


def test_unknown_arch_is_a_clean_error(train_script, tmp_path):
    with pytest.raises(SystemExit, match="did you mean 'resnet18'"):
        train_script.main([*TINY, "--arch", "resnet-18", "--out", str(tmp_path)])


def test_bad_numbers_are_usage_errors(capsys):
    for flag in ("--steps", "--grad-accum", "--knn-k"):
        with pytest.raises(SystemExit) as err:
            app.parse_args([flag, "0"])
        assert err.value.code == 2
        err = capsys.readouterr().err
        # one line that names the flag, the value refused, what is wanted and where to read more
        assert err.count("\n") == 1 and err.startswith("wrapssl train: error: ")
        assert flag in err and "'0'" in err and "positive whole number" in err and "--help" in err


def test_tiny_run_writes_everything_and_resumes(train_script, tmp_path):
    out = tmp_path / "run"
    first = train_script.main([*TINY, "--steps", "3", "--checkpoint-every", "2", "--out", str(out)])
    for key in ("knn_before", "knn_after"):
        assert 0.0 <= first[key] <= 1.0
    assert first["steps"] == 3 and first["images_seen"] == 48
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["knn_after"] == first["knn_after"]
    assert saved["classes"] == [str(d) for d in range(10)]
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert naive_hash(backbone) == first["weights_sha256"][0]
    assert (out / "checkpoint-00000003.pt").is_file() and (out / "metrics.csv").is_file()
    assert (out / "backbone.safetensors").is_file()

    reset_accelerate()
    second = train_script.main([*TINY, "--steps", "5", "--checkpoint-every", "2", "--out", str(out), "--resume"])
    assert second["steps"] == 5 and second["knn_before"] == first["knn_before"]  # "before" is the first run's
    assert (out / "checkpoint-00000005.pt").is_file()


def test_distill_from_an_earlier_runs_backbone(train_script, tmp_path):
    teacher = tmp_path / "teacher"
    train_script.main([*TINY, "--steps", "3", "--out", str(teacher)])
    reset_accelerate()
    student = tmp_path / "student"
    got = train_script.main([*TINY, "--steps", "3", "--method", "distill", "--teacher", str(teacher / "backbone.pt"),
                             "--out", str(student)])
    config = torch.load(student / "checkpoint-00000003.pt", weights_only=True)["config"]
    assert config["method"] == "distill" and config["method.teacher"] == str(teacher / "backbone.pt")
    assert config["method.teacher_arch"] == "small_resnet"  # --teacher-arch defaults to --arch
    assert got["steps"] == 3 and 0.0 <= got["knn_after"] <= 1.0
    assert torch.load(student / "backbone.pt", weights_only=True).keys() == \
        torch.load(teacher / "backbone.pt", weights_only=True).keys()


def test_the_run_folder_gets_its_plots(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import matplotlib.image

    run = [arg for arg in TINY if arg != "--no-plots"]
    app.main([*run, "--steps", "2", "--knn-test", "60", "--out", str(tmp_path)])
    for name in ("loss_curve.png", "augmentations.png", "embedding_map.png", "learning_curve.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.std() > 0.01, name


def test_wrapssl_train_and_python_m_run_the_same_app(tmp_path):
    """`wrapssl train ...` in-process and `python -m wrapssl train ...` in a new process end with the same weights."""
    run = [*TINY, "--steps", "2", "--checkpoint-every", "10"]
    assert cli.main(["train", *run, "--out", str(tmp_path / "a")]) == 0
    done = subprocess.run([sys.executable, "-m", "wrapssl", "train", *run, "--out", str(tmp_path / "b")],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(random init) ->" in done.stdout and "raw pixels" in done.stdout  # the summary line
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"] and a["knn_after"] == b["knn_after"]


def test_cifar10_by_name(tmp_path):
    write_cifar(tmp_path / "data", per_batch=8)
    metrics = app.main(["--data", "cifar10", "--data-root", str(tmp_path / "data"), "--image-size", "16",
                        "--batch-size", "8", "--steps", "2", "--knn-k", "5", "--no-plots", "--labels", "none", "--out",
                        str(tmp_path / "run")])
    config = torch.load(tmp_path / "run" / "checkpoint-00000002.pt", weights_only=True)["config"]
    assert config["dataset_size"] == 40 and config["image_size"] == 16  # the 5 train batches
    assert 0 <= metrics["knn_after"] <= 1 and metrics["classes"][0] == "plane"


def test_stl10_pretrains_on_unlabeled_and_reports_train_to_test(tmp_path):
    write_stl(tmp_path / "data", {"train": 6, "test": 4, "unlabeled": 24})
    metrics = app.main(["--data", "stl10", "--data-root", str(tmp_path / "data"), "--image-size", "16",
                        "--batch-size", "8", "--steps", "2", "--knn-k", "3", "--no-plots", "--labels", "none", "--out",
                        str(tmp_path / "run")])
    config = torch.load(tmp_path / "run" / "checkpoint-00000002.pt", weights_only=True)["config"]
    assert config["dataset_size"] == 24  # the unlabeled split
    assert 0 <= metrics["knn_before"] <= 1 and 0 <= metrics["knn_after"] <= 1
    assert metrics["classes"] == [f"class{i}" for i in range(10)]


def test_named_data_without_files_says_where_to_get_them(tmp_path):
    with pytest.raises(SystemExit, match="cifar-10-python.tar.gz"):
        app.main(["--data", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="needs the folder it was downloaded to"):
        app.main(["--data", "stl10", "--out", str(tmp_path / "run")])


@pytest.mark.slow
def test_accelerate_launch_m_two_processes_end_with_identical_weights(tmp_path):
    """`accelerate launch -m wrapssl train`, 2 gloo processes on CPU (with accumulation): same weights everywhere."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "wrapssl", "train", *TINY, "--batch-size", "8", "--steps", "3", "--grad-accum", "2",
           "--out", str(out)]
    from conftest import run_in_own_session
    code, stdout, stderr = run_in_own_session(cmd, tmp_path, subprocess_env(), timeout=300)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 3
    assert metrics["images_seen"] == 3 * 8 * 2 * 2  # steps x batch x processes x accumulation
    hashes = metrics["weights_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert naive_hash(torch.load(out / "backbone.pt", weights_only=True)) == hashes[0]
    config = torch.load(out / "checkpoint-00000003.pt", weights_only=True)["config"]
    assert config["num_processes"] == 2 and config["global_batch"] == 16


def test_min_crop_reaches_the_global_crops_only(tmp_path):
    from conftest import crop_scales

    args = app.parse_args([*TINY, "--method", "dino", "--min-crop", "0.3", "--method-arg", "n_local=2",
                           "--method-arg", "out_dim=32", "--method-arg", "hidden_size=32"])
    trainer, _ = make_trainer(args, "digits", load_data(args), tmp_path)
    assert crop_scales(trainer.learner.views) == [[(0.3, 1.0)]] * 2 + [[(0.05, 0.4)]] * 2  # locals keep theirs


def test_compile_and_deterministic_flags_reach_the_trainer(tmp_path, monkeypatch):
    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: calls.append(k) or real_compile(*a, **k))
    args = app.parse_args([*TINY, "--compile", "--deterministic"])
    data = load_data(args)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        make_trainer(args, "digits", data, tmp_path)
        assert calls and torch.are_deterministic_algorithms_enabled()
        calls.clear()
        reset_accelerate()
        make_trainer(app.parse_args(TINY), "digits", data, tmp_path / "p")
        assert not calls
    finally:
        torch.use_deterministic_algorithms(before)
        torch._dynamo.reset()


def test_report_scores_the_baselines_on_the_same_protocol(tmp_path, capsys):
    """raw pixels, random init and pretrained rows equal a recomputation from the data and the saved backbone;
    the learning curve starts at the random init and has a point per evaluation."""
    from wrapssl.archs import build_arch
    from wrapssl.data import load_dataset
    from wrapssl.evaluate import embed_dataset, knn_accuracy, linear_probe

    metrics = app.main([*TINY, "--steps", "6", "--out", str(tmp_path)])
    scores = metrics["scores"]
    data = load_dataset("digits", 8, split="train")
    memory = torch.utils.data.Subset(data, range(300))
    queries = torch.utils.data.Subset(load_dataset("digits", 8, split="test"), range(100))
    x = torch.stack([memory[i][0] for i in range(300)]).flatten(1).float() / 255
    y = torch.tensor([memory[i][1] for i in range(300)])
    xq = torch.stack([queries[i][0] for i in range(100)]).flatten(1).float() / 255
    yq = torch.tensor([queries[i][1] for i in range(100)])
    assert scores["raw_pixels"]["knn"] == pytest.approx(knn_accuracy(x, y, xq, yq, k=20, temperature=0.1))
    assert scores["raw_pixels"]["linear"] == pytest.approx(linear_probe(x, y, xq, yq))

    net, layer = build_arch("small_resnet", channels=3, num_classes=10, image_size=8)
    net.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True))
    a, b = embed_dataset(net, memory, hidden_layer=layer), embed_dataset(net, queries, hidden_layer=layer)
    assert scores["pretrained"]["knn"] == pytest.approx(knn_accuracy(a.embeddings, a.labels, b.embeddings, b.labels,
                                                                     k=20, temperature=0.1))
    assert scores["pretrained"]["linear"] == pytest.approx(linear_probe(a.embeddings, a.labels, b.embeddings,
                                                                        b.labels), abs=0.011)
    curve = metrics["learning_curve"]
    assert curve[0] == [0.0, scores["random_init"]["knn"]] and len(curve) == 4  # start, steps 2, 4 and 6
    assert [m for m, _ in curve] == sorted(m for m, _ in curve) and curve[-1][1] == scores["pretrained"]["knn"]
    out = capsys.readouterr().out
    assert f"{100 * scores['raw_pixels']['knn']:.2f}%" in out and "health (no labels needed)" in out
    assert metrics["health"]["dim"] == 128 and not metrics["health"]["collapsed"]


@pytest.mark.parametrize("method", [m for m in available_methods() if m not in ("mae", "distill")])
def test_every_methods_app_settings_build_and_train(method):
    """The app's per-method settings (wrapssl.recipes.method_defaults) are keywords the method takes, and a step
    with them gives a finite loss and gradients on the backbone."""
    from wrapssl import Learner

    lr, kwargs = recipes.method_defaults(method, steps=100)
    assert 0 < lr <= 1e-2
    torch.manual_seed(0)
    net, hidden = build_arch("small_resnet", channels=3, num_classes=10)
    learner = Learner(net, 16, hidden, method=method, **kwargs)
    loss = learner(torch.rand(8, 3, 16, 16))
    loss.backward()
    assert torch.isfinite(loss) and net.conv1.weight.grad.abs().sum() > 0
    if "moving_average_decay" in kwargs:
        assert learner.momentum == kwargs["moving_average_decay"]


def test_the_learning_rate_defaults_to_the_methods_and_the_flag_overrides_it():
    assert app.parse_args([]).learning_rate == recipes.method_defaults("simclr")[0] == 8e-3
    assert app.parse_args(["--method", "byol"]).learning_rate == recipes.method_defaults("byol")[0] == 2e-3
    assert app.parse_args(["--method", "byol", "--lr", "0.1"]).learning_rate == 0.1
    assert app.parse_args(["--method", "byol", "--learning-rate", "0.2"]).learning_rate == 0.2


def test_dino_and_swav_schedules_are_shares_of_the_planned_steps():
    """The recipe's step-dependent settings, against the rule written out: 30% and 5% of the steps, at least 1."""
    for steps in (1, 7, 19, 100, 1000, 3333):
        assert recipes.method_defaults("dino", steps)[1]["warmup_teacher_temp_steps"] == max(1, steps * 3 // 10)
        assert recipes.method_defaults("swav", steps)[1]["freeze_prototypes_steps"] == max(1, steps // 20)
    assert recipes.method_defaults("dino")[1]["warmup_teacher_temp_steps"] == 300  # the default run's 1000 steps
