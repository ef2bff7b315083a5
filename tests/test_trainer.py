"""Trainer: byol-pytorch arguments, schedules, checkpoints (atomic, resumable bit-exactly), NaN stop, kNN monitor."""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from conftest import crop_scales, reset_accelerate, small_cnn
from wrapssl.callbacks import Callback, KnnMonitor, export_backbone
from wrapssl.config import TrainConfig
from wrapssl.data import TensorImages
from wrapssl.ema import cosine_momentum
from wrapssl.methods import BYOLMethod
from wrapssl.trainer import NonFiniteLossError, Trainer, latest_checkpoint, load_checkpoint

HEADS = dict(projection_size=16, projection_hidden_size=32)  # tiny heads keep every step cheap
QUIET = dict(progress=False, log_with=("csv",), plot=False)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def images(n: int = 48, size: int = 12, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (N, C, size, size)."""
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def tiny_net(channels: int = 1) -> nn.Module:
    """A small CNN; child -2 is the pooled, flattened representation and the Linear after it is unused."""
    torch.manual_seed(0)
    return small_cnn(channels=channels, width=8)


def make(folder: Path, steps: int = 8, data: Dataset | torch.Tensor | None = None, **kwargs) -> Trainer:
    """A tiny Trainer on 48 random 12-px images, global batch 8 (6 steps per epoch).

    Deterministic kernels, so the bit-exact comparisons also hold where a GPU is visible.
    """
    settings = dict(dataset=images() if data is None else data, image_size=12, hidden_layer=-2,
                    num_train_steps=steps, batch_size=8, checkpoint_every=2, checkpoint_folder=folder,
                    log_every=1, keep_checkpoints=10, deterministic=True, **QUIET, **HEADS)
    settings.update(kwargs)
    return Trainer(tiny_net(), **settings)


def learner_state(path: Path) -> dict:
    return load_checkpoint(path)["learner"]


def assert_same_tensors(a: dict, b: dict) -> None:
    """Equal keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k])
        else:
            assert a[k] == b[k], k


# ----------------------------------------------------------------------------- byol-pytorch compatibility

def test_byol_pytorch_trainer_arguments(tmp_path):
    """BYOLTrainer's keyword set (byol-pytorch 0.9.1) runs unchanged; byol_kwargs reach the learner."""
    from wrapssl.compat import BYOLTrainer

    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = BYOLTrainer(
        net, image_size=12, hidden_layer="9", learning_rate=3e-4, dataset=images(), num_train_steps=2,
        batch_size=8, optimizer_klass=torch.optim.Adam, checkpoint_every=1, checkpoint_folder=str(tmp_path),
        byol_kwargs=dict(moving_average_decay=0.9, use_momentum=True, sync_batchnorm=False, **HEADS),
        optimizer_kwargs=dict(betas=(0.8, 0.95)), accelerator_kwargs=dict(cpu=True), **QUIET)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.Adam)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert trainer.learner.momentum == 0.9
    assert trainer() is net
    assert trainer.step == 2 and trainer.learner.step == 2
    changed = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("0.") for k in changed)  # the stem trained
    assert not any(k.startswith("11.") for k in changed)  # the Linear past the hidden layer is untouched
    exported = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert_same_tensors(exported, net.state_dict())
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*.pt"))] == ["checkpoint-00000001.pt",
                                                                         "checkpoint-00000002.pt"]


class _Items(Dataset):
    """Yields images in one of the accepted item forms."""

    def __init__(self, x: torch.Tensor, form: str):
        self.x, self.form = x, form

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        img = self.x[i] if self.form.startswith("uint8") else self.x[i].float() / 255
        return (img, i % 3) if self.form.endswith("tuple") else img


@pytest.mark.parametrize("form", ["uint8", "uint8_tuple", "float", "float_tuple"])
def test_dataset_item_forms(tmp_path, form):
    trainer = make(tmp_path, steps=1, data=_Items(images(16), form), checkpoint_every=1)
    trainer()
    assert trainer.step == 1 and latest_checkpoint(tmp_path).name == "checkpoint-00000001.pt"


def test_bad_arguments_raise_helpfully(tmp_path):
    with pytest.raises(ValueError, match="exactly one of num_train_steps and epochs"):
        make(tmp_path, steps=None)
    with pytest.raises(ValueError, match="lower batch_size"):
        make(tmp_path, data=images(4))
    with pytest.raises(ValueError, match="eval_dataset"):
        make(tmp_path, eval_every=2)
    with pytest.raises(FileNotFoundError, match="resume='auto'"):
        make(tmp_path, resume=tmp_path / "nope.pt")


# ----------------------------------------------------------------------------- one config, the hook, one counter

def test_a_config_and_the_same_keywords_build_the_same_run(tmp_path):
    """Trainer(config=TrainConfig(...)) and Trainer(**the same keywords) train to bit-identical weights and record
    the same settings; keywords that are no field are the method's."""
    settings = dict(image_size=12, hidden_layer=-2, num_train_steps=3, batch_size=8, checkpoint_every=10,
                    log_every=1, deterministic=True, **QUIET)
    by_keywords = Trainer(tiny_net(), dataset=images(), checkpoint_folder=tmp_path / "k", **settings, **HEADS)
    by_keywords()
    reset_accelerate()
    config = TrainConfig(checkpoint_folder=tmp_path / "c", **settings, method_kwargs=dict(HEADS))
    by_config = Trainer(tiny_net(), dataset=images(), config=config)
    by_config()
    assert by_keywords.config.method_kwargs == HEADS and by_config.config is config
    assert by_keywords.record == by_config.record
    assert_same_tensors(by_keywords.learner.state_dict(), by_config.learner.state_dict())
    with pytest.raises(TypeError, match="not both"):
        Trainer(tiny_net(), dataset=images(), config=config, batch_size=4)


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=1), "batch_size must be at least 2"),
    (dict(schedule="linear"), "schedule must be 'cosine' or 'constant'"),
    (dict(min_lr_ratio=2.0), r"min_lr_ratio must lie in \[0, 1\]"),
    (dict(warmup_steps=20), r"warmup_steps \(20\) is longer than the run \(10 steps\)"),
    (dict(num_workers=-1), "num_workers must be an int >= 0"),
    (dict(epochs=2.0), "exactly one of num_train_steps and epochs"),
    (dict(log_every=0), "log_every must be a positive int"),
    (dict(eval_k=0), "eval_k must be a positive int"),
    (dict(image_size=-8), "image_size must be a positive int"),
])
def test_a_config_refuses_a_bad_setting_by_itself(bad, message):
    """Every setting is checked where the config is built, before any net or data is touched; replace() too."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"num_train_steps": 10, **bad})
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TrainConfig(num_train_steps=10), **bad)


class Recorder(Callback):
    """Keeps every StepInfo it gets (with the trainer's step at that moment) and counts the ends of fit()."""

    def __init__(self, every: int | None = None):
        self.every, self.infos, self.steps, self.ends = every, [], [], 0

    def due(self, step: int, last: bool) -> bool:
        return self.every is None or step % self.every == 0 or last

    def on_step(self, trainer, info) -> None:
        self.infos.append(info)
        self.steps.append(trainer.step)

    def on_fit_end(self, trainer) -> None:
        self.ends += 1


def test_callbacks_get_each_step_with_the_lr_momentum_and_loss_it_used(tmp_path):
    every, third = Recorder(), Recorder(every=3)
    trainer = make(tmp_path, steps=5, log_every=2, checkpoint_every=100, callbacks=[every])
    trainer.add_callback(third)
    trainer()
    assert [i.step for i in every.infos] == every.steps == [1, 2, 3, 4, 5]
    assert [i.last for i in every.infos] == [False] * 4 + [True]
    assert [i.step for i in third.infos] == [3, 5] and every.ends == third.ends == 1
    m0, losses = trainer.learner.momentum, dict(trainer.history["loss"])
    for info in every.infos:
        s = info.step - 1  # 0-based: no warmup in a 5-step run (5 // 10 = 0), then the cosine
        assert info.lr == pytest.approx(trainer.lr * (1 + math.cos(math.pi * s / 5)) / 2, rel=1e-12)
        assert info.momentum == pytest.approx(cosine_momentum(m0, s, 5), rel=1e-12)
        assert info.loss == losses.get(info.step)  # the logged mean at log points (2, 4 and the last), else None
    assert [s for s, _ in trainer.history["loss"]] == [2, 4, 5]
    trainer()  # already trained: no step, but fit() ends again
    assert len(every.infos) == 5 and every.ends == 2


def test_one_step_counter_the_learners(tmp_path):
    trainer = make(tmp_path, steps=3, checkpoint_every=100, health_every=None)
    trainer()
    assert trainer.step == trainer.learner.step == 3
    with pytest.raises(AttributeError):
        trainer.step = 5  # a read-only view: the Learner's count is the one that moves
    trainer.learner.step = 2
    assert trainer.step == 2


# ----------------------------------------------------------------------------- schedules and steps

def test_lr_and_momentum_follow_their_schedules(tmp_path):
    """Logged lr = scaled base · warmup/cosine closed form; logged momentum = the EMA's cosine."""
    steps, warmup, base = 10, 3, 0.02
    trainer = make(tmp_path, steps=steps, learning_rate=base, scale_lr=True, warmup_steps=warmup,
                   gradient_accumulation_steps=2, batch_size=4, checkpoint_every=100)
    trainer()
    scaled = base * (4 * 1 * 2) / 256  # batch · processes · accumulation / 256
    for step, lr in trainer.history["lr"]:
        s = step - 1  # the lr used by optimiser step number `step`
        factor = (s + 1) / warmup if s < warmup else (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))) / 2
        assert lr == pytest.approx(scaled * factor, rel=1e-9)
    m0 = trainer.learner.momentum
    for step, m in trainer.history["momentum"]:
        assert m == pytest.approx(cosine_momentum(m0, step - 1, steps))
    assert [s for s, _ in trainer.history["loss"]] == list(range(1, steps + 1))


def test_gradient_accumulation_counts_optimiser_steps(tmp_path):
    """With 3 batches per step, Adam's own step counter and the data position move by 3 batches per step."""
    trainer = make(tmp_path, steps=5, gradient_accumulation_steps=3, batch_size=4, optimizer="adamw",
                   checkpoint_every=100)
    trainer()
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {5} and trainer.learner.step == 5  # one EMA update per optimiser step
    batches = 5 * 3
    per_epoch = 48 // 4
    assert (trainer.epoch, trainer.samples_in_epoch) == (batches // per_epoch, batches % per_epoch * 4)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_clipping_bounds_the_update(tmp_path, clip):
    """Plain SGD at lr 1: one step moves the trainable parameters by exactly the (clipped) gradient norm."""
    trainer = make(tmp_path, steps=1, optimizer="sgd", weight_decay=0.0, optimizer_options=dict(momentum=0.0),
                   learning_rate=1.0, warmup_steps=0, max_grad_norm=clip, checkpoint_every=100)
    params = [p for p in trainer.learner.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    trainer()
    moved = torch.stack([(p.detach() - b).norm() for p, b in zip(params, before)]).norm().item()
    if clip is None:
        assert moved > 10 * 1e-3  # the unclipped step is far larger than the clip below
    else:
        assert moved == pytest.approx(clip, rel=1e-3)


def test_epochs_set_the_step_count(tmp_path):
    trainer = make(tmp_path, steps=None, epochs=1.5)
    assert trainer.num_train_steps == 9  # 48 images / batch 8 = 6 steps per epoch


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_weights_only(tmp_path):
    """Everything is loadable with weights_only=True and restores an equal trainer."""
    first = make(tmp_path / "a", steps=4, optimizer="lars")
    first()
    raw = torch.load(latest_checkpoint(tmp_path / "a"), weights_only=True)  # no pickled objects inside
    assert raw["step"] == 4 and raw["config"]["num_train_steps"] == 4 and raw["data"]["samples_in_epoch"] == 32
    assert {"torch", "numpy", "python"} <= set(raw["rng"][0])
    reset_accelerate()
    second = make(tmp_path / "b", steps=4, optimizer="lars", resume=latest_checkpoint(tmp_path / "a"))
    assert second.step == 4 and second.learner.step == 4
    assert (second.epoch, second.samples_in_epoch) == (first.epoch, first.samples_in_epoch)
    assert_same_tensors(second.learner.state_dict(), first.learner.state_dict())
    assert_same_tensors(second.optimizer.state_dict()["state"], first.optimizer.state_dict()["state"])
    # no private field of any torch class (LambdaLR's _step_count and _last_lr were); the learner's entries are its
    # state_dict, whose keys are module paths (with torch's own "_extra_state" suffix)
    assert not private_keys({k: v for k, v in raw.items() if k != "learner"})
    assert second.history == first.history


def private_keys(tree, path: str = "") -> list[str]:
    """Dotted paths of the string keys starting with "_" anywhere in a nested checkpoint."""
    found = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            here = f"{path}.{k}" if path else str(k)
            found += [here] * (isinstance(k, str) and k.startswith("_")) + private_keys(v, here)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            found += private_keys(v, f"{path}[{i}]")
    return found


def test_deterministic_flag_switches_torch_to_deterministic_kernels(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    make(tmp_path / "n", deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    make(tmp_path / "d", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark


def test_compile_flag_reaches_the_encoders_and_trains_the_same(tmp_path):
    """Trainer(compile=...) compiles the Learner's encoders; the run and its files match an uncompiled run."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # records each traced graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    compiled = make(tmp_path / "c", steps=3, compile={"backend": backend})
    compiled()
    assert graphs, "torch.compile never traced the encoder"
    traced = len(graphs)
    with torch.no_grad():
        compiled.net.eval()(images(2).float() / 255)
    assert len(graphs) == traced  # the user's own net object still runs eagerly
    reset_accelerate()
    plain = make(tmp_path / "p", steps=3)
    plain()
    a, b = compiled.learner.state_dict(), plain.learner.state_dict()
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    saved = torch.load(tmp_path / "c" / "backbone.pt", weights_only=True)
    assert list(saved) == list(tiny_net().state_dict())
    torch._dynamo.reset()


def test_crop_scale_reaches_the_learners_crops(tmp_path):
    trainer = make(tmp_path, crop_scale=(0.25, 1.0))
    assert crop_scales(trainer.learner.views) == [[(0.25, 1.0)]] * 2  # the recipe's own is (0.08, 1.0)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A crash half-way through writing leaves the last complete checkpoint in place and no temp file."""
    trainer = make(tmp_path, steps=4, checkpoint_every=2)
    trainer()
    good = latest_checkpoint(tmp_path)
    good_bytes = good.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)  # a disk that fills up half-way through the file
    trainer.learner.step = 6  # pretend two more steps were taken
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path) == good and good.read_bytes() == good_bytes
    assert not list(tmp_path.glob(".*tmp"))
    backbone = tmp_path / "backbone.pt"
    backbone_bytes = backbone.read_bytes()
    with pytest.raises(OSError):  # same for the exported backbone
        export_backbone(trainer)
    assert backbone.read_bytes() == backbone_bytes


def test_old_checkpoints_are_pruned(tmp_path):
    make(tmp_path, steps=8, checkpoint_every=2, keep_checkpoints=2)()
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*.pt"))] == ["checkpoint-00000006.pt",
                                                                         "checkpoint-00000008.pt"]


class _Crash(Exception):
    pass


class _CrashingImages(TensorImages):
    """Raises once ``marker`` exists (e.g. right after a checkpoint), like a crash in the data pipeline."""

    def __init__(self, x: torch.Tensor, marker: Path):
        super().__init__(x)
        self.marker = marker

    def __getitem__(self, i):
        if self.marker.exists():
            raise _Crash
        return super().__getitem__(i)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final checkpoint of an uninterrupted 8-step run (crossing an epoch end at step 6)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)
    make(folder)()
    torch.use_deterministic_algorithms(False)  # make() switched it on for the process; tests switch it per test
    reset_accelerate()
    return load_checkpoint(latest_checkpoint(folder))


def test_resume_after_crash_at_epoch_end_is_bit_exact(tmp_path, uninterrupted):
    data = _CrashingImages(images(), tmp_path / "checkpoint-00000006.pt")
    with pytest.raises(_Crash):
        make(tmp_path, data=data)()
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000006.pt"
    reset_accelerate()
    resumed = make(tmp_path, resume="auto")
    assert resumed.step == 6 and (resumed.epoch, resumed.samples_in_epoch) == (0, 48)
    resumed()
    final = load_checkpoint(latest_checkpoint(tmp_path))
    assert final["step"] == uninterrupted["step"] == 8
    assert_same_tensors(final["learner"], uninterrupted["learner"])
    assert_same_tensors(final["optimizer"]["state"], uninterrupted["optimizer"]["state"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows if ",loss," in r] == list(range(1, 9))  # no step logged twice


class _Stalling(TensorImages):
    """Hangs once ``marker`` exists, so the parent can SIGKILL the run right there."""

    def __init__(self, x: torch.Tensor, marker: Path):
        super().__init__(x)
        self.marker = marker

    def __getitem__(self, i):
        if self.marker.exists():
            time.sleep(3600)
        return super().__getitem__(i)


def _run_until_killed(folder: Path, marker: Path) -> None:
    """A forked child: a fresh Accelerate singleton, one thread as in the test process (thread counts change
    float rounding), then the run that the parent kills."""
    reset_accelerate()
    torch.set_num_threads(1)
    make(folder, data=_Stalling(images(), marker))()


def test_sigkill_then_resume_is_bit_exact(tmp_path, uninterrupted):
    """A run killed with SIGKILL after its step-4 checkpoint resumes to the uninterrupted run's exact weights."""
    folder, marker = tmp_path / "ck", tmp_path / "ck" / "checkpoint-00000004.pt"
    # forked: a process of its own to kill, without a new interpreter's imports
    proc = multiprocessing.get_context("fork").Process(target=_run_until_killed, args=(folder, marker))
    proc.start()
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if not proc.is_alive():
                pytest.fail(f"the run ended before its checkpoint (exit code {proc.exitcode})")
            if time.time() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not (folder / "backbone.pt").exists()
    resumed = make(folder, resume="auto")
    assert resumed.step == 4 and resumed.samples_in_epoch == 32
    resumed()
    final = load_checkpoint(latest_checkpoint(folder))
    assert final["step"] == 8
    assert_same_tensors(final["learner"], uninterrupted["learner"])
    assert_same_tensors(final["optimizer"]["state"], uninterrupted["optimizer"]["state"])


# ----------------------------------------------------------------------------- NaN

class NaNFrom(BYOLMethod):
    """BYOL whose loss turns NaN from optimiser step ``bad_step`` (1-based) on."""

    def __init__(self, bad_step: int):
        super().__init__(**HEADS)
        self.bad_step = bad_step

    def loss(self, online, target, step=0):
        value = super().loss(online, target, step)
        return value * float("nan") if step + 1 >= self.bad_step else value


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_net(), dataset=images(), image_size=12, hidden_layer=-2, num_train_steps=12,
                      batch_size=8, checkpoint_every=2, checkpoint_folder=tmp_path, log_every=4,
                      method=NaNFrom(5), **QUIET)
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(of 12\)") as err:
        trainer()
    message = str(err.value)
    assert "checkpoint-00000004.pt" in message and "learning rate" in message and "max_grad_norm" in message
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*.pt"))] == ["checkpoint-00000002.pt",
                                                                         "checkpoint-00000004.pt"]
    kept = learner_state(tmp_path / "checkpoint-00000004.pt")
    assert all(torch.isfinite(v).all() for v in kept.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    assert not (tmp_path / "backbone.pt").exists()


def test_nan_weights_are_never_checkpointed(tmp_path):
    trainer = make(tmp_path, steps=2, checkpoint_every=1)
    trainer()
    with torch.no_grad():
        next(trainer.net.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="weights"):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000002.pt"


# ----------------------------------------------------------------------------- monitor and outputs

def test_knn_monitor_and_outputs(tmp_path, monkeypatch):
    """eval_every logs a kNN accuracy that equals an independent embed + kNN; CSV, TensorBoard and PNG are written."""
    from wrapssl import evaluate

    x, labels = images(32, seed=1), torch.arange(32) % 4
    train, test = TensorImages(x[:24], labels[:24]), TensorImages(x[24:], labels[24:])
    trainer = make(tmp_path, steps=4, eval_every=2, eval_dataset=(train, test), eval_k=5,
                   log_with=("csv", "tensorboard"), plot=True)
    trainer()
    assert [s for s, _ in trainer.history["knn"]] == [2, 4]
    a = evaluate.embed_dataset(trainer.learner, train)
    b = evaluate.embed_dataset(trainer.learner, test)
    assert trainer.history["knn"][-1][1] == pytest.approx(evaluate.knn_accuracy(a.embeddings, a.labels, b.embeddings,
                                                                                b.labels, k=5, temperature=0.1))
    rows = [r.split(",") for r in (tmp_path / "metrics.csv").read_text().splitlines()]
    assert rows[0] == ["step", "name", "value"]
    assert {r[1] for r in rows[1:]} == {"loss", "lr", "momentum", "images_per_s", "knn", "train_minutes", "rank",
                                       "embedding_std"}
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


def test_missing_plots_module_is_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wrapssl.plots", None)
    make(tmp_path, steps=2, plot=True)()
    assert "no loss-curve plot" in capsys.readouterr().out
    assert (tmp_path / "backbone.pt").exists() and not (tmp_path / "loss_curve.png").exists()


def test_bf16_mixed_precision_on_cpu(tmp_path):
    trainer = make(tmp_path, steps=2, mixed_precision="bf16", checkpoint_every=1)
    trainer()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(torch.isfinite(torch.tensor(v)) for _, v in trainer.history["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())  # autocast, not a cast of the weights


def test_calling_twice_keeps_the_log(tmp_path):
    trainer = make(tmp_path, steps=2, checkpoint_every=1)
    trainer()
    trainer()  # already done: re-exports, logs nothing twice and keeps what was logged
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows if ",loss," in r] == [1, 2]


def test_single_process_cpu_launch_is_explained(tmp_path, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` without MPI starts one process: the Trainer says how to get two."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.warns(RuntimeWarning, match="--multi_gpu --num_processes N"):
        make(tmp_path, steps=1)


class ConstantNet(nn.Module):
    """A net whose output is the same vector for every image (its conv gets no useful gradient)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.out = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.expand(x.shape[0], -1) + 0 * self.conv(x).mean()


def test_health_is_logged_and_warns_on_a_collapsed_run(tmp_path):
    from wrapssl.health import health

    trainer = make(tmp_path, steps=4, health_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a healthy run must not warn of collapse
        trainer()
    assert [s for s, _ in trainer.history["rank"]] == [2, 4]
    # the logged values are the health of the embeddings of 48 (all) training images, computed again here
    ref = health(trainer.learner.embed(images()))
    assert trainer.history["rank"][-1][1] == pytest.approx(ref.rank, rel=1e-4)
    assert trainer.history["embedding_std"][-1][1] == pytest.approx(ref.std, rel=1e-4)
    assert not trainer.health.collapsed

    torch.manual_seed(0)
    collapsed = Trainer(ConstantNet(), **{**dict(dataset=images(), image_size=12, hidden_layer=-1, num_train_steps=4,
                                                 batch_size=8, checkpoint_folder=tmp_path / "c", log_every=1,
                                                 health_every=2), **QUIET, **HEADS})
    with pytest.warns(RuntimeWarning, match="looks collapsed at step 2") as caught:
        collapsed()
    assert sum("collapsed" in str(w.message) for w in caught) == 1  # said once, not at every check
    assert collapsed.health.collapsed and collapsed.history["rank"][-1][1] < 1.01


def test_train_minutes_skip_evaluations(tmp_path, monkeypatch):
    trainer = make(tmp_path, steps=4, eval_every=2, eval_dataset=(TensorImages(images(16), torch.arange(16) % 2),
                                                                  TensorImages(images(8), torch.arange(8) % 2)),
                   health_every=None)
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, KnnMonitor))
    slow_knn = monitor.knn

    def knn_taking_a_second(trainer):
        time.sleep(1.0)
        return slow_knn(trainer)
    monkeypatch.setattr(monitor, "knn", knn_taking_a_second)
    start = time.perf_counter()
    trainer()
    wall = (time.perf_counter() - start) / 60
    minutes = [m for _, m in trainer.history["train_minutes"]]
    assert minutes == sorted(minutes) and 0 < minutes[-1]
    assert minutes[-1] < wall - 1.9 / 60  # the two 1-second evaluations are not training time
