"""Atomic file writes: a crash or kill leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """A file whose contents replace ``path`` only if the ``with`` block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_move(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished file ``source`` durable, then rename it over ``path`` (same file system)."""
    with open(source, "rb") as f:
        os.fsync(f.fileno())
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
