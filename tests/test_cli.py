"""The wrapssl command line: embed, evaluate, plot and select over a run folder; outputs land in the run folder."""
import json

import numpy as np
import pytest
import torch

from conftest import help_blocks
from wrapssl import cli, commands
from wrapssl.archs import build_arch
from wrapssl.data import load_dataset
from wrapssl.evaluate import Embeddings, embed_dataset, evaluate
from wrapssl.select import near_duplicates, relative_threshold, select

CLASSES = [f"digit {d}" for d in range(10)]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as the training app leaves it: backbone.pt and metrics.json with the arguments and classes."""
    pytest.importorskip("sklearn")
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net, _ = build_arch("small_resnet", channels=1, num_classes=10)
    torch.save(net.state_dict(), folder / "backbone.pt")
    args = {"arch": "small_resnet", "data": "digits", "image_size": 16, "hidden_layer": None}
    (folder / "metrics.json").write_text(json.dumps({"args": args, "classes": CLASSES}))
    return folder, net


def test_embed_matches_embedding_the_net_directly(run_folder, tmp_path, capsys):
    folder, net = run_folder
    out = tmp_path / "emb.npz"
    assert cli.main(["embed", str(folder), "--out", str(out), "--limit", "64", "--csv", str(tmp_path / "e.csv"),
                     "--device", "cpu"]) == 0  # the direct computation below runs on the CPU too
    assert "embedding test split" in capsys.readouterr().err  # a progress bar
    saved = Embeddings.load_npz(out)
    ds = torch.utils.data.Subset(load_dataset("digits", 16, split="test"), range(64))  # embed's default split
    direct = embed_dataset(net, ds, hidden_layer="avgpool")
    torch.testing.assert_close(saved.embeddings, direct.embeddings)
    assert torch.equal(saved.labels, direct.labels)
    assert saved.files == load_dataset("digits").files[1297:1297 + 64]
    assert len((tmp_path / "e.csv").read_text().splitlines()) == 65


def test_embed_chunks_agree_with_one_pass(run_folder, tmp_path, monkeypatch):
    folder, _ = run_folder
    monkeypatch.setattr(commands, "EMBED_CHUNK", 7)  # 30 images in chunks of 7, 7, 7, 7, 2
    cli.main(["embed", str(folder), "--out", str(tmp_path / "a.npz"), "--limit", "30", "--batch-size", "5"])
    monkeypatch.setattr(commands, "EMBED_CHUNK", 4096)
    cli.main(["embed", str(folder), "--out", str(tmp_path / "b.npz"), "--limit", "30"])
    a, b = Embeddings.load_npz(tmp_path / "a.npz"), Embeddings.load_npz(tmp_path / "b.npz")
    torch.testing.assert_close(a.embeddings, b.embeddings)
    assert torch.equal(a.labels, b.labels) and a.files == b.files


def test_outputs_default_to_the_run_folder(run_folder, tmp_path, monkeypatch, capsys):
    folder, _ = run_folder
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    cli.main(["embed", str(folder), "--limit", "40", "--split", "train"])
    cli.main(["embed", str(folder), "--limit", "40"])
    emb = folder / "embeddings-test.npz"
    assert emb.is_file() and (folder / "embeddings-train.npz").is_file()
    cli.main(["select", str(emb), "-n", "5", "--duplicates", "0.2"])
    assert (folder / "embeddings-test-selection.csv").is_file()
    assert (folder / "embeddings-test-selection-duplicates.csv").is_file()
    capsys.readouterr()
    cli.main(["evaluate", "--train-embeddings", str(folder / "embeddings-train.npz"), "--test-embeddings", str(emb),
              "-k", "5"])
    assert json.loads((folder / "scores.json").read_text()) == json.loads(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_prints_the_same_scores_as_the_library(run_folder, tmp_path, capsys):
    folder, net = run_folder
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    cli.main(["embed", str(folder), "--out", str(a), "--limit", "300"])
    cli.main(["embed", str(folder), "--out", str(b), "--limit", "120", "--data", "digits", "--split", "test"])
    capsys.readouterr()
    cli.main(["evaluate", "--train-embeddings", str(a), "--test-embeddings", str(b), "-k", "20",
              "--out", str(tmp_path / "scores.json")])
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert "scoring 120 test embeddings against 300 train embeddings" in captured.err  # progress
    expected = evaluate(Embeddings.load_npz(a), Embeddings.load_npz(b), k=20)
    assert printed.keys() == expected.keys()
    for key in expected:
        assert printed[key] == pytest.approx(expected[key], abs=1e-6)
    assert json.loads((tmp_path / "scores.json").read_text()) == printed


def test_evaluate_a_run_keeps_queries_out_of_the_memory(run_folder, capsys):
    folder, _ = run_folder
    cli.main(["evaluate", str(folder), "-k", "20", "--labels", "none"])
    scores = json.loads(capsys.readouterr().out)
    assert (scores["n_train"], scores["n_test"]) == (1297, 500)  # digits: the app's own split, disjoint


def test_select_writes_the_library_selection_and_duplicates(tmp_path, capsys):
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    x[49] = x[3] * 1.001  # a planted near-copy
    emb = Embeddings(x, torch.full((50,), -1), [f"img{i}.png" for i in range(50)])
    emb.save_npz(tmp_path / "e.npz")
    out = tmp_path / "sel.csv"
    cli.main(["select", str(tmp_path / "e.npz"), "-n", "7", "--out", str(out), "--duplicates", "0.2"])
    rows = out.read_text().splitlines()[1:]
    expected = select(x, 7, seed=0)
    assert [int(r.split(",")[1]) for r in rows] == expected.indices.tolist()
    assert [r.split(",")[2] for r in rows] == [f"img{i}.png" for i in expected.indices.tolist()]
    dups = (tmp_path / "sel-duplicates.csv").read_text().splitlines()[1:]
    assert [d.split(",")[:2] for d in dups] == [["img3.png", "img49.png"]]
    assert f"cosine >= {relative_threshold(x, 0.2):.4f}" in capsys.readouterr().out
    cli.main(["select", str(tmp_path / "e.npz"), "-n", "7", "--out", str(out), "--duplicate-cosine", "0.5"])
    dups = (tmp_path / "sel-duplicates.csv").read_text().splitlines()[1:]
    assert len(dups) == len(near_duplicates(x, 0.5)[0]) > 1


def test_plot_writes_a_png_with_the_runs_class_names(run_folder, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from wrapssl import plots

    folder, _ = run_folder
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5
    x = torch.tensor(np.concatenate([c + rng.normal(size=(30, 16)) for c in centers]), dtype=torch.float32)
    Embeddings(x, torch.arange(3).repeat_interleave(30), [str(i) for i in range(90)]).save_npz(folder / "p.npz")
    seen = []
    real = plots.embedding_map
    monkeypatch.setattr(plots, "embedding_map", lambda *a, **k: seen.append(k["class_names"]) or real(*a, **k))
    cli.main(["plot", str(folder / "p.npz"), "--method", "pca"])
    import matplotlib.image
    img = matplotlib.image.imread(folder / "p-map.png")
    assert img.ndim == 3 and img.std() > 0.01
    cli.main(["plot", str(folder / "p.npz"), "--method", "pca", "--class-names", "a, b,c",
              "--out", str(tmp_path / "m.png")])
    assert seen == [CLASSES, ["a", "b", "c"]]


def test_bare_backbone_without_metrics_needs_arch(run_folder, tmp_path):
    _, net = run_folder
    torch.save(net.state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(SystemExit, match="pass --arch"):
        cli.main(["embed", str(tmp_path / "backbone.pt"), "--data", "digits", "--out", str(tmp_path / "x.npz")])
    cli.main(["embed", str(tmp_path / "backbone.pt"), "--arch", "small_resnet", "--data", "digits",
              "--image-size", "16", "--limit", "8", "--out", str(tmp_path / "x.npz")])
    assert Embeddings.load_npz(tmp_path / "x.npz").embeddings.shape == (8, net.fc.in_features)
    with pytest.raises(SystemExit) as refused:
        cli.main(["embed", str(tmp_path / "backbone.pt"), "--arch", "resnet18", "--data", "digits",
                  "--out", str(tmp_path / "y.npz")])
    message = str(refused.value.code)
    assert message.startswith(f"error: the weights in {tmp_path / 'backbone.pt'} do not fit ResNet: shapes differ "
                              "for conv1.weight") and "'resnet18'" in message


# each command with the least it needs to parse (no file is read while parsing)
REQUIRED = {"embed": ["x"], "evaluate": [], "plot": ["x.npz"], "select": ["x.npz", "-n", "1"]}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_help_shows_the_value_each_option_takes_when_not_given(command, capsys):
    from test_train_script import shows

    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    blocks = help_blocks(capsys.readouterr().out)
    assert "--out" in blocks
    taken = vars(cli.build_parser().parse_args([command, *REQUIRED[command]]))  # what a command without it uses
    given = set(REQUIRED[command])
    # options whose value is worked out at run time (None here) describe the rule instead
    fixed = {flag: taken[flag.lstrip("-").replace("-", "_")] for flag in blocks if flag not in given
             and taken.get(flag.lstrip("-").replace("-", "_")) not in (None, [])}
    hidden = [flag for flag, value in fixed.items() if not shows(blocks[flag], value)]
    assert not hidden, f"the help of {command} {hidden} does not show the value used without it"


def test_the_select_methods_offered_are_the_modules():
    """The parser names select's methods without loading it (so `wrapssl select --help` is fast): the same ones,
    its default first."""
    from wrapssl.select import DEFAULT_METHOD, METHODS

    assert set(cli.SELECT_METHODS) == set(METHODS) and cli.SELECT_METHODS[0] == DEFAULT_METHOD
    assert cli.build_parser().parse_args(["select", "x.npz", "-n", "1"]).method == DEFAULT_METHOD


def test_bad_numbers_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["select", "x.npz", "-n", "0"])
    assert e.value.code == 2 and "argument -n: expected a positive whole number" in capsys.readouterr().err


def test_python_m_wrapssl_is_the_command(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "wrapssl", "select", "x.npz", "-n", "0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "argument -n: expected a positive whole number" in done.stderr
    assert "Traceback" not in done.stderr


def test_evaluate_agrees_with_the_training_app_on_the_same_backbone(tmp_path, capsys):
    """One protocol everywhere: `wrapssl evaluate RUN` gives the app's own scores, baselines included."""
    from conftest import reset_accelerate
    from wrapssl import app

    reset_accelerate()
    metrics = app.main(["--data", "digits", "--image-size", "8", "--batch-size", "16", "--steps", "3", "--knn-k",
                        "20", "--no-plots", "--labels", "none", "--seed", "3", "--out", str(tmp_path)])
    reset_accelerate()
    capsys.readouterr()
    cli.main(["evaluate", str(tmp_path), "-k", "20", "--labels", "none"])
    scores = json.loads(capsys.readouterr().out)
    assert scores["n_train"] == metrics["knn_memory"] == 1297  # every training image is the memory in both
    assert scores["knn_top1"] == pytest.approx(metrics["scores"]["pretrained"]["knn"], abs=1e-6)
    assert scores["linear_top1"] == pytest.approx(metrics["scores"]["pretrained"]["linear"], abs=0.005)
    for row in ("raw_pixels", "random_init"):
        assert scores["baselines"][row]["knn"] == pytest.approx(metrics["scores"][row]["knn"], abs=1e-6), row
    cli.main(["evaluate", str(tmp_path), "-k", "20", "--no-baselines", "--labels", "none",
              "--out", str(tmp_path / "s.json")])
    assert "baselines" not in json.loads(capsys.readouterr().out)
