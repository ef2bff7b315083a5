"""Atomic file writes: a crash or kill leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

import torch


def _fsync_dir(folder: Path) -> None:
    """fsync a directory entry, so the rename itself is durable (a no-op where the OS forbids it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _plain_mode() -> int:
    """The permissions a plain ``open(path, "w")`` gives a new file: 0o666 less the process's umask."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:  # Linux says the umask here; reading it changes nothing for other threads
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o077)  # elsewhere: set it and put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def _temp_file(path: Path) -> tuple[int, str]:
    """Create ``.<name>.<random>.tmp`` beside ``path`` as open() would (mode 0o666 less the umask, unlike
    mkstemp's 0o600); returns its descriptor and name."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """A file whose contents replace ``path`` only if the ``with`` block finishes without error; it gets the
    permissions a plain open() would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_move(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished file ``source`` durable, then rename it over ``path`` (same file system), with the
    permissions a plain open() would give it (a file from mkstemp or in a mkdtemp folder has 0o600)."""
    with open(source, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(source, _plain_mode())
    os.replace(source, path)
    _fsync_dir(Path(path).parent)
    return Path(path)


def write_failure(path: str | os.PathLike, error: BaseException) -> OSError:
    """An OSError that says which file could not be written, why, and how much room its disk has left."""
    text = str(error).strip()
    reason = getattr(error, "strerror", None) or (text.splitlines()[-1] if text else type(error).__name__)
    try:
        free = f"; {shutil.disk_usage(Path(path).parent).free / 2**20:,.0f} MB free there"
    except OSError:
        free = ""
    failure = OSError(f"could not write {os.fspath(path)}: {reason}{free}")
    failure.errno = getattr(error, "errno", None)
    return failure


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temp file in the same folder, fsync and rename.

    A failed write raises OSError naming the file (torch reports a full disk as a RuntimeError
    from its zip writer; that becomes an OSError too); the old file stays as it was.
    """
    try:
        with atomic_open(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        raise write_failure(path, e) from e
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
