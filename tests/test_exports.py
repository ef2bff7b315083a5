"""The package's front door: byol-pytorch's trainer code runs with `from wrapssl import ...`, and local weights
load through the exported build_arch / load_weights."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

# byol-pytorch 0.9.1's README trainer snippet, with its import pointed at wrapssl and its sizes cut for a CPU
TRAINER = """
from torchvision import models

from wrapssl import (
    BYOL,
    BYOLTrainer,
    MockDataset
)

resnet = models.resnet18()

dataset = MockDataset(32, 16)

trainer = BYOLTrainer(
    resnet,
    dataset = dataset,
    image_size = 32,
    hidden_layer = 'avgpool',
    learning_rate = 3e-4,
    num_train_steps = 1,
    batch_size = 8,
    checkpoint_every = 1
)

trainer()
"""


def test_byol_pytorch_trainer_code_runs_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space: dict = {}
    exec(TRAINER, space)
    assert space["trainer"].step == 1
    saved = torch.load(tmp_path / "checkpoints" / "backbone.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in space["resnet"].state_dict().items())


def test_weights_from_a_file_through_build_arch_and_load_weights(tmp_path):
    from wrapssl import build_arch, load_weights

    torch.manual_seed(3)
    net, _ = build_arch("resnet18", num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    rebuilt, layer = build_arch("resnet18", num_classes=5, weights=tmp_path / "r18.pth", ignore=["fc."])
    assert torch.equal(rebuilt.conv1.weight, net.conv1.weight) and rebuilt.fc.out_features == 5
    other, _ = build_arch("resnet18", num_classes=1000)
    assert torch.equal(load_weights(other, tmp_path / "r18.pth").layer4[1].conv2.weight, net.layer4[1].conv2.weight)
