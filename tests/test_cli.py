"""The wrapssl command line: embed, evaluate, plot and select over a run folder."""
import json

import numpy as np
import pytest
import torch

from wrapssl import cli
from wrapssl.archs import build_arch
from wrapssl.data import load_dataset
from wrapssl.evaluate import Embeddings, embed_dataset, evaluate
from wrapssl.select import select


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as train.py leaves it: backbone.pt and metrics.json with the arguments."""
    pytest.importorskip("sklearn")
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net, _ = build_arch("small_resnet", channels=1, num_classes=10)
    torch.save(net.state_dict(), folder / "backbone.pt")
    args = {"arch": "small_resnet", "data": "digits", "image_size": 16, "hidden_layer": None}
    (folder / "metrics.json").write_text(json.dumps({"args": args}))
    return folder, net


def test_embed_matches_embedding_the_net_directly(run_folder, tmp_path):
    folder, net = run_folder
    out = tmp_path / "emb.npz"
    assert cli.main(["embed", str(folder), "--out", str(out), "--limit", "64", "--csv", str(tmp_path / "e.csv"),
                     "--device", "cpu"]) == 0  # the direct computation below runs on the CPU too
    saved = Embeddings.load_npz(out)
    ds = torch.utils.data.Subset(load_dataset("digits", 16), range(64))
    direct = embed_dataset(net, ds, hidden_layer="avgpool")
    torch.testing.assert_close(saved.embeddings, direct.embeddings)
    assert torch.equal(saved.labels, direct.labels)
    assert len((tmp_path / "e.csv").read_text().splitlines()) == 65


def test_evaluate_prints_the_same_scores_as_the_library(run_folder, tmp_path, capsys):
    folder, net = run_folder
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    cli.main(["embed", str(folder), "--out", str(a), "--limit", "300"])
    cli.main(["embed", str(folder), "--out", str(b), "--limit", "120", "--data", "digits", "--split", "test"])
    capsys.readouterr()
    cli.main(["evaluate", "--train-embeddings", str(a), "--test-embeddings", str(b), "-k", "20",
              "--out", str(tmp_path / "scores.json")])
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate(Embeddings.load_npz(a), Embeddings.load_npz(b), k=20)
    assert printed.keys() == expected.keys()
    for key in expected:
        assert printed[key] == pytest.approx(expected[key], abs=1e-6)
    assert json.loads((tmp_path / "scores.json").read_text()) == printed


def test_select_writes_the_library_selection_and_duplicates(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    x[49] = x[3] * 1.001  # a planted near-copy
    emb = Embeddings(x, torch.full((50,), -1), [f"img{i}.png" for i in range(50)])
    emb.save_npz(tmp_path / "e.npz")
    out = tmp_path / "sel.csv"
    cli.main(["select", str(tmp_path / "e.npz"), "-n", "7", "--out", str(out), "--duplicates", "0.999"])
    rows = out.read_text().splitlines()[1:]
    expected = select(x, 7, seed=0)
    assert [int(r.split(",")[1]) for r in rows] == expected.indices.tolist()
    assert [r.split(",")[2] for r in rows] == [f"img{i}.png" for i in expected.indices.tolist()]
    dups = (tmp_path / "sel-duplicates.csv").read_text().splitlines()[1:]
    assert [d.split(",")[:2] for d in dups] == [["img3.png", "img49.png"]]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5
    x = torch.tensor(np.concatenate([c + rng.normal(size=(30, 16)) for c in centers]), dtype=torch.float32)
    Embeddings(x, torch.arange(3).repeat_interleave(30), [str(i) for i in range(90)]).save_npz(tmp_path / "e.npz")
    cli.main(["plot", str(tmp_path / "e.npz"), "--out", str(tmp_path / "map.png"), "--method", "pca"])
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "map.png")
    assert img.ndim == 3 and img.std() > 0.01


def test_bare_backbone_without_metrics_needs_arch(run_folder, tmp_path):
    _, net = run_folder
    torch.save(net.state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(SystemExit, match="pass --arch"):
        cli.main(["embed", str(tmp_path / "backbone.pt"), "--data", "digits", "--out", str(tmp_path / "x.npz")])
    cli.main(["embed", str(tmp_path / "backbone.pt"), "--arch", "small_resnet", "--data", "digits",
              "--image-size", "16", "--limit", "8", "--out", str(tmp_path / "x.npz")])
    assert Embeddings.load_npz(tmp_path / "x.npz").embeddings.shape == (8, net.fc.in_features)
    with pytest.raises(SystemExit, match="do not fit arch"):
        cli.main(["embed", str(tmp_path / "backbone.pt"), "--arch", "resnet18", "--data", "digits",
                  "--out", str(tmp_path / "y.npz")])


def test_help_of_every_subcommand(capsys):
    for cmd in ("embed", "evaluate", "plot", "select"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        assert "--" in capsys.readouterr().out
