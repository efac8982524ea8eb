"""Atomic file writes and file hashes for the edge agent.

Everything the agent persists (its identity, spooled frames, the updater's state, model files)
is written to a dot-prefixed temporary sibling, fsynced, then renamed over the target: a reader
— or the agent after a power cut — sees the old file or the new one, never a part. The dot
prefix matters: the outbox's ``reconcile`` and the model store's pruning skip or remove
dot-files as leftovers of an interrupted write.

The platform has its own copy (``roadloop.fsutil``): the agent imports nothing of the platform.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """Make renames in ``path`` durable (best effort: a file system that cannot is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A unique ``.<name>.tmp-<random>`` in ``path``'s folder (same file system: the rename
    is atomic; dot-prefixed: the agent's clean-ups treat it as a leftover)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def write_bytes_atomic(
    path: Path | str, data: bytes, *, mode: int | None = None, sync_dir: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically: temp sibling, fsync, ``os.replace``.

    ``mode`` sets the permissions from the first byte on (and exactly, whatever the umask),
    so a token is never readable by others, not even briefly. ``sync_dir=True`` also fsyncs
    the folder, so the rename itself survives a power cut. On any failure the temporary file
    is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_dir(path.parent)


def write_text_atomic(
    path: Path | str, text: str, *, mode: int | None = None, sync_dir: bool = False
) -> None:
    """``write_bytes_atomic`` of ``text`` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode, sync_dir=sync_dir)


def copy_file_atomic(src: Path | str, dst: Path | str, *, sync_dir: bool = False) -> None:
    """Copy ``src`` to ``dst`` atomically (temp sibling, fsync, ``os.replace``)."""
    dst = Path(dst)
    tmp = temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_dir(dst.parent)


def file_sha256(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks (a model's version id)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "copy_file_atomic",
    "file_sha256",
    "fsync_dir",
    "temp_sibling",
    "write_bytes_atomic",
    "write_text_atomic",
]
