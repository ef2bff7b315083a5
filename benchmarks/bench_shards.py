"""Images/s read from tar shards against the same images in a folder, on the CPU with the same DataLoader workers.

Makes N photo-like JPEGs (smooth colour fields with noise, 256x256, quality 90) in a flat
folder, writes them as shards with `wrapssl shards`'s writer (the files copied as they are),
then times one shuffled pass of decode + resize to --image-size through a DataLoader with
--workers workers, alternating: wrapssl's folder reader (ImageFolder, random access), wrapssl's
shard reader (TarShards: its own tar header parser, sequential, shuffle buffer), and webdataset's
pipeline on the same shards with the same decoder (when webdataset is installed). A second table
times the readers alone (bytes of every sample, no decoding) in one process, Python's tarfile
module among them. The first pass of each is
a warm-up (page cache), the median of the rest is reported, and for the loaders the median of
each pass's ratio to the folder pass beside it (neighbours share the machine's load).

    python benchmarks/bench_shards.py                       # 2000 images, 2 workers, 64 px
    python benchmarks/bench_shards.py --images 4000 --workers 4 --out benchmarks/data/shards_cpu.json
"""
from __future__ import annotations

import argparse
import io
import random
import tarfile
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common import command, machine, markdown_table, median, save_json
from wrapssl.data import ImageFolder, TarShards, collate, reading_pattern, write_shards
from wrapssl.data.decode import _pil_to_tensor
from wrapssl.data.shard_files import _tar_samples


def make_images(folder: Path, n: int, side: int = 256) -> None:
    """n JPEGs that compress like photos: a smooth colour field plus mild noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        field = np.stack([np.sin(6 * a * xx + b) * 0.5 + 0.5, np.cos(5 * b * yy + c) * 0.5 + 0.5,
                          (xx * a + yy * c) % 1.0], -1)
        image = np.clip(field * 255 + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=90)


def webdataset_loader(spec: str, size: int, batch: int, workers: int, buffer: int) -> DataLoader:
    """webdataset's pipeline on the same shards: shards split over workers, shuffled, decoded as wrapssl does."""
    import webdataset as wds

    def decode(sample: dict) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            return _pil_to_tensor(image, 3, (size, size)), -1

    dataset = wds.WebDataset(spec, shardshuffle=100, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, empty_check=False).shuffle(buffer).map(decode)
    return DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate, drop_last=True)


def one_pass(loader: DataLoader) -> tuple[int, float]:
    """(images, seconds) of one pass over ``loader``."""
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n, time.perf_counter() - start


def raw_tarfile(paths: list[Path]) -> int:
    """Bytes of every member, read with tarfile in order."""
    total = 0
    for path in paths:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                if info.isfile():
                    total += len(tar.extractfile(info).read())
    return total


def raw_wrapssl(paths: list[Path]) -> int:
    """Bytes of every sample's members, read with the parser TarShards uses."""
    return sum(len(v) for path in paths for _, _, members in _tar_samples(path) for v in members.values())


def raw_webdataset(spec: str) -> int:
    """Bytes of every sample's members, read with webdataset's tar iterator."""
    import webdataset as wds
    total = 0
    for sample in wds.WebDataset(spec, shardshuffle=False, empty_check=False):
        total += sum(len(v) for k, v in sample.items() if isinstance(v, bytes))
    return total


def raw_folder(folder: ImageFolder) -> int:
    """Bytes of every file, read in a shuffled order."""
    order = list(range(len(folder)))
    random.Random(0).shuffle(order)
    return sum(len((folder.root / folder.files[i]).read_bytes()) for i in order)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer of the shard readers")
    p.add_argument("--reps", type=int, default=4, help="timed passes of each reader (after one warm-up)")
    p.add_argument("--root", default=None, help="where to write the images and shards (default: a temp folder)")
    p.add_argument("--out", default=None, help="JSON of the results")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_shards_"))
    images, shards_dir = root / "images", root / "shards"
    if not images.is_dir():
        images.mkdir(parents=True)
        make_images(images, args.images)
    folder = ImageFolder(images, image_size=args.image_size)
    pattern = str(shards_dir / "train-%06d.tar")
    if not shards_dir.is_dir():
        write_shards(ImageFolder(images), pattern, args.per_shard)
    paths = sorted(shards_dir.glob("train-*.tar"))
    spec = reading_pattern(pattern, len(paths))
    shards = TarShards(spec, image_size=args.image_size, shuffle_buffer=args.buffer)
    shards.plan(1, 0, args.batch_size, args.workers, seed=0)
    loaders = {
        "folder (ImageFolder)": DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                           collate_fn=collate, drop_last=True),
        "shards (TarShards)": DataLoader(shards, batch_size=args.batch_size, num_workers=args.workers,
                                                  collate_fn=collate, drop_last=True),
    }
    raw = {"folder, shuffled files": lambda: raw_folder(folder),
           "shards, wrapssl's header parser": lambda: raw_wrapssl(paths),
           "shards, Python's tarfile": lambda: raw_tarfile(paths)}
    try:
        import webdataset  # noqa: F401
        loaders["shards (webdataset 1.0)"] = webdataset_loader(spec, args.image_size, args.batch_size, args.workers,
                                                               args.buffer)
        raw["shards, webdataset"] = lambda: raw_webdataset(spec)
    except ImportError:
        print("webdataset is not installed: its rows are skipped (pip install webdataset)")
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    raw_rates: dict[str, list[float]] = {k: [] for k in raw}
    for rep in range(args.reps + 1):
        for name, loader in loaders.items():
            n, seconds = one_pass(loader)
            if rep:
                rates[name].append(n / seconds)
        for name, fn in raw.items():
            start = time.perf_counter()
            fn()
            if rep:
                raw_rates[name].append(len(folder) / (time.perf_counter() - start))
    size_mb = sum(p.stat().st_size for p in paths) / 2 ** 20
    print(f"{command()}\n{machine()}\n{len(folder)} JPEGs 256x256 ({size_mb:.0f} MB) in {len(paths)} shards; "
          f"decode + resize to {args.image_size} px, batch {args.batch_size}, {args.workers} workers; median of "
          f"{args.reps} passes after a warm-up\n")
    base = rates["folder (ImageFolder)"]
    paired = {k: median(sorted(a / b for a, b in zip(v, base))) for k, v in rates.items()}
    print(markdown_table(["reader", "images/s", "vs folder (median of paired passes)", "passes"],
                         [[k, f"{median(v):.0f}", f"{paired[k]:.2f}x", " ".join(f"{x:.0f}" for x in v)]
                          for k, v in rates.items()]))
    print()
    print(markdown_table(["bytes only, one process", "samples/s", "passes"],
                         [[k, f"{median(v):.0f}", " ".join(f"{x:.0f}" for x in v)] for k, v in raw_rates.items()]))
    save_json(args.out, {"command": command(), "machine": machine(), "images": len(folder), "shards": len(paths),
                         "workers": args.workers, "image_size": args.image_size, "rates": rates,
                         "paired_vs_folder": paired, "raw_rates": raw_rates})


if __name__ == "__main__":
    main()
