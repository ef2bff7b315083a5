"""Evaluation metrics against independent computations (naive loops, scikit-learn), and embedding export."""
import csv
import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from wrapssl.evaluate import Embeddings

ev = importlib.import_module("wrapssl.evaluate")  # the module, even if wrapssl exports a same-named function



def blobs(n_per: int, n_classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around random centres, shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 3
    y = torch.arange(n_classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


# ----------------------------------------------------------------------------- kNN

def naive_knn(train, ytrain, test, k, t, c):
    """Per-query loop in float64: top-k cosine neighbours, exp(sim/t) votes, argmax."""
    a = train.double().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    preds = []
    for q in test.double().numpy():
        sims = a @ (q / np.linalg.norm(q))
        top = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(c)
        for i in top:
            votes[ytrain[i]] += math.exp(sims[i] / t)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize("k,t,batch", [(1, 0.1, 7), (5, 0.07, 64), (20, 0.5, 13), (50, 0.01, 1000), (500, 0.1, 32)])
def test_knn_matches_naive_loop(k, t, batch):
    x, y = blobs(30, 4, 16, spread=4.0, seed=k)  # overlapping classes so the vote matters
    train, ytr, test, yte = x[:100], y[:100], x[100:], y[100:]
    pred = ev.knn_predict(train, ytr, test, k=k, temperature=t, batch_size=batch)
    ref = naive_knn(train, ytr.numpy(), test, min(k, 100), t, 4)  # k > 100 is clamped to the train size
    assert np.array_equal(pred.numpy(), ref)
    acc = ev.knn_accuracy(train, ytr, test, yte, k=k, temperature=t, batch_size=batch)
    assert acc == pytest.approx((ref == yte.numpy()).mean())


def test_knn_small_temperature_stays_finite():
    # one class-1 neighbour at cosine 0.99 against five class-0 neighbours at 0.9: exp(sim/0.005)
    # overflows float32, yet e^198 > 5·e^180, so class 1 must win as in the float64 loop
    angle = lambda c: [c, math.sqrt(1 - c * c)]
    train = torch.tensor([angle(0.99)] + [angle(0.9)] * 5)
    labels = torch.tensor([1, 0, 0, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    ref = naive_knn(train, labels.numpy(), query, 6, 0.005, 2)
    assert ref.tolist() == [1]
    assert ev.knn_predict(train, labels, query, k=6, temperature=0.005).tolist() == [1]


@pytest.mark.parametrize("call,match", [
    (lambda x, y: ev.knn_accuracy(x[0], y, x, y), "shape"),
    (lambda x, y: ev.knn_accuracy(x, y[:-1], x, y), "shape"),
    (lambda x, y: ev.knn_accuracy(x, y - 1, x, y), "labels >= 0"),
    (lambda x, y: ev.knn_accuracy(x, y.float(), x, y), "integer"),
    (lambda x, y: ev.knn_accuracy(x, y, x[:, :3], y), "dims"),
    (lambda x, y: ev.knn_accuracy(x, y, x, y, k=0), "k must"),
    (lambda x, y: ev.knn_accuracy(x, y, x, y, temperature=0), "temperature"),
    (lambda x, y: ev.knn_accuracy(x, y, x, y, num_classes=1), "num_classes"),
    (lambda x, y: ev.knn_accuracy(x * float("nan"), y, x, y), "NaN"),
    (lambda x, y: ev.knn_accuracy(x[:0], y[:0], x, y), "empty"),
])
def test_knn_rejects_bad_input(call, match):
    x, y = blobs(5, 2, 4, 1.0, 0)
    with pytest.raises(ValueError, match=match):
        call(x, y)


# ----------------------------------------------------------------------------- linear probe

def sklearn_probe(xtr, ytr, xte, yte, weight_decay):
    """scikit-learn's L2 logistic regression on the same standardised features and objective."""
    LogisticRegression = pytest.importorskip("sklearn.linear_model").LogisticRegression
    StandardScaler = pytest.importorskip("sklearn.preprocessing").StandardScaler

    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=1.0 / (weight_decay * len(ytr)), max_iter=2000, tol=1e-8)
    clf.fit(scaler.transform(xtr), ytr)
    return clf.score(scaler.transform(xte), yte)


def test_linear_probe_matches_sklearn_on_blobs():
    x, y = blobs(60, 5, 20, spread=2.5, seed=3)
    xtr, ytr, xte, yte = x[:200], y[:200], x[200:], y[200:]
    ours = ev.linear_probe(xtr, ytr, xte, yte, epochs=100, weight_decay=1e-2)
    ref = sklearn_probe(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), 1e-2)
    assert ours == pytest.approx(ref, abs=0.02)
    assert ours > 0.9


def test_linear_probe_on_real_digits_beats_chance_and_agrees_with_sklearn():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    ours = ev.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=30, weight_decay=1e-3)
    ref = sklearn_probe(x[:1000].numpy(), y[:1000].numpy(), x[1000:].numpy(), y[1000:].numpy(), 1e-3)
    assert ours > 0.85  # chance is 0.1
    assert ours == pytest.approx(ref, abs=0.03)


def test_linear_probe_is_deterministic_and_checks_input():
    x, y = blobs(20, 3, 6, spread=3.0, seed=0)
    a = ev.linear_probe(x[:40], y[:40], x[40:], y[40:], epochs=20)
    assert a == ev.linear_probe(x[:40], y[:40], x[40:], y[40:], epochs=20)
    with pytest.raises(ValueError, match="dims"):
        ev.linear_probe(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="epochs"):
        ev.linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="weight_decay"):
        ev.linear_probe(x, y, x, y, weight_decay=-1.0)


# ----------------------------------------------------------------------------- clustering

def naive_nmi_ami(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """NMI and AMI (arithmetic mean) by counting pairs, with E[MI] summed over the hypergeometric model exactly."""
    from collections import Counter
    n = len(a)
    ca, cb, cab = Counter(a.tolist()), Counter(b.tolist()), Counter(zip(a.tolist(), b.tolist()))
    mi = sum(nij / n * math.log(n * nij / (ca[i] * cb[j])) for (i, j), nij in cab.items())
    ha = -sum(c / n * math.log(c / n) for c in ca.values())
    hb = -sum(c / n * math.log(c / n) for c in cb.values())
    emi = 0.0
    for ai in ca.values():
        for bj in cb.values():
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                p = math.comb(bj, nij) * math.comb(n - bj, ai - nij) / math.comb(n, ai)
                emi += nij / n * math.log(n * nij / (ai * bj)) * p
    mean_h = (ha + hb) / 2
    return mi / mean_h, (mi - emi) / (mean_h - emi)


@pytest.mark.parametrize("n,ka,kb,seed",
                         [(10, 2, 3, 0), (60, 4, 4, 1), (300, 10, 7, 2), (1000, 3, 20, 3), (400, 25, 25, 4)])
@pytest.mark.parametrize("correlated", [False, True])
def test_nmi_ami_match_naive_counts(n, ka, kb, seed, correlated):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, ka, n)
    b = rng.integers(0, kb, n)
    if correlated:  # half the items copy their label, so the scores are far from 0
        copy = rng.random(n) < 0.5
        b[copy] = a[copy] % kb
    nmi, ami = naive_nmi_ami(a, b)
    assert ev.normalized_mutual_info(a, b) == pytest.approx(nmi, abs=1e-10)
    assert ev.adjusted_mutual_info(a, b) == pytest.approx(ami, abs=1e-9)
    assert ev.normalized_mutual_info(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(nmi, abs=1e-10)


def test_nmi_ami_name_the_install_when_scikit_learn_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    a = np.array([0, 0, 1, 1])
    for score in (ev.normalized_mutual_info, ev.adjusted_mutual_info):
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            score(a, a)


def test_nmi_ami_limit_cases():
    a = np.array([0, 0, 1, 1, 2])
    assert ev.normalized_mutual_info(a, 7 - a) == pytest.approx(1.0)
    assert ev.adjusted_mutual_info(a, 7 - a) == pytest.approx(1.0)
    assert ev.normalized_mutual_info(np.zeros(5), np.zeros(5)) == 1.0
    assert ev.normalized_mutual_info(a, np.zeros(5)) == 0.0
    with pytest.raises(ValueError, match="equally long"):
        ev.adjusted_mutual_info(a, a[:3])


def test_kmeans_finds_planted_blobs():
    x, y = blobs(50, 6, 10, spread=0.3, seed=5)
    centres, assign = ev.kmeans(x, 6, seed=0)
    for c in range(6):  # each blob is exactly one cluster, and no two blobs share one
        assert len(torch.unique(assign[y == c])) == 1
    assert len(torch.unique(assign)) == 6
    for c in range(6):  # centres are the blob means
        assert torch.allclose(centres[assign[y == c][0]], x[y == c].mean(0), atol=1e-4)


def test_cluster_scores_on_blobs_and_unknown_labels():
    x, y = blobs(40, 4, 12, spread=0.3, seed=2)
    scores = ev.cluster_scores(x, y)
    assert scores["nmi"] == pytest.approx(1.0) and scores["ami"] == pytest.approx(1.0)
    y_partial = y.clone()
    y_partial[::3] = -1  # unknown labels are clustered but not scored
    assert ev.cluster_scores(x, y_partial)["ami"] == pytest.approx(1.0)
    noise = torch.randn(160, 12, generator=torch.Generator().manual_seed(0))
    assert ev.cluster_scores(noise, y)["ami"] < 0.1
    with pytest.raises(ValueError, match="unknown"):
        ev.cluster_scores(x, torch.full_like(y, -1))


# ----------------------------------------------------------------------------- retrieval

def naive_retrieval(x, y):
    """Precision@1 and MAP@R by a per-query loop in float64."""
    x, y = x.double().numpy(), y.numpy()
    keep = y >= 0
    x, y = x[keep], y[keep]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    p1, ap = [], []
    for q in range(len(y)):
        r = int((y == y[q]).sum()) - 1
        if r == 0:
            continue
        order = [i for i in np.argsort(-(x @ x[q]), kind="stable") if i != q][:r]
        hits, total = 0, 0.0
        for rank, i in enumerate(order, start=1):
            if y[i] == y[q]:
                hits += 1
                total += hits / rank
        p1.append(float(y[order[0]] == y[q]))
        ap.append(total / r)
    return np.mean(p1), np.mean(ap)


@pytest.mark.parametrize("seed,spread,batch", [(0, 3.0, 256), (1, 6.0, 7), (2, 1.5, 1)])
def test_retrieval_matches_naive_loop(seed, spread, batch):
    x, y = blobs(15, 5, 8, spread=spread, seed=seed)
    y = y.clone()
    y[:6] = -1  # unknown rows take no part
    y[6] = 99  # a singleton label: no relevant item, skipped
    got = ev.retrieval_scores(x, y, batch_size=batch)
    p1, mapr = naive_retrieval(x, y)
    assert got["precision_at_1"] == pytest.approx(p1, abs=1e-6)
    assert got["map_at_r"] == pytest.approx(mapr, abs=1e-6)


def test_retrieval_perfect_and_errors():
    x, y = blobs(10, 3, 6, spread=0.1, seed=0)
    assert ev.retrieval_scores(x, y) == pytest.approx({"precision_at_1": 1.0, "map_at_r": 1.0})
    with pytest.raises(ValueError, match="repeated labels"):
        ev.retrieval_scores(x[:3], torch.arange(3))


def test_evaluate_runs_every_metric():
    x, y = blobs(40, 4, 12, spread=0.5, seed=4)
    files = [f"img{i}.png" for i in range(len(y))]
    y_train = y[:100].clone()
    y_train[:10] = -1
    scores = ev.evaluate(Embeddings(x[:100], y_train, files[:100]), Embeddings(x[100:], y[100:], files[100:]),
                         k=10, probe_epochs=30)
    assert set(scores) == {"knn_top1", "linear_top1", "nmi", "ami", "precision_at_1", "map_at_r", "n_train", "n_test"}
    assert scores["n_train"] == 90 and scores["n_test"] == 60
    for key in ("knn_top1", "linear_top1", "nmi", "ami", "precision_at_1", "map_at_r"):
        assert scores[key] > 0.95, key
    with pytest.raises(ValueError, match="no labelled rows"):
        ev.evaluate(Embeddings(x, torch.full_like(y, -1), files), Embeddings(x, y, files))


# ----------------------------------------------------------------------------- export

def sample_embeddings(n=5, d=3):
    g = torch.Generator().manual_seed(0)
    return Embeddings(torch.randn(n, d, generator=g) * 1e3, torch.tensor([0, -1, 2, 1, 0])[:n],
                      ["a.png", "dir/b,c.jpg", "ü.png", "d", "e"][:n])


def test_npz_round_trip(tmp_path):
    e = sample_embeddings()
    e.save_npz(tmp_path / "e.npz")
    back = Embeddings.load_npz(tmp_path / "e.npz")
    assert torch.equal(back.embeddings, e.embeddings) and back.embeddings.dtype == torch.float32
    assert torch.equal(back.labels, e.labels) and back.labels.dtype == torch.long
    assert back.files == e.files
    assert os.listdir(tmp_path) == ["e.npz"]  # no temp file left behind


def test_csv_round_trip(tmp_path):
    e = sample_embeddings()
    e.save_csv(tmp_path / "e.csv")
    with open(tmp_path / "e.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label", "e0", "e1", "e2"]
    assert [r[0] for r in rows[1:]] == e.files
    assert [int(r[1]) for r in rows[1:]] == e.labels.tolist()
    values = torch.tensor([[float(v) for v in r[2:]] for r in rows[1:]], dtype=torch.float32)
    assert torch.equal(values, e.embeddings)  # exact: float32 survives the text round trip


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "e.npz"
    target.write_bytes(b"old contents")

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        sample_embeddings().save_npz(target)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["e.npz"]
    with pytest.raises(OSError, match="disk full"):
        sample_embeddings().save_npz(tmp_path / "new.npz")
    assert os.listdir(tmp_path) == ["e.npz"]


def test_failed_csv_write_leaves_no_partial_file(tmp_path, monkeypatch):
    real_writer = csv.writer

    class FailingWriter:
        """Writes the header and two rows, then fails."""

        def __init__(self, f):
            self.inner, self.rows = real_writer(f), 0

        def writerow(self, row):
            if self.rows == 3:
                raise RuntimeError("disk full")
            self.rows += 1
            self.inner.writerow(row)

    monkeypatch.setattr(csv, "writer", FailingWriter)
    with pytest.raises(RuntimeError, match="disk full"):
        sample_embeddings().save_csv(tmp_path / "e.csv")
    assert os.listdir(tmp_path) == []


def test_embeddings_validate_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="one name per embedding"):
        Embeddings(torch.zeros(3, 2), torch.zeros(3), ["a"])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        Embeddings(torch.zeros(3, 2), torch.zeros(2), ["a", "b", "c"])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="save_npz"):
        Embeddings.load_npz(tmp_path / "other.npz")


# ----------------------------------------------------------------------------- embed_dataset

class ImageSet(torch.utils.data.Dataset):
    """uint8 (C,H,W) images with int labels, optionally with file names."""

    def __init__(self, n=11, channels=3, files=True):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8, generator=g)
        self.labels = [i % 3 - (i == 4) * 2 for i in range(n)]  # item 4 is unknown (-1)
        if files:
            self.files = [f"img_{i}.png" for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class StubLearner:
    """Learner-like: .embed takes raw uint8 batches and returns (B, D)."""

    def __init__(self):
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        return images.float().mean(dim=(2, 3))


def test_embed_dataset_with_learner_keeps_order_labels_files():
    data = ImageSet(11)
    stub = StubLearner()
    e = ev.embed_dataset(stub, data, batch_size=4)
    assert stub.calls == 3
    assert torch.allclose(e.embeddings, data.images.float().mean(dim=(2, 3)))
    assert e.labels.tolist() == data.labels and e.labels.dtype == torch.long
    assert e.files == data.files
    e2 = ev.embed_dataset(stub, ImageSet(5, files=False))
    assert e2.files == ["0", "1", "2", "3", "4"]


def test_embed_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        ev.embed_dataset(StubLearner(), ImageSet(3), batch_size=0)
    with pytest.raises(TypeError, match="Learner"):
        ev.embed_dataset(object(), ImageSet(3))
    bad = ImageSet(3)
    bad.files = ["only-one"]
    with pytest.raises(ValueError, match="files"):
        ev.embed_dataset(StubLearner(), bad)


def test_embed_dataset_with_plain_net_restores_modes_and_statistics():
    pytest.importorskip("wrapssl.encoder")
    from wrapssl.augment import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 2))
    net.train()
    net[2].eval()  # a mixed state that must come back exactly
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    grad_modes = []
    probe = net[0].register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    data = ImageSet(7, channels=1)  # grey images are expanded to 3 channels
    e = ev.embed_dataset(net, data, batch_size=3, hidden_layer=-2)
    probe.remove()
    assert grad_modes == [False, False, False]
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True, True]
    assert all(torch.equal(stats[k], v) for k, v in net.state_dict().items())
    x = data.images.float().div(255).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    net.eval()
    with torch.no_grad():
        ref = net[:-1](x)
    assert e.embeddings.shape == (7, 6)
    assert torch.allclose(e.embeddings, ref, atol=1e-5)
    assert e.labels.tolist() == data.labels
    assert all(p.grad is None for p in net.parameters())
    assert not net[-1]._forward_hooks and not net[-2]._forward_hooks  # the encoder's hook is removed


def test_embed_dataset_plain_grey_net_matches_a_hand_normalised_forward():
    from wrapssl.archs import build_arch

    net, layer = build_arch("small_resnet", channels=1)
    images = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8)
    ds = torch.utils.data.TensorDataset(images, torch.arange(6))
    got = ev.embed_dataset(net, ds, batch_size=4, hidden_layer=layer).embeddings
    mean, std = sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3
    feats = {}
    handle = net.avgpool.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    with torch.no_grad():
        net.eval()((images.float() / 255 - mean) / std)
    handle.remove()
    torch.testing.assert_close(got, feats["x"].flatten(1))


# ----------------------------------------------------------------------------- baselines

def test_raw_pixels_are_the_flattened_images_at_the_requested_size():
    from wrapssl.data import TensorImages

    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    ds = TensorImages(images, torch.arange(6))
    e = ev.raw_pixels(ds, batch_size=4)
    assert torch.equal(e.embeddings, images.flatten(1).float() / 255)
    assert e.labels.tolist() == list(range(6))
    # at another size: torch's antialiased bilinear resize of each image, flattened
    small = ev.raw_pixels(ds, image_size=4).embeddings
    ref = torch.nn.functional.interpolate(images.float() / 255, size=(4, 4), mode="bilinear", antialias=True,
                                          align_corners=False).flatten(1)
    assert small.shape == (6, 16) and torch.allclose(small, ref, atol=1e-6)


def test_baseline_scores_match_the_metrics_computed_by_hand():
    from wrapssl.data import TensorImages

    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    # four classes of 8x8 grey images: a bright square in a class-specific corner, plus noise
    images = torch.rand(120, 1, 8, 8, generator=g) * 60
    for c in range(4):
        r, col = divmod(c, 2)
        images[y == c, :, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 150
    images = images.to(torch.uint8)
    memory, queries = TensorImages(images[::2], y[::2]), TensorImages(images[1::2], y[1::2])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
    rows = ev.baseline_scores(memory, queries, random_init=net, k=5, hidden_layer=-2)
    px, pq = images[::2].flatten(1).float() / 255, images[1::2].flatten(1).float() / 255
    assert rows["raw_pixels"]["knn"] == ev.knn_accuracy(px, y[::2], pq, y[1::2], k=5, temperature=0.1)
    assert rows["raw_pixels"]["linear"] == ev.linear_probe(px, y[::2], pq, y[1::2])
    a, b = ev.embed_dataset(net, memory, hidden_layer=-2), ev.embed_dataset(net, queries, hidden_layer=-2)
    assert rows["random_init"]["knn"] == ev.knn_accuracy(a.embeddings, a.labels, b.embeddings, b.labels, k=5)
    assert rows["random_init"]["linear"] == ev.linear_probe(a.embeddings, a.labels, b.embeddings, b.labels)
    logits = ev.baseline_scores(memory, queries, random_init=net, k=5, linear=False)  # the net's own output
    c, d = ev.embed_dataset(net, memory), ev.embed_dataset(net, queries)
    assert c.embeddings.shape[1] == 4 and "linear" not in logits["random_init"]
    assert logits["random_init"]["knn"] == ev.knn_accuracy(c.embeddings, c.labels, d.embeddings, d.labels, k=5)
    assert rows["raw_pixels"]["knn"] > 0.9  # the corners are easy for pixels


def test_format_scores_table():
    text = ev.format_scores({"raw_pixels": {"knn": 0.7885, "linear": 0.841}, "pretrained": {"knn": 0.88}},
                            memory=60000)
    header, raw, pre = text.splitlines()
    assert "kNN (k=200, 60000 memory)" in header and "linear probe" in header
    assert raw.split()[-2:] == ["78.85%", "84.10%"] and raw.startswith("raw pixels")
    assert pre.split()[-2:] == ["88.00%", "-"]
