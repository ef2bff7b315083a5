"""Distillation: the loss against a naive computation; the teacher frozen, outside the learner's parameters,
state, optimiser and checkpoints, fed its own size and normalisation; teachers from weights files; a fixed
batch of Fashion-MNIST images on which the student comes to predict the teacher's features."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from wrapssl import Learner, Views
from wrapssl.augment import normalization
from wrapssl.methods.distill import distill_loss

from conftest import small_cnn


def teacher_net(channels: int = 3, width: int = 8) -> nn.Sequential:
    torch.manual_seed(1)
    return small_cnn(channels=channels, width=width)


def identity_views() -> Views:
    """One un-augmented view: what the student and the teacher see is then known exactly."""
    return Views([lambda x: x, lambda x: x], n_global=2)


@pytest.mark.parametrize("n, d", [(1, 3), (5, 8), (16, 32)])
def test_loss_is_the_squared_distance_of_unit_vectors(n, d):
    torch.manual_seed(n)
    s, t = torch.randn(n, d), torch.randn(n, d) * 5
    naive = np.mean([np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2)
                     for a, b in zip(s.double().numpy(), t.double().numpy())])
    assert distill_loss(s, t).item() == pytest.approx(naive, rel=1e-5)
    assert distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_is_frozen_and_outside_the_learner():
    teacher = teacher_net()
    teacher.train()  # the user's own flag, restored after every use
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = small_cnn()
    learner = Learner(student, 16, hidden_layer=-2, method="distill", teacher=teacher, teacher_layer=-2,
                      hidden_size=16)
    theirs = {id(p) for p in teacher.parameters()}
    assert not theirs & {id(p) for p in learner.parameters()}
    assert not any(k for k in learner.state_dict() if "teacher" in k)
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    modes = []
    hook = teacher[0].register_forward_hook(lambda m, a, o: modes.append((m.training, torch.is_grad_enabled())))
    for _ in range(3):
        loss = learner(torch.rand(8, 3, 16, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    hook.remove()
    assert len(modes) >= 3 and set(modes) == {(False, False)}  # eval mode, no graph (a first call also probes)
    assert teacher.training and all(m.training for m in teacher.modules())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN statistics too
    assert learner.method.projector[-1].out_features == 16  # the head maps to the teacher's width (2 x 8)

    learner.close()  # its hook on the teacher is gone: the teacher gives its logits again
    assert teacher(torch.rand(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("student_channels, teacher_channels", [(1, 3), (3, 1), (3, 3)])
def test_the_teacher_gets_the_same_view_at_its_own_size_channels_and_normalisation(student_channels,
                                                                                    teacher_channels):
    seen = []

    def record(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return net[:-1](x)

    mean, std = [0.2] * teacher_channels, [0.5] * teacher_channels
    learner = Learner(small_cnn(student_channels), 16, hidden_layer=-2, method="distill", views=identity_views(),
                      teacher=teacher_net(teacher_channels), teacher_layer=record, teacher_image_size=24,
                      teacher_normalize=(mean, std), hidden_size=16, channels=student_channels,
                      normalize=([0.5] * student_channels, [0.25] * student_channels))
    images = torch.rand(4, student_channels, 16, 16)
    learner(images)  # the first call also probes the teacher's input memory format
    seen.clear()
    learner(images)
    # naive: the same (un-augmented) images, channels converted, resized to 24, normalised with the teacher's
    x = images.mean(1, keepdim=True) if teacher_channels == 1 else images.expand(-1, 3, -1, -1)
    expected = (F.interpolate(x, size=(24, 24), mode="bilinear", antialias=True, align_corners=False) - 0.2) / 0.5
    assert len(seen) == 2  # one pass per view
    for got in seen:
        assert got.shape == (4, teacher_channels, 24, 24)
        assert torch.allclose(got, expected, atol=1e-6)


def pre_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's pooled features, computed by hand."""
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
        x = getattr(net, name)(x)
    return x.flatten(1)


def test_a_teacher_from_a_weights_file_with_another_classifier(tmp_path):
    torch.manual_seed(0)
    source = models.resnet18(num_classes=1000).eval()  # e.g. ImageNet weights: 1000 classes, RGB
    torch.save(source.state_dict(), tmp_path / "teacher.pt")
    learner = Learner(small_cnn(1), 32, hidden_layer=-2, method="distill", views=identity_views(), channels=1,
                      teacher=tmp_path / "teacher.pt", teacher_arch="resnet18", hidden_size=16,
                      normalize=((0.5,), (0.25,)))
    assert learner.method.projector[-1].out_features == 512
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        got = learner.method.targets([images])[0]
    # naive: the file's net with its stem summed over RGB for grey views (build_arch's rule), on the views
    # normalised with ImageNet's grey statistics (the default teacher_normalize for one channel)
    grey = models.resnet18(num_classes=1000).eval()
    grey.load_state_dict(source.state_dict())
    grey.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    grey.conv1.weight.data.copy_(source.conv1.weight.sum(1, keepdim=True))
    with torch.no_grad():
        expected = pre_logits(grey, normalization(1)(images))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert learner.method.teacher.net.training is False


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "needs a teacher: teacher="),
    (dict(teacher="weights.pt"), ValueError, "teacher_arch="),
    (dict(teacher=3), TypeError, "nn.Module or a path"),
    (dict(teacher=teacher_net(), teacher_pooling="max"), ValueError, "teacher_pooling"),
])
def test_bad_teachers_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Learner(small_cnn(), 16, hidden_layer=-2, method="distill", **kwargs)


def test_the_student_cannot_teach_itself():
    net = small_cnn()
    with pytest.raises(ValueError, match="another, trained net"):
        Learner(net, 16, hidden_layer=-2, method="distill", teacher=net)
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 10)  # not left hooked


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_trainer_optimises_and_saves_the_student_only(tmp_path):
    from wrapssl.trainer import Trainer, load_checkpoint

    teacher = teacher_net(1)
    images = torch.randint(0, 256, (32, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    settings = dict(dataset=images, image_size=12, hidden_layer=-2, method="distill", teacher=teacher,
                    teacher_layer=-2, hidden_size=16, num_train_steps=4, batch_size=8, checkpoint_every=2,
                    checkpoint_folder=tmp_path, progress=False, log_with=("csv",), plot=False)
    torch.manual_seed(0)
    trainer = Trainer(small_cnn(1, width=8), **settings)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.learner.parameters()}
    assert not optimised & {id(p) for p in teacher.parameters()}
    trainer()
    state = load_checkpoint(tmp_path / "checkpoint-00000004.pt")["learner"]
    assert not [k for k in state if "teacher" in k]
    assert set(state) == set(trainer.learner.state_dict())
    trainer.end()
    from conftest import reset_accelerate
    reset_accelerate()
    resumed = Trainer(small_cnn(1, width=8), **{**settings, "num_train_steps": 6, "resume": "auto"})
    assert resumed.step == 4  # the teacher, passed again, is all a resumed run needs
    resumed()
    assert resumed.step == 6


# ----------------------------------------------------------------------------- one fixed batch of real images

def test_on_a_fixed_batch_the_student_comes_to_predict_the_teachers_features(fmnist_train):
    """40 Adam steps on 32 Fashion-MNIST images: the distillation loss falls below a tenth of its start (the
    student with its head reproduces the teacher's features) and the teacher never moves. The run in which a
    label-trained teacher lifts the student's kNN accuracy on held-out images is in
    benchmarks/bench_methods.py --curves."""
    x = fmnist_train[0][:32]
    teacher = teacher_net(1, width=32)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    learner = Learner(small_cnn(1, width=16), 28, hidden_layer=-2, method="distill", teacher=teacher,
                      teacher_layer=-2, teacher_normalize=((0.286,), (0.353,)), normalize=((0.286,), (0.353,)),
                      hidden_size=256)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    losses = []
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(40):
            loss = learner(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(before_threads)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"loss {first:.3f} -> {last:.3f}")
    assert all(math.isfinite(v) for v in losses) and last < 0.1 * first
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())


def test_the_trainer_records_a_teacher_by_class_or_path_not_by_repr(tmp_path):
    from pathlib import Path

    from wrapssl import Trainer
    from wrapssl.archs import build_arch

    torch.manual_seed(0)
    torch.save(build_arch("small_resnet")[0].state_dict(), tmp_path / "teacher.pt")
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    weights = Path(tmp_path / "teacher.pt")
    for teacher, expected in ((teacher_net(), "Sequential"), (weights, str(weights))):
        trainer = Trainer(small_cnn(), dataset=images, image_size=16, hidden_layer=-2, method="distill",
                          teacher=teacher, teacher_arch="small_resnet", num_train_steps=1, batch_size=8,
                          checkpoint_folder=tmp_path / "run", plot=False)
        assert trainer.record["method.teacher"] == expected
        trainer.end()
