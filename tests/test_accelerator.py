"""Accelerate's conventions in the Trainer: accumulation and dynamo settings, save_model export, end_training."""
from __future__ import annotations

import pytest
import torch
from accelerate.tracking import GeneralTracker

from conftest import reset_accelerate
from test_trainer import images, make, tiny_net
from wrapssl.learner import Learner
from wrapssl.monitor import NonFiniteLossError
from wrapssl.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def batches_per_step(trainer: Trainer) -> float:
    """Batches the run consumed per optimiser step, counted from the data position and Adam's own counter."""
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert len(adam_steps) == 1
    per_epoch = len(trainer.dataset) // trainer.global_batch
    batches = trainer.epoch * per_epoch + trainer.samples_in_epoch // trainer.global_batch
    return batches / adam_steps.pop()


@pytest.mark.parametrize("where", ["environment", "accelerator_options", "plugin"])
def test_accumulation_set_for_accelerate_is_honoured(tmp_path, monkeypatch, where):
    from accelerate.utils import GradientAccumulationPlugin

    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", raising=False)
    extra = {}
    if where == "environment":  # what `accelerate launch` and `accelerate config` hand to the script
        monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    elif where == "accelerator_options":
        extra["accelerator_options"] = {"gradient_accumulation_steps": 3}
    else:
        extra["accelerator_options"] = {"gradient_accumulation_plugin": GradientAccumulationPlugin(num_steps=3)}
    trainer = make(tmp_path, steps=4, batch_size=4, checkpoint_every=100, **extra)
    trainer()
    assert trainer.grad_accum == 3 and batches_per_step(trainer) == 3
    assert trainer.record["gradient_accumulation_steps"] == 3


def test_accumulation_argument_wins_over_the_environment_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    with pytest.warns(RuntimeWarning, match="overrides ACCELERATE_GRADIENT_ACCUMULATION_STEPS=3"):
        trainer = make(tmp_path, steps=2, batch_size=4, gradient_accumulation_steps=2, checkpoint_every=100)
    trainer()
    assert batches_per_step(trainer) == 2


def test_bad_accumulation_settings_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "zero")
    with pytest.raises(ValueError, match="fix or unset it"):
        make(tmp_path)
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    with pytest.raises(ValueError, match="give it once"):
        make(tmp_path, gradient_accumulation_steps=2, accelerator_options={"gradient_accumulation_steps": 4})


@pytest.mark.parametrize("where", ["environment", "accelerator_options"])
def test_dynamo_backend_from_accelerate_compiles_the_encoders(tmp_path, monkeypatch, where):
    """`accelerate config`'s dynamo backend reaches torch.compile for the encoders; the run matches an eager one."""
    calls = []
    real_compile = torch.compile

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_compile(*args, **kwargs)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", spy)
    extra = {}
    if where == "environment":
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    else:
        extra["accelerator_options"] = {"dynamo_backend": "eager"}
    compiled = make(tmp_path / "c", steps=3, **extra)
    compiled()
    assert calls and all(c.get("backend") == "eager" for c in calls)
    assert isinstance(compiled.model, Learner)  # the whole Learner is not one compiled graph
    torch._dynamo.reset()
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    reset_accelerate()
    calls.clear()
    plain = make(tmp_path / "p", steps=3)
    plain()
    assert not calls
    for (step, a), (_, b) in zip(compiled.history["loss"], plain.history["loss"]):
        assert a == pytest.approx(b, rel=1e-4), step


def test_backbone_is_also_exported_with_save_model(tmp_path):
    from safetensors.torch import load_file

    trainer = make(tmp_path, steps=2, checkpoint_every=100)
    net = trainer()
    exported = load_file(tmp_path / "backbone.safetensors")
    expected = net.state_dict()
    assert exported.keys() == expected.keys()
    for k in expected:
        assert torch.equal(exported[k], expected[k]), k
    fresh = tiny_net()
    fresh.load_state_dict(exported)  # loads into a new copy of the user's net as it is
    assert not list(tmp_path.glob(".*tmp"))


class Recorder(GeneralTracker):
    """A user's own Accelerate tracker: records what Accelerate asks of it."""

    name, requires_logging_directory, main_process_only = "recorder", False, True

    def __init__(self):
        super().__init__()
        self.events = []

    @property
    def tracker(self):
        return self

    def start(self):
        self.events.append("start")

    def store_init_configuration(self, values):
        self.events.append("config")

    def log(self, values, step=None, **kwargs):
        self.events.append(("log", step, sorted(values)))

    def finish(self):
        self.events.append("finish")


def test_trackers_end_through_accelerate(tmp_path):
    recorder = Recorder()
    with make(tmp_path, steps=2, checkpoint_every=100, log_every=2,
              accelerator_options={"log_with": [recorder]}) as trainer:
        trainer()
        trainer()  # already at its last step: nothing more is logged, trackers stay open
        assert recorder.events == ["start", "config",
                                   ("log", 2, ["images_per_s", "loss", "lr", "momentum", "train_minutes"]),
                                   ("log", 2, ["embedding_std", "rank"])]  # the health check at the last step
    assert recorder.events[-1] == "finish" and recorder.events.count("finish") == 1


def test_a_failed_run_ends_its_trackers(tmp_path):
    from test_trainer import NaNFrom

    recorder = Recorder()
    trainer = Trainer(tiny_net(), dataset=images(), image_size=12, hidden_layer=-2, num_train_steps=4, batch_size=8,
                      checkpoint_folder=tmp_path, log_every=1, method=NaNFrom(2), progress=False, plot=False,
                      accelerator_options={"log_with": [recorder]})
    with pytest.raises(NonFiniteLossError):
        trainer()
    assert recorder.events[-1] == "finish"
    assert [e[1] for e in recorder.events if e[0] == "log"] == [1]  # the bad step was never logged

