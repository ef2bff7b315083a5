"""The Trainer keeps work safe: folders never mix runs, blow-ups stop before a checkpoint holds them, TensorBoard
and the CSV keep every step once across a resume, stale temp files go, eval-mode nets are warned about, and
init= starts from a weights file."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import reset_accelerate
from test_trainer import HEADS, QUIET, images, make, tiny_net
from wrapssl.data import TensorImages
from wrapssl.trainer import NonFiniteLossError, RunConflictError, Trainer, latest_checkpoint

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_a_folder_with_another_run_is_refused_with_the_choices(tmp_path):
    make(tmp_path, steps=2)()
    reset_accelerate()
    with pytest.raises(RunConflictError) as refused:
        make(tmp_path, steps=2, learning_rate=1e-3)
    message = str(refused.value)
    assert "learning_rate 0.0003 -> 0.001" in message and "resume='auto'" in message
    assert refused.value.step == 2 and refused.value.checkpoint == latest_checkpoint(tmp_path)
    reset_accelerate()
    with pytest.raises(RunConflictError, match="resume=False would start this one at step 0"):
        make(tmp_path, steps=2, resume=False)
    reset_accelerate()
    assert make(tmp_path, steps=2).step == 2  # the same settings continue it


def test_weights_that_blow_up_finitely_are_never_checkpointed(tmp_path):
    trainer = make(tmp_path, steps=2, checkpoint_every=1)
    trainer()
    with torch.no_grad():
        for p in trainer.net.parameters():
            p.mul_(1e4)  # finite everywhere, 10,000 times the norm the run started with
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())
    with pytest.raises(NonFiniteLossError, match=r"norm grew from .* \(more than 1000x\)"):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000002.pt"


class Exploding(nn.Module):
    """A net whose weight is multiplied by 100 in every forward from call ``start`` on: a finite blow-up."""

    def __init__(self, start: int):
        super().__init__()
        self.conv, self.calls, self.start = nn.Conv2d(1, 8, 3), 0, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.start:
            with torch.no_grad():
                self.conv.weight.mul_(100.0)
        return self.conv(x).mean(dim=(2, 3))


def test_a_finite_blow_up_stops_the_run_before_it_is_saved(tmp_path):
    """Loss and weights stay finite while the norm explodes: the run stops at the next check, and neither a
    checkpoint nor backbone.pt holds the blown-up weights."""
    torch.manual_seed(0)
    trainer = Trainer(Exploding(start=5), dataset=images(), image_size=12, hidden_layer=-1, num_train_steps=8,
                      batch_size=8, checkpoint_every=2, checkpoint_folder=tmp_path, log_every=4,
                      **QUIET, **HEADS)
    with pytest.raises(NonFiniteLossError) as err:
        trainer()
    assert "norm grew" in str(err.value) and "checkpoint-00000002.pt is kept" in str(err.value)
    assert [p.name for p in tmp_path.glob("checkpoint-*.pt")] == ["checkpoint-00000002.pt"]
    assert not (tmp_path / "backbone.pt").exists()


class _CrashAfter(TensorImages):
    """Raises once ``marker`` exists and ``grace`` more items were read (lets one more step run and log)."""

    def __init__(self, x: torch.Tensor, marker: Path, grace: int):
        super().__init__(x)
        self.marker, self.grace = marker, grace

    def __getitem__(self, i):
        if self.marker.exists():
            self.grace -= 1
            if self.grace < 0:
                raise KeyboardInterrupt  # a crash that skips every handler but finally blocks
        return super().__getitem__(i)


def test_tensorboard_and_csv_keep_every_step_once_across_a_resume(tmp_path):
    """A run that logged step 3 after its step-2 checkpoint, then died, resumes at 2: both logs hold 1..6 once."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, steps=6, data=_CrashAfter(images(), tmp_path / "checkpoint-00000002.pt", grace=8),
             log_with=("csv", "tensorboard"))()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("3,loss,") for r in rows)  # step 3 was logged by the run that died
    reset_accelerate()
    make(tmp_path, steps=6, log_with=("csv", "tensorboard"), resume="auto")()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows if ",loss," in r] == [1, 2, 3, 4, 5, 6]
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "wrapssl"))  # the scalars' run
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = [".metrics.csv.k3j9x0a_.tmp", ".checkpoint-00000004.pt.a1b2c3d4.tmp", ".config.json.zz9yy8xx.tmp",
             ".backbone.pt.q1w2e3r4.tmp", ".metrics.json.0a9s8d7f.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"")  # zero bytes: what a kill before the first write leaves
    (tmp_path / ".backbone.safetensors.abcd1234.tmp").mkdir()
    mine = [".notes.tmp", "draft.tmp", ".metrics.csv"]
    for name in mine:
        (tmp_path / name).write_text("the user's")
    make(tmp_path, steps=1)()
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & {*stale, ".backbone.safetensors.abcd1234.tmp"}
    assert set(mine) <= left


def test_a_net_in_eval_mode_is_warned_about_and_trained_in_train_mode(tmp_path):
    net = tiny_net().eval()
    stats = net[1].running_mean.clone()
    with pytest.warns(RuntimeWarning, match=r"the Trainer trains the net in train mode.* in eval mode .* BatchNorm "
                                            "statistics update"):
        trainer = Trainer(net, dataset=images(), image_size=12, hidden_layer=-2, num_train_steps=1, batch_size=8,
                          checkpoint_folder=tmp_path, **QUIET, **HEADS)
    trainer()
    assert net.training and not torch.equal(net[1].running_mean, stats)
    reset_accelerate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a net in train mode gets no warning
        Trainer(tiny_net(), dataset=images(), image_size=12, hidden_layer=-2, num_train_steps=1, batch_size=8,
                checkpoint_folder=tmp_path / "b", **QUIET, **HEADS)


def test_init_starts_from_a_weights_file_with_another_classifier(tmp_path):
    """A 1000-class state dict (the test writes it) initialises a 10-class net; only the classifier keeps its own."""
    from torchvision import models

    torch.manual_seed(1)
    source = models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    torch.manual_seed(2)
    net = models.resnet18(num_classes=10)
    fc_before = net.fc.weight.detach().clone()
    data = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    Trainer(net, dataset=data, image_size=32, num_train_steps=1, batch_size=8, checkpoint_folder=tmp_path / "run",
            init=tmp_path / "resnet18.pth", **QUIET, **HEADS)
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(net.state_dict()[key], value), key
    assert torch.equal(net.fc.weight, fc_before)
    reset_accelerate()
    with pytest.raises(ValueError, match="do not fit ResNet: 80 key\(s\) of the net are not in the file.*check the model name"):
        Trainer(models.resnet34(num_classes=10), dataset=data, image_size=32, num_train_steps=1, batch_size=8,
                checkpoint_folder=tmp_path / "other", init=tmp_path / "resnet18.pth", **QUIET, **HEADS)


def test_a_learner_training_a_net_left_in_eval_mode_warns_once():
    from wrapssl import Learner

    net = tiny_net().eval()
    learner = Learner(net, 12, hidden_layer=-2, **HEADS)
    assert learner.training and not net.training  # the Learner never changes the net's modes by itself
    with pytest.warns(RuntimeWarning, match=r"BatchNorm/dropout layer\(s\) of the net are in eval mode"):
        learner(images(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        learner(images(8))  # said once
        learner.train()
        fresh = Learner(tiny_net(), 12, hidden_layer=-2, **HEADS)
        fresh(images(8))  # a net in train mode: no warning


def test_local_crops_a_fixed_size_vit_cannot_take_are_refused_before_any_step(tmp_path):
    """DINO's 14 px local crops through a timm ViT built for 32 px fail at the first step with the net's assertion;
    the Trainer says so at once, with what to change, and writes nothing. Without local crops the same net is fine."""
    timm = pytest.importorskip("timm")
    from wrapssl import Trainer

    def vit():
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                                 num_heads=2, num_classes=10)

    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"14x14 views \(its local crops\) do not run through VisionTransformer"
                                         r".*dynamic_img_size=True.*n_local=0"):
        Trainer(vit(), dataset=images, image_size=32, method="dino", num_train_steps=1, batch_size=8,
                checkpoint_folder=tmp_path / "run", plot=False)
    assert not (tmp_path / "run" / "checkpoint-00000001.pt").exists()
    trainer = Trainer(vit(), dataset=images, image_size=32, method="dino", num_train_steps=1, batch_size=8,
                      checkpoint_folder=tmp_path / "ok", plot=False, method_kwargs={"n_local": 0})
    trainer.end()
