"""Tar shards as files: which files a pattern names, and their samples and counts read from the tar headers.

A shard is a tar file whose members are grouped into samples by key: ``dir/name.jpg`` and ``dir/name.cls``
are the image and the label of sample ``dir/name`` (the key ends at the first dot of the file name, as
WebDataset's). ``--data`` names shards by a brace pattern (``shards/train-{000000..000099}.tar``), a glob,
a single file, or several of these joined by commas.

Shards are read sequentially by a small tar header parser (ustar, pax and GNU long names, gzip): on one
CPU core it hands over 30k samples/s where Python's tarfile gives 11k and webdataset (built on tarfile)
8.6k (benchmarks/bench_shards.py); decoding costs far more than either, so the DataLoader's images/s
are the decoder's. The samples per shard come from ``shards.json`` beside the shards (written by
``write_shards``; entries whose byte size no longer matches are recounted) or from one scan of the headers.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence


INDEX_NAME = "shards.json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardError(ValueError):
    """Shards that cannot be read as training data (no match, not a tar, no image member)."""


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
