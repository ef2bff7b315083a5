"""The app starts from a local weights file with --init: a state dict the test writes, its classifier for
another number of classes; a file of another net is one error line naming the keys."""
from __future__ import annotations

import pytest
import torch

from conftest import reset_accelerate
from wrapssl import app
from wrapssl.archs import SmallResNet, build_arch
from wrapssl.evaluate import embed_dataset, knn_accuracy
from wrapssl.data import load_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate")
RUN = ["--data", "digits", "--image-size", "8", "--batch-size", "16", "--knn-train", "200", "--knn-test", "50",
       "--knn-k", "5", "--no-plots", "--labels", "none"]  # the baselines hold the random-init row


def test_init_is_where_the_run_starts(tmp_path):
    """The report's "random init" row is the score of the file's weights: the run started from them."""
    torch.manual_seed(7)
    source = SmallResNet(channels=3, num_classes=4)  # another classifier: pretraining never runs it
    torch.save(source.state_dict(), tmp_path / "start.pt")
    metrics = app.main([*RUN, "--steps", "1", "--init", str(tmp_path / "start.pt"), "--out", str(tmp_path / "run")])
    net, layer = build_arch("small_resnet", channels=3, num_classes=10, image_size=8)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    net.load_state_dict(state, strict=False)
    memory = torch.utils.data.Subset(load_dataset("digits", 8, split="train"), range(200))
    queries = torch.utils.data.Subset(load_dataset("digits", 8, split="test"), range(50))
    a, b = embed_dataset(net, memory, hidden_layer=layer), embed_dataset(net, queries, hidden_layer=layer)
    expected = knn_accuracy(a.embeddings, a.labels, b.embeddings, b.labels, k=5, temperature=0.1)
    assert metrics["scores"]["random_init"]["knn"] == pytest.approx(expected)
    config = torch.load(tmp_path / "run" / "checkpoint-00000001.pt", weights_only=True)["config"]
    assert config["init"] == str(tmp_path / "start.pt")


def test_init_of_another_net_is_one_line(tmp_path):
    torch.save(SmallResNet(widths=(8, 16, 32, 64)).state_dict(), tmp_path / "narrow.pt")
    reset_accelerate()
    with pytest.raises(SystemExit) as refused:
        app.main([*RUN, "--steps", "1", "--init", str(tmp_path / "narrow.pt"), "--out", str(tmp_path / "run")])
    message = str(refused.value.code)
    assert message.startswith(f"error: the weights in {tmp_path / 'narrow.pt'} do not fit SmallResNet: shapes differ")
    assert "\n" not in message
