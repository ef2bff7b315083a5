"""Tar shards (the WebDataset layout) as training data: read in order, split over ranks and workers, shuffled
through a buffer; and the writer that makes them from a folder or a built-in data set.

A shard is a tar file whose members are grouped into samples by key: ``dir/name.jpg`` and ``dir/name.cls``
are the image and the label of sample ``dir/name`` (the key ends at the first dot of the file name, as
WebDataset's). The image is the member with an image extension (jpg, jpeg, png, webp, bmp); ``.cls`` holds
an integer label (kNN labels; -1 without one). ``--data`` names shards by a brace pattern
(``shards/train-{000000..000099}.tar``), a glob, a single file, or several of these joined by commas.

Shards are read sequentially by a small tar header parser (ustar, pax and GNU long names, gzip): on one
CPU core it hands over 30k samples/s where Python's tarfile gives 11k and webdataset (built on tarfile)
8.6k (benchmarks/bench_shards.py); decoding costs far more than either, so the DataLoader's images/s
are the decoder's.

Epochs have a known length: the samples per shard come from ``shards.json`` beside the shards (written by
``write_shards``; entries whose byte size no longer matches are recounted) or from one scan of the tar
headers. Each epoch the shards are shuffled (seed, epoch) and dealt to the readers, ``ranks x workers`` of
them, round robin; each reader streams its shards through a shuffle buffer of raw samples and yields
exactly ``per_reader`` samples, whole batches, cycling through its shards if it holds fewer. So every rank
gets the same number of batches, and an epoch is ``readers x per_reader`` samples: every sample once when
the shards hold equal counts and their number is a multiple of the readers, otherwise a few samples twice
and as many not at all in that epoch (the next epoch deals the shards anew).

Resume: from the (epoch, samples in epoch) of a checkpoint each reader knows how many samples it had yielded
(the DataLoader takes batches from its workers in turn) and restarts at that position of its shard list,
skipping the earlier members by their tar headers, with an empty buffer. Exact up to the buffer: at most
``shuffle_buffer`` samples per reader are seen again and as many are left out in the epoch of the
interruption; later epochs are the uninterrupted run's.
"""
from __future__ import annotations

import bisect
import glob
import gzip
import io
import json
import math
import os
import random
import re
import tarfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .data import (MAX_PIXELS, TensorImages, UnreadableDataError, _pair, _pil_limit_off, _pil_to_tensor,
                   _source_channels)
from .files import atomic_open, atomic_write_text

__all__ = ["TarShards", "ShardError", "shard_paths", "is_shard_spec", "expand_braces", "write_shards",
           "INDEX_NAME"]

INDEX_NAME = "shards.json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp")
_CHANNEL_PEEK = 32  # samples whose headers decide grey or colour


class ShardError(ValueError):
    """Shards that cannot be read as training data (no match, not a tar, no image member)."""


# ---------------------------------------------------------------------------------------------- names

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for: ``a{00..02}b`` -> a00b a01b a02b; ``{x,y}`` -> x y."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        a, b = span.groups()
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def _top_level_split(spec: str) -> list[str]:
    """``spec`` split at the commas outside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def is_shard_spec(spec: Any) -> bool:
    """True for a pattern, glob, file or list naming tar shards (every part ends in .tar, .tar.gz or .tgz)."""
    if isinstance(spec, (list, tuple)):
        return bool(spec) and all(isinstance(s, (str, os.PathLike)) and is_shard_spec(os.fspath(s)) for s in spec)
    if not isinstance(spec, (str, os.PathLike)):
        return False
    parts = _top_level_split(os.fspath(spec))
    return bool(parts) and all(_is_shard_name(p) for p in parts)


def shard_paths(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files ``spec`` names, in order; ShardError naming the part that matches no file."""
    parts = [p for s in spec for p in _top_level_split(os.fspath(s))] if isinstance(spec, (list, tuple)) \
        else _top_level_split(os.fspath(spec))
    found: list[Path] = []
    for part in parts:
        names = expand_braces(os.path.expanduser(part))
        for name in names:
            if glob.has_magic(name):
                matches = sorted(glob.glob(name))
                if not matches:
                    raise ShardError(f"no shard matches {name!r}; check the folder and the pattern "
                                     "(e.g. 'shards/train-{000000..000099}.tar' or 'shards/*.tar')")
                found += [Path(m) for m in matches]
            elif not os.path.isfile(name):
                more = f" (one of the {len(names)} names {part!r} stands for)" if len(names) > 1 else ""
                raise ShardError(f"shard {name!r}{more} does not exist; check the pattern's range or write the "
                                 "shards with `wrapssl shards SOURCE OUT_PATTERN`")
            else:
                found.append(Path(name))
    if not found:
        raise ShardError(f"{os.fspath(spec)!r} names no shard")
    return found


def _split_key(name: str) -> tuple[str, str]:
    """('dir/abc', 'seg.jpg') for the member 'dir/abc.seg.jpg': the key ends at the file name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


# ---------------------------------------------------------------------------------------------- reading

class _BadTar(Exception):
    """A shard's bytes are not a tar archive where a header should be."""


def _open(path: Path) -> io.BufferedIOBase:
    """The shard's bytes, decompressed when it is .tar.gz or .tgz."""
    if path.name.lower().endswith((".gz", ".tgz")):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _octal(field: bytes) -> int:
    """A tar number field: octal text, or GNU's base-256 for large values."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _skip(f: io.BufferedIOBase, n: int) -> None:
    """Move ``n`` bytes on (a seek where the stream allows it)."""
    if n <= 0:
        return
    if f.seekable():
        f.seek(n, os.SEEK_CUR)
    elif len(f.read(n)) < n:
        raise EOFError("the tar file ends inside a member")


def _read(f: io.BufferedIOBase, n: int) -> bytes:
    """Exactly ``n`` bytes; EOFError for a truncated member."""
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the tar file ends inside a member")
    return data


def _headers(f: io.BufferedIOBase) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file of a tar stream, read sequentially; the caller reads or skips its
    ``size`` bytes before asking for the next. POSIX ustar, pax (``path``) and GNU long names."""
    long_name, first = None, True
    while True:
        header = f.read(512)
        if len(header) < 512 or header.count(0) == 512:
            if first and len(header) < 512:
                raise _BadTar("empty or shorter than one tar header")
            return  # the end-of-archive blocks (or a file cut at a header: nothing more to read)
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise _BadTar("tar header checksum does not match" if not first else "no tar header at its start")
        first = False
        size, kind = _octal(header[124:136]), header[156:157]
        pad = (-size) % 512
        if kind in (b"L", b"x"):  # the next member's long name: GNU, or pax records "len key=value\n"
            data = _read(f, size)
            _skip(f, pad)
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                for record in data.decode("utf-8", "surrogateescape").split("\n"):
                    key, _, value = record.partition(" ")[2].partition("=")
                    if key == "path":
                        long_name = value
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, pax globals...: not samples
            _skip(f, size + pad)
            long_name = None
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and prefix:
            name = f"{prefix}/{name}"
        yield (long_name or name), size
        long_name = None
        _skip(f, pad)


def _tar_samples(path: Path, start: int = 0, read: bool = True) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(sample number, key, {extension: bytes}) of the samples of a shard from sample ``start`` on; members of
    earlier samples (and all of them when not ``read``) are skipped by their headers."""
    with _open(path) as f:
        key, members, j = None, {}, -1
        for name, size in _headers(f):
            k, ext = _split_key(name)
            if k != key:
                if key is not None and j >= start:
                    yield j, key, members
                key, members, j = k, {}, j + 1
            if read and j >= start:
                members[ext] = _read(f, size)
            else:
                _skip(f, size)
        if key is not None and j >= start:
            yield j, key, members


def _unreadable_shard(path: Path, e: Exception) -> ShardError:
    """The one-line error for a shard that cannot be read."""
    if isinstance(e, _BadTar) and ("start" in str(e) or "shorter" in str(e)):
        return ShardError(f"{os.fspath(path)} is not a tar file ({e}); shards are tar archives, e.g. written by "
                          "`wrapssl shards`")
    return ShardError(f"{os.fspath(path)} is not a readable tar file ({type(e).__name__}: {e}); write it again or "
                      "leave it out of --data")


_READ_ERRORS = (_BadTar, EOFError, OSError, zlib.error, ValueError)


def _count(path: Path) -> int:
    """Samples in a shard, from its tar headers (the data is skipped, not read)."""
    try:
        return sum(1 for _ in _tar_samples(path, read=False))
    except _READ_ERRORS as e:
        raise _unreadable_shard(path, e) from None


def _read_index(folder: Path) -> dict:
    """The shards.json of ``folder`` (empty if none or unreadable: the shards are then counted)."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _counts(paths: Sequence[Path]) -> tuple[list[int], list[str]]:
    """(samples per shard, class names) from each folder's shards.json where it matches, else a header scan."""
    indexes: dict[Path, dict] = {}
    counts, classes = [], []
    for path in paths:
        folder = path.parent
        if folder not in indexes:
            indexes[folder] = _read_index(folder)
            classes = classes or list(indexes[folder].get("classes") or [])
        entry = (indexes[folder].get("shards") or {}).get(path.name)
        if isinstance(entry, dict) and entry.get("bytes") == path.stat().st_size and \
                isinstance(entry.get("samples"), int):
            counts.append(entry["samples"])
        else:
            counts.append(_count(path))
    return counts, [str(c) for c in classes]


def _image_member(members: dict[str, bytes]) -> str | None:
    """The extension of the sample's image member, if it has one."""
    return next((ext for ext in members if ext.rsplit(".", 1)[-1] in IMAGE_MEMBERS), None)


class TarShards(IterableDataset):
    """Samples of tar shards as (uint8 image (C, H, W), label) items, streamed (see the module docstring).

    ``image_size`` as for folders (None keeps the source size); ``channels`` None decides once (3 if any of
    the first 32 samples is colour, else 1). ``len()`` is the number of samples in all shards.
    ``shuffle_buffer``: raw samples each reader holds to shuffle (memory: that many encoded images per
    worker). Unreadable samples are skipped, counted in ``num_bad`` (shared by DataLoader workers) and
    listed by ``unreadable()`` with the reason; a shard that cannot be opened while training is listed whole.
    Indexing (``shards[i]``) reads sample i by scanning its shard's headers: meant for a few probe images,
    not for training.
    """

    def __init__(self, spec: str | os.PathLike | Sequence[str | os.PathLike],
                 image_size: int | Sequence[int] | None = None, channels: int | None = None,
                 shuffle_buffer: int = 1000, max_pixels: int | None = MAX_PIXELS) -> None:
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be an int >= 1 (1: no shuffling), got {shuffle_buffer!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
        self.paths = shard_paths(spec)
        self.spec = spec
        self.image_size, self.max_pixels, self.shuffle_buffer = _pair(image_size), max_pixels, shuffle_buffer
        self.counts, self.classes = _counts(self.paths)
        self.offsets = [0]
        for n in self.counts:
            self.offsets.append(self.offsets[-1] + n)
        if self.offsets[-1] == 0:
            raise ShardError(f"the {len(self.paths)} shard(s) of {os.fspath(spec)!r} hold no samples")
        self.channels = channels or self._peek_channels()
        # shared memory: the loop's position reaches persistent workers; bad samples found in workers count here
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._bad = torch.zeros(self.offsets[-1], dtype=torch.bool).share_memory_()
        self._bad_shards = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()
        self._warned = torch.zeros(1, dtype=torch.bool).share_memory_()
        self.num_processes, self.process_index, self.batch_size, self.num_workers, self.seed = 1, 0, 1, 0, 0

    # ------------------------------------------------------------------ setup

    def _peek_channels(self) -> int:
        """3 if any of the first samples is a colour image, else 1; ShardError if the first has no image."""
        try:
            for i, (_, key, members) in enumerate(_tar_samples(self.paths[0])):
                if i >= _CHANNEL_PEEK:
                    break
                ext = _image_member(members)
                if ext is None:
                    if i == 0:
                        raise ShardError(
                            f"sample {key!r} of {os.fspath(self.paths[0])} has no image member (found "
                            f"{', '.join('.' + e for e in members) or 'none'}; expected one of "
                            f"{', '.join('.' + e for e in IMAGE_MEMBERS)}); write the shards with `wrapssl shards`")
                    continue
                try:
                    with _pil_limit_off(), Image.open(io.BytesIO(members[ext])) as image:
                        if _source_channels(image) == 3:
                            return 3
                except Exception:  # unreadable samples are dealt with (and reported) when read
                    continue
        except _READ_ERRORS as e:
            raise _unreadable_shard(self.paths[0], e) from None
        return 1

    def plan(self, num_processes: int, process_index: int, batch_size: int, num_workers: int, seed: int) -> None:
        """Tell the stream how it is read: processes, this one's rank, batch per process, workers, seed."""
        readers = num_processes * max(1, num_workers)
        if readers > len(self.paths):
            raise ValueError(f"{len(self.paths)} shard(s) cannot feed {readers} readers ({num_processes} "
                             f"process(es) x {max(1, num_workers)} DataLoader worker(s)): each reader streams its own "
                             "shards. Write more, smaller shards (wrapssl shards --per-shard) or lower num_workers")
        self.num_processes, self.process_index, self.batch_size = num_processes, process_index, batch_size
        self.num_workers, self.seed = num_workers, seed
        if self.per_reader() < 1:
            raise ValueError(f"the shards hold {len(self)} samples, fewer than one batch of {batch_size} for each "
                             f"of the {readers} readers (processes x workers); lower batch_size or num_workers")

    def position(self, epoch: int, skip: int) -> None:
        """Start the next iteration at global sample ``skip`` of epoch ``epoch`` (the Trainer's counters)."""
        self._position[0], self._position[1] = int(epoch), int(skip)

    def per_reader(self) -> int:
        """Samples each reader yields per epoch (as planned): its share of all samples in whole batches."""
        readers = self.num_processes * max(1, self.num_workers)
        return len(self) // readers // self.batch_size * self.batch_size

    def __len__(self) -> int:
        return self.offsets[-1]

    # ------------------------------------------------------------------ streaming

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = int(self._position[0]), int(self._position[1])
        # batches this rank had taken; the DataLoader takes them from its workers in turn, worker 0 first
        taken = skip // (self.batch_size * self.num_processes)
        done = -(-(taken - worker) // workers) * self.batch_size if taken > worker else 0
        return self._stream(epoch, self.process_index * workers + worker, self.num_processes * workers, done)

    def _stream(self, epoch: int, reader: int, readers: int, done: int) -> Iterator[tuple[torch.Tensor, int]]:
        """The ``reader``'s samples of ``epoch`` after the first ``done``: passes over its shards, each shuffled
        through the buffer and drained at its end (so a pass never mixes with the next)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        mine = torch.randperm(len(self.paths), generator=g)[reader::readers].tolist()
        if not mine:
            raise ValueError(f"{len(self.paths)} shard(s) cannot feed {readers} readers (processes x DataLoader "
                             "workers): each reader streams its own shards; write more shards or use fewer workers")
        rng = random.Random(f"{self.seed}/{epoch}/{reader}")
        left = len(self) // readers // self.batch_size * self.batch_size - done
        start = done % max(1, sum(self.counts[s] for s in mine))
        while left > 0:
            good, read = 0, [0]
            for index, members in self._shuffled(self._pass(mine, start), rng, read):
                item = self._decode_or_mark(index, members)
                if item is not None:
                    good, left = good + 1, left - 1
                    yield item
                    if left == 0:
                        return
            if good == 0:
                what = "could be read" if read[0] else "could be opened"
                raise UnreadableDataError(f"no sample of the shards {', '.join(self.paths[s].name for s in mine)} "
                                          f"{what}; dataset.unreadable() says why")
            start = 0

    def _shuffled(self, entries: Iterator[tuple[int, dict[str, bytes]]], rng: random.Random, read: list[int]
                  ) -> Iterator[tuple[int, dict[str, bytes]]]:
        """``entries`` through a shuffle buffer: once full, each new entry lets out a random one; then it drains.
        ``read[0]`` counts the entries taken in."""
        buffer: list[tuple[int, dict[str, bytes]]] = []
        for entry in entries:
            buffer.append(entry)
            read[0] += 1
            if len(buffer) >= self.shuffle_buffer:
                yield self._pop_random(buffer, rng)
        while buffer:
            yield self._pop_random(buffer, rng)

    @staticmethod
    def _pop_random(buffer: list[tuple[int, dict[str, bytes]]], rng: random.Random) -> tuple[int, dict[str, bytes]]:
        """Remove and return a random entry of ``buffer`` (swapped to the end first: O(1))."""
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        return buffer.pop()

    def _pass(self, mine: list[int], start: int) -> Iterator[tuple[int, dict[str, bytes]]]:
        """(global index, members) of the samples of the shards ``mine`` in order, from their sample ``start``."""
        for s in mine:
            if start >= self.counts[s]:
                start -= self.counts[s]
                continue
            yield from self._shard_samples(s, start)
            start = 0

    def _shard_samples(self, s: int, start: int) -> Iterator[tuple[int, dict[str, bytes]]]:
        """(global index, members) of shard ``s`` from its sample ``start``; a shard that fails is marked bad."""
        path, base = self.paths[s], self.offsets[s]
        try:
            for j, _, members in _tar_samples(path, start):
                if j >= self.counts[s]:
                    break  # the shard grew since it was counted: stay within the epoch's plan
                yield base + j, members
        except _READ_ERRORS as e:
            self._bad_shards[s] = True
            self._warn(f"shard {path.name} ({type(e).__name__}: {e})")

    def _decode_or_mark(self, index: int, members: dict[str, bytes]) -> tuple[torch.Tensor, int] | None:
        """The decoded sample, or None after marking it unreadable."""
        try:
            return self._decode(members)
        except Exception as e:  # any decoder failure: one bad sample must not end a long run
            self._bad[index] = True
            self._warn(f"{self.name(index)} ({type(e).__name__}: {e})")
            return None

    def _decode(self, members: dict[str, bytes]) -> tuple[torch.Tensor, int]:
        """(uint8 image, label) of one sample's members."""
        ext = _image_member(members)
        if ext is None:
            raise KeyError(f"no image member (found {', '.join('.' + e for e in members) or 'none'})")
        with _pil_limit_off(), Image.open(io.BytesIO(members[ext])) as image:
            pixels = image.width * image.height
            if self.max_pixels is not None and pixels > self.max_pixels:
                raise ValueError(f"{image.width}x{image.height} = {pixels:,} pixels, above the limit of "
                                 f"{self.max_pixels:,}; raise it with max_pixels= (wrapssl train --max-pixels)")
            tensor = _pil_to_tensor(image, self.channels, self.image_size)
        label = -1
        if "cls" in members:
            text = members["cls"].decode("utf-8", "replace").strip()
            label = int(text) if text.lstrip("-").isdigit() else -1
        return tensor, label

    def _warn(self, what: str) -> None:
        """Warn about the first unreadable sample or shard, in whichever process finds it."""
        if self._warned[0]:
            return
        self._warned[0] = True
        warnings.warn(f"unreadable data in the shards of {os.fspath(self.spec)!r}, e.g. {what}; it is skipped. This "
                      "warning is shown once; dataset.num_bad and dataset.unreadable() list them all.",
                      RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ random access, probes, reports

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within it) of global sample ``index``."""
        s = bisect.bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]

    def name(self, index: int) -> str:
        """'shard.tar/key' of global sample ``index`` (its number when the key cannot be read)."""
        s, j = self._locate(index)
        try:
            for _, key, _ in _tar_samples(self.paths[s], j, read=False):
                return f"{self.paths[s].name}/{key}"
        except _READ_ERRORS:
            pass
        return f"{self.paths[s].name}#{j}"

    def _members(self, index: int) -> dict[str, bytes]:
        """The members of global sample ``index``, read by scanning its shard's headers."""
        s, j = self._locate(index)
        for _, _, members in _tar_samples(self.paths[s], j):
            return members
        raise IndexError(f"{self.paths[s].name} holds fewer than {j + 1} samples (it changed since it was counted)")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        error: Exception | None = None
        for i in range(index, index + min(n, 1000)):
            i %= n
            if self._bad[i]:
                continue
            try:
                return self._decode(self._members(i))
            except Exception as e:
                error = e
                self._bad[i] = True
        raise UnreadableDataError(f"no readable sample near {index} in {os.fspath(self.spec)!r}; last error: "
                                  f"{type(error).__name__}: {error}")

    def head(self, n: int) -> TensorImages:
        """The first ``n`` readable samples in shard order, decoded, as an in-memory dataset (probes, kNN sets)."""
        images, labels, names = [], [], []
        for s in range(len(self.paths)):
            for index, members in self._shard_samples(s, 0):
                item = self._decode_or_mark(index, members)
                if item is not None:
                    images.append(item[0])
                    labels.append(item[1])
                    names.append(self.paths[s].name + f"#{index - self.offsets[s]}")
                if len(images) >= n:
                    break
            if len(images) >= n:
                break
        if not images:
            raise UnreadableDataError(f"no sample of {os.fspath(self.spec)!r} could be read")
        out = TensorImages(torch.stack(images), labels)
        out.files, out.classes = names, list(self.classes)
        return out

    @property
    def num_bad(self) -> int:
        """Unreadable samples found so far (in any worker); a failed shard counts its samples."""
        return int(self._bad.sum()) + sum(self.counts[s] for s in self._bad_shards.nonzero().flatten().tolist())

    def unreadable(self) -> dict[str, str]:
        """{'shard.tar/key' or 'shard.tar': why} for what could not be read so far (read again here to say why)."""
        reasons = {}
        for s in self._bad_shards.nonzero().flatten().tolist():
            try:
                _count(self.paths[s])
                reasons[self.paths[s].name] = "read now, failed while training (file changed?)"
            except ShardError as e:
                reasons[self.paths[s].name] = str(e)
        for index in self._bad.nonzero().flatten().tolist():
            try:
                self._decode(self._members(index))
                why = "read now, failed while training (file changed?)"
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            reasons[self.name(index)] = why
        return reasons


# ---------------------------------------------------------------------------------------------- writing

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
    from .data import ImageFolder
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
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"per_shard must be an int >= 1, got {per_shard!r}")
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
