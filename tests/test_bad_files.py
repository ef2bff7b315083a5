"""Bad input is counted, not hidden: unreadable files are listed at the end of a run and in metrics.json, and
the pixel limit for huge images is an option."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from wrapssl import app
from wrapssl.data import ImageFolder

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def picture(path, size: int = 16, seed: int = 0) -> None:
    """A random RGB PNG."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_unreadable_files_are_listed_at_the_end_and_in_metrics(tmp_path, capsys):
    """30 empty .jpg files and 4 good PNGs: one epoch touches every file; each bad one is named with its reason."""
    data = tmp_path / "data"
    data.mkdir()
    bad = {f"broken{i:02d}.jpg" for i in range(30)}
    for name in bad:
        (data / name).write_bytes(b"")
    for i in range(4):
        picture(data / f"good{i}.png", seed=i)
    metrics = app.main(["--data", str(data), "--image-size", "8", "--batch-size", "2", "--epochs", "1",
                        "--no-plots", "--out", str(tmp_path / "run")])
    assert set(metrics["unreadable_files"]) == bad
    assert all("cannot identify image file" in why for why in metrics["unreadable_files"].values())
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["unreadable_files"] == metrics["unreadable_files"]
    out = capsys.readouterr().out
    assert "30 of 34 files could not be read" in out and "... and 20 more" in out
    assert sum(name in out for name in bad) == 10  # ten named on the terminal, all in metrics.json


def test_a_clean_folder_reports_no_unreadable_files(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        picture(data / f"good{i}.png", seed=i)
    metrics = app.main(["--data", str(data), "--image-size", "8", "--batch-size", "2", "--steps", "2",
                        "--no-plots", "--out", str(tmp_path / "run")])
    assert metrics["unreadable_files"] == {} and "could not be read" not in capsys.readouterr().out


def test_the_pixel_limit_is_an_option(tmp_path):
    picture(tmp_path / "big.png", size=64)
    picture(tmp_path / "small.png", size=16, seed=1)
    limited = ImageFolder(tmp_path, image_size=8, max_pixels=1000)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        image, _ = limited[0]  # big.png: 4,096 pixels, over the limit; replaced by small.png
    assert limited.bad_files == ["big.png"]
    assert "64x64 = 4,096 pixels, above the limit of 1,000" in limited.unreadable()["big.png"]
    assert "--max-pixels" in limited.unreadable()["big.png"]
    lifted = ImageFolder(tmp_path, image_size=8, max_pixels=None)
    assert lifted[0][0].shape == (3, 8, 8) and lifted.num_bad == 0


def test_max_pixels_reaches_the_app_folder(tmp_path):
    """Every image over the limit: one error line that names the option; no limit (0): the run trains."""
    from conftest import reset_accelerate

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        picture(data / f"img{i}.png", size=32, seed=i)
    run = ["--data", str(data), "--image-size", "8", "--batch-size", "2", "--epochs", "1", "--no-plots"]
    with pytest.raises(SystemExit) as refused:
        app.main([*run, "--max-pixels", "100", "--out", str(tmp_path / "a")])
    message = str(refused.value.code)
    assert message.startswith("error: none of the 4 images under") and "above the limit of 100" in message
    assert "--max-pixels" in message and "\n" not in message
    reset_accelerate()
    assert app.main([*run, "--max-pixels", "0", "--out", str(tmp_path / "b")])["unreadable_files"] == {}
