"""Atomic file writes and file hashes for the edge agent.

Everything the agent persists (its identity, spooled frames, the updater's state, model files)
is written to a dot-prefixed temporary sibling, fsynced, then renamed over the target: a reader
— or the agent after a power cut — sees the old file or the new one, never a part. The dot
prefix matters: the outbox's ``reconcile`` and the model store's pruning skip or remove
dot-files as leftovers of an interrupted write.

``StateDirLock`` keeps a second agent off a state dir that one already uses.

The platform has its own copy (``roadloop.fsutil``): the agent imports nothing of the platform.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Self

from edge_agent.errors import EdgeAgentError

STATE_LOCK_FILE = "agent.lock"


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


class StateDirLocked(EdgeAgentError):
    """Another process (``pid``, None when it cannot be told) holds ``state_dir``'s lock."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        self.state_dir = Path(state_dir)
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"state dir {self.state_dir} is in use by {holder} (another roadloop-agent on "
            f"the same --state-dir; {self.state_dir / STATE_LOCK_FILE} is locked): stop it "
            "first, or give this agent its own --state-dir"
        )


class StateDirLock:
    """An exclusive, non-blocking ``flock`` on ``<state_dir>/agent.lock``.

    Two agents on one state dir would delete each other's spooled frames (the outbox's
    start-up reconcile) and rotate one token family (the gateway then revokes the device), so
    ``EdgeAgent.run`` and ``roadloop-agent enroll`` take this first and a second one fails at
    once with ``StateDirLocked``. The holder's pid is written into the file, for the message.
    The kernel drops the lock when the process exits or crashes; ``release`` drops it earlier
    (the file stays: unlinking it would let a third process lock a fresh inode meanwhile).
    The descriptor is not inherited by child processes.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / STATE_LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> Self:
        if self._fd is not None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            raise StateDirLocked(self.state_dir, int(text) if text.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid is for the message only; the lock is what counts
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = [
    "STATE_LOCK_FILE",
    "StateDirLock",
    "StateDirLocked",
    "copy_file_atomic",
    "file_sha256",
    "fsync_dir",
    "temp_sibling",
    "write_bytes_atomic",
    "write_text_atomic",
]
