"""Fine-tuning and the self-describing backbone: what `wrapssl finetune` and `wrapssl.finetune` give a user."""
from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from torch.utils.data import Subset

from wrapssl.archs import build_arch
from wrapssl.backbone import BackboneInfo, load_backbone, read_backbone_info, save_backbone
from wrapssl.evaluate.budgets import Budget, draw_labels
from wrapssl.data import load_dataset
from wrapssl.finetune import (Classifier, FinetuneConflictError, accuracy, dataset_labels, finetune,
                              load_classifier)

SIZE = 16  # digits at 16 px: the small ResNet trains in seconds


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", SIZE, split="train"), load_dataset("digits", SIZE, split="test")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as `wrapssl train` leaves it: a small ResNet saved with its metadata."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net, layer = build_arch("small_resnet", channels=3, num_classes=10, image_size=SIZE)
    info = BackboneInfo(arch="small_resnet", hidden_layer={"classifier_input": "fc", "dropouts": []},
                        image_size=SIZE, channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                        classes=[str(i) for i in range(10)])
    save_backbone(net, folder, info)
    (folder / "metrics.json").write_text(json.dumps({"data": "digits", "args": {"data": "digits", "seed": 0}}))
    return folder


def test_backbone_describes_itself(run_folder):
    info = read_backbone_info(run_folder / "backbone.safetensors")
    assert (info.arch, info.image_size, info.channels, info.mean, info.std) == \
        ("small_resnet", SIZE, 3, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert info.classes == [str(i) for i in range(10)] and info.version
    # the metadata is safetensors' own header, readable without wrapssl
    from safetensors import safe_open
    with safe_open(str(run_folder / "backbone.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["arch"]) == "small_resnet"
    # backbone.pt beside it finds the same description
    assert read_backbone_info(run_folder / "backbone.pt") == info
    for name in ("backbone.safetensors", "backbone.pt"):
        assert stat.S_IMODE((run_folder / name).stat().st_mode) & 0o044 == 0o044  # readable by others


def test_embedder_applies_the_recorded_normalisation(run_folder, digits):
    backbone = load_backbone(run_folder)
    images = torch.stack([digits[0][i][0] for i in range(4)])
    with backbone.embedder() as embed:
        got = embed(images)
    # by hand: [0, 1], grey repeated to RGB, (x - 0.5) / 0.25, the net up to its BN-neck
    x = (images.float().div(255).repeat(1, 3, 1, 1) - 0.5) / 0.25
    net = backbone.net.eval()
    with torch.no_grad():
        h = net.avgpool(net.layers(net.relu(net.bn1(net.conv1(x))))).flatten(1)
        want = net.neck(h)
    torch.testing.assert_close(got, want)


def test_an_old_run_folder_loads_from_its_metrics_json(tmp_path):
    torch.manual_seed(1)
    net, _ = build_arch("small_resnet", channels=3, num_classes=10, image_size=SIZE)
    torch.save(net.state_dict(), tmp_path / "backbone.pt")
    (tmp_path / "metrics.json").write_text(json.dumps({"classes": ["a", "b"], "args": {
        "arch": "small_resnet", "image_size": SIZE, "normalize": None, "hidden_layer": None}}))
    backbone = load_backbone(tmp_path)
    assert backbone.info.arch == "small_resnet" and backbone.info.classes == ["a", "b"]
    # the app trained such runs with ImageNet's statistics, so they embed with them
    assert backbone.info.mean == pytest.approx([0.485, 0.456, 0.406])
    for a, b in zip(backbone.net.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def test_a_bare_weights_file_needs_arch(tmp_path):
    net, _ = build_arch("small_resnet", channels=3, num_classes=10, image_size=SIZE)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="--arch"):
        load_backbone(tmp_path / "weights.pt")
    assert load_backbone(tmp_path / "weights.pt", arch="small_resnet").info.num_classes == 10
    message = run_cli("finetune", str(tmp_path / "weights.pt"), "--data", "digits", "--out", str(tmp_path / "ft"))
    assert message.startswith("error:") and "--arch" in message and "\n" not in message
    assert not (tmp_path / "ft").exists()


def test_finetuning_beats_its_start_and_saves_a_classifier(tmp_path, digits):
    train, test = digits
    idx = draw_labels(dataset_labels(train), Budget(10, True), seed=0)
    torch.manual_seed(0)
    net, _ = build_arch("small_resnet", channels=3, num_classes=10, image_size=SIZE)
    start = Classifier(net, build_arch("small_resnet", 3, 10, SIZE)[1], 10, None, SIZE)
    before = accuracy(start, test)  # the random net and head
    result = finetune(net, Subset(train, idx), test, out=tmp_path / "ft", steps=60, batch_size=32, lr=1e-2,
                      backbone_lr_ratio=1.0, linear_init=False, progress=False)
    assert result.test_accuracy > max(0.5, before + 0.3)
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["test_accuracy"] == result.test_accuracy and record["labelled"] == 100
    # the saved classifier, loaded on its own, scores the same
    assert accuracy(load_classifier(tmp_path / "ft"), test) == pytest.approx(result.test_accuracy)


def test_linear_head_start_is_the_linear_probe(digits):
    """The LP-FT head, fitted on raw features, predicts as the report's linear probe (standardised features)."""
    from wrapssl.evaluate import linear_probe
    from wrapssl.finetune import _features, fit_linear_head
    train, test = digits
    torch.manual_seed(0)
    net, layer = build_arch("small_resnet", channels=3, num_classes=10, image_size=SIZE)
    model = Classifier(net, layer, 10, None, SIZE)
    x, y = _features(model, train, torch.device("cpu"))
    xt, yt = _features(model, test, torch.device("cpu"))
    fit_linear_head(model.head, x, y, weight_decay=1e-4)
    with torch.no_grad():
        ours = (model.head(xt).argmax(1) == yt).float().mean().item()
    assert ours == pytest.approx(linear_probe(x, y, xt, yt, weight_decay=1e-4), abs=0.01)
    assert ours > 0.6  # random features of digits are linearly separable enough


def test_resume_continues_exactly(tmp_path, digits):
    train, test = digits
    idx = draw_labels(dataset_labels(train), Budget(5, True), seed=1)
    kwargs = dict(steps=20, batch_size=16, checkpoint_every=10, progress=False)

    def net():
        torch.manual_seed(0)
        return build_arch("small_resnet", channels=3, num_classes=10, image_size=SIZE)[0]

    whole = finetune(net(), Subset(train, idx), None, out=tmp_path / "a", **kwargs)
    assert sorted(p.name for p in (tmp_path / "a").glob("finetune-*.pt")) == ["finetune-10.pt", "finetune-20.pt"]
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "finetune-10.pt", tmp_path / "b")  # as if stopped after step 10
    resumed = finetune(net(), Subset(train, idx), None, out=tmp_path / "b", **kwargs)
    assert resumed.steps == 20
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FinetuneConflictError, match="lr"):  # other settings: refused, the run kept
        finetune(net(), Subset(train, idx), None, out=tmp_path / "b", lr=1e-2, **kwargs)
    assert (tmp_path / "b" / "finetune-20.pt").is_file()


@pytest.mark.parametrize("labels, message", [
    (lambda y: torch.full_like(y, -1), "no labels"),
    (lambda y: torch.zeros_like(y), "single class"),
])
def test_unusable_labels_are_refused(digits, labels, message):
    from wrapssl.data import TensorImages
    train = digits[0]
    images = torch.stack([train[i][0] for i in range(40)])
    bad = TensorImages(images, labels(dataset_labels(train)[:40]))
    net, _ = build_arch("small_resnet", channels=3, num_classes=10, image_size=SIZE)
    with pytest.raises(ValueError, match=message):
        finetune(net, bad, None, steps=1, progress=False)


def test_cli_finetune_from_a_run_and_its_errors(run_folder, tmp_path, capsys):
    assert run_cli("finetune", str(run_folder), "--labels", "5/class", "--steps", "15",
                   "--out", str(tmp_path / "ft")) is None
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["labelled"] == 50 and f"{100 * record['test_accuracy']:.2f}%" in capsys.readouterr().out
    assert record["classes"] == [str(i) for i in range(10)]  # from the backbone's metadata
    for args, words in [(("--labels", "500/class"), "asks for 500 labels"),
                        (("--labels", "5/class", "--steps", "15", "--lr", "0.1", "--out", str(tmp_path / "ft")),
                         "other settings"),
                        (("--labels", "ten"), "label counts")]:
        message = run_cli("finetune", str(run_folder), *args)
        assert message.startswith("error:") and "\n" not in message, message
        assert words in message
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text()) == record  # the refused run lost nothing


def run_cli(*argv: str) -> str | None:
    """Run the ``wrapssl`` command in this process: None when it succeeds, else its one error line."""
    from wrapssl.cli import main
    try:
        main(list(argv))
    except SystemExit as e:
        if e.code in (0, None):
            return None
        return str(e.code)
    return None


@pytest.mark.slow
def test_two_processes_finetune_one_classifier(run_folder, tmp_path):
    """`accelerate launch --num_processes 2 -m wrapssl finetune`: both processes train (the global batch is
    twice a process's), rank 0 writes one classifier that scores what it reports."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "wrapssl", "finetune", str(run_folder), "--labels", "4/class", "--steps", "6",
                           "--batch-size", "8", "--out", str(tmp_path / "ft")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["settings"]["global_batch"] == 16 and record["steps"] == 6
    assert done.stdout.count("test accuracy") == 1  # rank 0 speaks
    test = load_dataset("digits", SIZE, split="test")
    assert accuracy(load_classifier(tmp_path / "ft"), test) == pytest.approx(record["test_accuracy"])


def test_cli_finetune_on_the_images_select_picked(run_folder, tmp_path, capsys):
    """A folder with class subfolders and a `wrapssl select` CSV: the picks train, held-out images test, and no
    picked image is among the test images."""
    from PIL import Image
    data = load_dataset("digits", SIZE)
    for i in range(60):
        image, label = data[i]
        (tmp_path / "photos" / f"c{label % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(tmp_path / "photos" / f"c{label % 3}" / f"{i:03d}.png")
    picks = [0, 5, 7, 12, 20, 33, 41, 50]  # 0, 5, 20 ... are also every-fifth images: they must leave the test
    rows = "rank,index,file\n" + "".join(f"{r},{i},x\n" for r, i in enumerate(picks))
    (tmp_path / "sel.csv").write_text(rows)
    assert run_cli("finetune", str(run_folder), "--data", str(tmp_path / "photos"), "--picks",
                   str(tmp_path / "sel.csv"), "--steps", "3", "--out", str(tmp_path / "ft")) is None
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["labelled"] == len(picks)
    held_out = [i for i in range(60) if i % 5 == 0 and i not in picks]
    assert f"on {len(held_out)} images" in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("rank,index,file\n0,60,x\n")
    message = run_cli("finetune", str(run_folder), "--data", str(tmp_path / "photos"), "--picks",
                      str(tmp_path / "bad.csv"), "--out", str(tmp_path / "ft2"))
    assert message.startswith("error:") and "0..59" in message
