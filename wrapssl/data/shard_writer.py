"""`wrapssl shards`: write an image folder or a data set as tar shards, with their ``shards.json`` index."""
from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from ..checks import positive_int
from ..files import atomic_open, atomic_write_text
from .folders import ImageFolder
from .shard_files import INDEX_NAME, _read_index, expand_braces


def _shard_names(pattern: str, count: int) -> list[Path]:
    """The paths of ``count`` shards from OUT_PATTERN: printf-style (``%06d``) or a brace range."""
    if re.search(r"%0?\d*d", pattern):
        return [Path(pattern % i) for i in range(count)]
    names = expand_braces(pattern)
    if len(names) == 1:
        raise ValueError(f"OUT_PATTERN {pattern!r} has no shard number; write it as 'out/train-%06d.tar' or "
                         "'out/train-{000000..000099}.tar'")
    if len(names) < count:
        raise ValueError(f"OUT_PATTERN {pattern!r} names {len(names)} shards, and the data needs {count}; widen "
                         "its range, raise --per-shard, or use %06d")
    return [Path(n) for n in names[:count]]


def _encoded(image: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image (1 or 3 channels) as PNG bytes: lossless."""
    array = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def _samples(source: Any) -> Iterator[tuple[str, str, bytes, int]]:
    """(key, image extension, image bytes, label) of each item: a folder's files as they are, others as PNG."""
    if isinstance(source, ImageFolder):
        for rel, label in zip(source.files, source.labels):
            stem, ext = os.path.splitext(rel)
            key = stem.replace(".", "_")  # the key ends at the name's first dot
            yield key, ext[1:].lower(), (source.root / rel).read_bytes(), label
        return
    width = max(8, len(str(len(source))))
    for i in range(len(source)):
        image, label = source[i]
        if image.dtype != torch.uint8 or image.shape[0] not in (1, 3):
            raise ValueError(f"item {i} is a {image.shape[0]}-channel {image.dtype} image; shards hold 1- or "
                             "3-channel 8-bit images")
        yield f"{i:0{width}d}", "png", _encoded(image), int(label)


def write_shards(source: Any, pattern: str, per_shard: int, progress: bool = False) -> list[Path]:
    """Write the items of ``source`` (an image folder or a dataset of uint8 images) as tar shards named by
    ``pattern``, ``per_shard`` samples each, with a ``.cls`` label where there is one and ``shards.json``
    (samples per shard, class names) beside them. Each shard appears complete or not at all; existing
    shards are never overwritten. Returns the shard paths."""
    per_shard = positive_int(per_shard, "per_shard")
    n = len(source)
    if n == 0:
        raise ValueError("the source holds no images")
    paths = _shard_names(pattern, math.ceil(n / per_shard))
    if len({p.parent for p in paths}) != 1:
        raise ValueError(f"OUT_PATTERN {pattern!r} spreads the shards over several folders; keep them in one")
    existing = [p for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} of the {len(paths)} shards do); pick another "
                              "OUT_PATTERN or delete them: shards are never overwritten")
    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    index = _read_index(folder)
    entries = dict(index.get("shards") or {})
    samples, mtime, started = _samples(source), time.time(), time.perf_counter()
    for s, path in enumerate(paths):
        count = 0
        with atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, ext, data, label in samples:
                _add(tar, f"{key}.{ext}", data, mtime)
                if label >= 0:
                    _add(tar, f"{key}.cls", str(label).encode(), mtime)
                count += 1
                if count == per_shard:
                    break
        entries[path.name] = {"samples": count, "bytes": path.stat().st_size}
        if progress:
            done = min(n, (s + 1) * per_shard)
            print(f"\rwrote {s + 1}/{len(paths)} shards ({done}/{n} images, {time.perf_counter() - started:.0f} s)",
                  end="", flush=True)
    if progress:
        print()
    classes = [str(c) for c in getattr(source, "classes", []) or []]
    atomic_write_text(folder / INDEX_NAME, json.dumps({"classes": classes or index.get("classes") or [],
                                                      "shards": entries}, indent=1))
    return paths


def reading_pattern(pattern: str, count: int) -> str:
    """The brace pattern that reads back the ``count`` shards ``write_shards`` named by ``pattern``."""
    m = re.search(r"%0?(\d*)d", pattern)
    if m is None:
        names = expand_braces(pattern)
        return pattern if len(names) == count else ",".join(names[:count])
    width = int(m.group(1) or 0)
    return pattern[:m.start()] + f"{{{0:0{width}d}..{count - 1:0{width}d}}}" + pattern[m.end():]
