"""Tar shards as training data: written by `wrapssl shards`, read back image for image, dealt to ranks and
workers in epochs of a known length, shuffled, resumed where they stopped, bad input refused in one line."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import reset_accelerate, small_cnn
from wrapssl import Trainer
from wrapssl import cli
from wrapssl import app
from wrapssl.data import TarShards, TensorImages, collate, expand_braces, load_dataset, unreadable_files, write_shards

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def numbered(n: int, labels: bool = True) -> TensorImages:
    """n grey 8x8 images that carry their own number in two pixels (so any read-back names its source)."""
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    return TensorImages(images, [i % 10 for i in range(n)] if labels else None)


def ids(images: torch.Tensor) -> list[int]:
    """The numbers that ``numbered`` images carry."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def epoch(shards: TarShards, ranks: int, workers: int, batch: int, epoch: int = 0, skip: int = 0) -> list[list[int]]:
    """Each rank's sample numbers in the order its DataLoader yields them."""
    out = []
    for rank in range(ranks):
        shards.plan(ranks, rank, batch, workers, seed=0)
        shards.position(epoch, skip)
        loader = DataLoader(shards, batch_size=batch, num_workers=workers, collate_fn=collate, drop_last=True)
        out.append([i for images, _ in loader for i in ids(images)])
    return out


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory) -> Path:
    """256 numbered images in 8 shards of 32, written by the `wrapssl shards` writer."""
    folder = tmp_path_factory.mktemp("shards")
    write_shards(numbered(256), str(folder / "train-%03d.tar"), 32)
    return folder


def test_shards_hold_the_source_images_and_labels_in_order(tmp_path):
    source = load_dataset("digits")
    cli.main(["shards", "digits", str(tmp_path / "d-{0000..0009}.tar"), "--per-shard", "500"])
    index = json.loads((tmp_path / "shards.json").read_text())
    assert [v["samples"] for v in index["shards"].values()] == [500, 500, 500, 297]
    with tarfile.open(tmp_path / "d-0003.tar") as tar:  # plain tar members: key.png and key.cls
        names = tar.getnames()
        assert names[:2] == ["00001500.png", "00001500.cls"] and len(names) == 2 * 297
    shards = TarShards(str(tmp_path / "d-{0000..0003}.tar"))
    head = shards.head(len(source))
    assert len(shards) == len(source) == len(head) and shards.classes == source.classes
    for i in (0, 499, 500, 1796):  # exact pixels (PNG is lossless) and the labels from the .cls members
        assert torch.equal(head[i][0], source[i][0]) and head[i][1] == source[i][1]
        assert torch.equal(shards[i][0], source[i][0])


def test_an_epoch_gives_every_sample_once_over_ranks_and_workers_in_equal_batches(eight_shards):
    shards = TarShards(str(eight_shards / "train-{000..007}.tar"), shuffle_buffer=16)
    ranks = epoch(shards, ranks=2, workers=2, batch=8)
    assert [len(r) for r in ranks] == [128, 128]  # equal: no rank waits at the all-reduce
    assert sorted(ranks[0] + ranks[1]) == list(range(256))  # 8 equal shards over 4 readers: each sample once
    again = epoch(shards, ranks=2, workers=2, batch=8)
    later = epoch(shards, ranks=2, workers=2, batch=8, epoch=1)
    assert again == ranks and later != ranks  # the seed and the epoch decide the order
    assert ranks[0] != sorted(ranks[0])  # shuffled, not the stored order


def test_uneven_shards_still_give_every_rank_the_same_number_of_batches(tmp_path):
    write_shards(numbered(100), str(tmp_path / "u-%02d.tar"), 30)  # 30, 30, 30, 10
    shards = TarShards(str(tmp_path / "u-*.tar"))
    ranks = epoch(shards, ranks=2, workers=0, batch=8)
    assert [len(r) for r in ranks] == [48, 48]  # 100 // 2 readers, in whole batches of 8


def test_resume_continues_from_the_position_reached_exact_up_to_the_buffer(eight_shards):
    spec = str(eight_shards / "train-{000..007}.tar")
    for buffer in (1, 16):
        shards = TarShards(spec, shuffle_buffer=buffer)
        whole = epoch(shards, ranks=1, workers=2, batch=8)[0]
        taken = 5  # batches trained before the interruption: worker 0 gave 3 of them, worker 1 gave 2
        resumed = epoch(shards, ranks=1, workers=2, batch=8, skip=taken * 8)[0]
        assert len(resumed) == len(whole) - taken * 8
        if buffer == 1:  # no shuffle buffer: exactly the samples the uninterrupted run had left
            assert sorted(resumed) == sorted(whole[taken * 8:])
        else:  # at most one buffer per reader seen twice
            twice = sum((Counter(whole[:taken * 8]) & Counter(resumed)).values())
            assert 0 < twice <= 2 * buffer


def test_the_trainer_runs_epochs_of_the_known_length_and_resumes_where_it_stopped(eight_shards, tmp_path):
    def make(steps: int, **kwargs) -> Trainer:
        reset_accelerate()
        return Trainer(small_cnn(1, 8), dataset=str(eight_shards / "train-{000..007}.tar"), image_size=8,
                       hidden_layer=-2, num_train_steps=steps, batch_size=16, checkpoint_every=4,
                       checkpoint_folder=tmp_path, log_with=["csv"], progress=False, plot=False, health_every=None,
                       **kwargs)
    first = make(20)
    first()  # 256 samples, batch 16: an epoch is 16 steps
    assert (first.epoch, first.samples_in_epoch) == (1, 4 * 16)
    first.end()
    longer = make(26, resume="auto")
    assert (longer.step, longer.epoch, longer.samples_in_epoch) == (20, 1, 64)
    longer()
    assert (longer.step, longer.epoch, longer.samples_in_epoch) == (26, 1, 10 * 16)
    longer.end()


def test_unreadable_samples_are_listed_and_skipped(tmp_path):
    write_shards(numbered(64, labels=False), str(tmp_path / "b-%d.tar"), 32)
    with tarfile.open(tmp_path / "b-0.tar") as tar:  # rewrite shard 0 with sample 3's image broken
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "b-0.tar", "w") as tar:
        for m, data in members:
            data = b"not a png" if m.name == "00000003.png" else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shards = TarShards(str(tmp_path / "b-{0..1}.tar"), shuffle_buffer=8)
    with pytest.warns(RuntimeWarning, match=r"unreadable data .* b-0.tar/00000003"):
        seen = epoch(shards, ranks=1, workers=0, batch=8)[0]
    assert 3 not in seen and len(seen) == 64  # skipped; the epoch keeps its length
    bad = unreadable_files(shards)
    assert list(bad) == ["b-0.tar/00000003"] and "UnidentifiedImageError" in bad["b-0.tar/00000003"]


def test_the_first_unreadable_sample_warning_starts_its_own_line(tmp_path, capsys):
    """As for folders: the warning never lands glued to a progress bar's line on stderr."""
    import sys
    import warnings

    from tqdm import tqdm

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 60, np.uint8)).save(folder / f"{i}.png")
    (folder / "9.png").write_bytes(b"not an image")
    write_shards(load_dataset(str(folder)), str(tmp_path / "w-%d.tar"), 8)
    shards = TarShards(str(tmp_path / "w-0.tar"), shuffle_buffer=1)
    with warnings.catch_warnings(), tqdm(total=3, desc="pretraining", file=sys.stderr) as bar:
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        bar.update(1)
        assert len(list(shards)) == 4  # the bad sample: warned about and skipped; the epoch keeps its length
        bar.update(1)
    err = capsys.readouterr().err
    shown = err[:err.index("RuntimeWarning")].replace("\r", "\n").split("\n")[-1]
    assert "unreadable data" in err and "pretraining" not in shown and "%|" not in shown, repr(shown)
    assert err.count("pretraining") >= 2  # the bar is drawn again after the warning


def test_the_app_trains_on_a_brace_pattern_and_lists_unreadable_samples(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.full((8, 8, 3), i * 6, np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    cli.main(["shards", str(folder), str(tmp_path / "s" / "f-%02d.tar"), "--per-shard", "8"])
    assert "wrapssl train --data '" + str(tmp_path / "s" / "f-{00..05}.tar") + "'" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match=r"unreadable data .* f-05.tar/broken"):
        metrics = app.main(["--data", str(tmp_path / "s" / "f-{00..05}.tar"), "--image-size", "8", "--batch-size",
                            "4", "--steps", "12", "--no-plots", "--out", str(tmp_path / "run")])
    assert metrics["steps"] == 12
    assert list(metrics["unreadable_files"]) == ["f-05.tar/broken"]
    assert "1 of 41 files could not be read" in capsys.readouterr().out


def bad_input_error(capsys, argv: list[str]) -> str:
    """The one line the app prints for ``argv``."""
    with pytest.raises(SystemExit) as e:
        app.main(argv)
    text = str(e.value)
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in capsys.readouterr().err
    return text


def test_bad_shards_are_refused_in_one_line(tmp_path, capsys):
    run = ["--image-size", "8", "--batch-size", "4", "--out", str(tmp_path / "run")]
    text = bad_input_error(capsys, ["--data", str(tmp_path / "none-{000..003}.tar"), *run])
    assert f"shard '{tmp_path}/none-000.tar' (one of the 4 names" in text and "does not exist" in text
    assert "no shard matches" in bad_input_error(capsys, ["--data", str(tmp_path / "*.tar"), *run])
    (tmp_path / "fake.tar").write_text("a text file named .tar")
    assert "fake.tar is not a tar file" in bad_input_error(capsys, ["--data", str(tmp_path / "fake.tar"), *run])
    with tarfile.open(tmp_path / "labels-only.tar", "w") as tar:
        info = tarfile.TarInfo("0001.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"3"))
    text = bad_input_error(capsys, ["--data", str(tmp_path / "labels-only.tar"), *run])
    assert "sample '0001' of" in text and "has no image member (found .cls" in text
    write_shards(numbered(64), str(tmp_path / "two-%d.tar"), 32)
    text = bad_input_error(capsys, ["--data", str(tmp_path / "two-{0..1}.tar"), "--num-workers", "3", *run])
    assert "2 shard(s) cannot feed 3 readers (1 process(es) x 3 DataLoader worker(s))" in text
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_brace_patterns_expand_ranges_with_their_padding_and_lists():
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/s-{1..2}.tar") == ["x/s-1.tar", "x/s-2.tar", "y/s-1.tar", "y/s-2.tar"]


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax", "gz"])
def test_shards_written_by_other_tar_tools_read_the_same(tmp_path, fmt):
    """Shards from tarfile in each header format (long and non-ASCII keys where the format has them), and gzip."""
    source = numbered(6)
    keys = ["s0", "dir/s1", "x/" + "a" * 120 + "/s2", "ünï/s3", "s4", "s5"] if fmt != "ustar" else \
        ["s0", "dir/s1", "s2", "s3", "s4", "s5"]
    path = tmp_path / ("x.tar.gz" if fmt == "gz" else "x.tar")
    format = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT}.get(fmt, tarfile.PAX_FORMAT)
    with tarfile.open(path, "w:gz" if fmt == "gz" else "w", format=format) as tar:
        for key, (image, label) in zip(keys, (source[i] for i in range(6))):
            buf = io.BytesIO()
            Image.fromarray(image[0].numpy()).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shards = TarShards(str(path))
    assert len(shards) == 6 and ids(shards.head(6).images) == list(range(6))
    assert [shards[i][1] for i in range(6)] == [source[i][1] for i in range(6)]
    assert shards.name(3) == f"{path.name}/{keys[3]}"
