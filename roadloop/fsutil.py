"""Atomic file-system writes and file hashes for the platform side (the gateway included).

A failed step leaves no half-written artifact behind: everything is written to a
dot-prefixed temporary sibling and renamed over the target, so a reader sees the old file
or the new one, never a part. (The edge agent has its own copy in ``edge_agent.fsutil``:
it imports nothing of the platform.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import sys
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A unique ``.<name>.tmp-<random><suffix>`` in ``path``'s folder (same file system, so the
    rename is atomic; the frame store's consistency check recognises the ``.tmp-`` mark)."""
    return Path(_temp_name(os.fspath(path), suffix))


def _temp_name(path: str, suffix: str = "") -> str:
    """``temp_sibling`` on a ``str`` path: what ``write_bytes_atomic`` uses, since the gateway
    writes two files per frame through it and building ``Path`` objects and a UUID there cost
    more than the system calls (measured: 8 µs of Python a file)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.urandom(6).hex()}{suffix}")


def fsync_dir(path: Path) -> None:
    """fsync a folder, so the renames into it survive a power cut (a file's path works too:
    its data and size are flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(
    path: Path, *, parents: bool = False, suffix: str = "", durable: bool = False
) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed over ``path``.

    For writers that want a path, not bytes (``np.savez``, ``torch.save``, a copy). On an
    exception the temporary file is removed and ``path`` is untouched. ``durable=True``
    fsyncs the file before the rename (``fsync_dir`` the folder when the rename itself must
    survive a power cut).
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, suffix)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Linux: a file can be created without a name (``O_TMPFILE``) and linked in once written,
# which costs the kernel one directory entry instead of a temporary one, its rename and its
# removal, and never leaves a temporary file behind. None where it cannot be used (not Linux,
# or no /proc to name the file by).
_O_TMPFILE: int | None = (getattr(os, "O_TMPFILE", None)
                          if sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")
                          else None)
# The errors of an O_TMPFILE open on a kernel or file system without it (open(2))
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})


def write_bytes_atomic(
    path: Path,
    data: bytes,
    *,
    parents: bool = False,
    durable: bool = False,
    mode: int | None = None,
) -> None:
    """Write ``data`` to ``path`` atomically.

    ``durable=True`` fsyncs the data before the file gets its name; ``mode`` sets the
    permissions from the first byte on (a key or token is never readable by others, not even
    briefly). ``parents=True`` creates missing folders (only when the first open says one is
    missing: the gateway writes two files per frame here into folders that almost always
    exist).

    On Linux the data goes into an unnamed file in ``path``'s folder, linked in as ``path``
    when complete (or, when ``path`` exists, linked under a temporary name and renamed over
    it); elsewhere into a temporary sibling renamed over ``path``. Measured on the gateway's
    frame writes (benchmarks/results/intake-1129-s19/): ~25 µs of kernel time less a frame.
    """
    path = os.fspath(path)
    create_mode = 0o666 if mode is None else mode
    folder = os.path.dirname(path) or "."
    fd = _open_unnamed(folder, create_mode, parents)
    if fd is not None:
        try:
            _fill(fd, data, mode, durable)
            _link_into_place(fd, path)
        finally:
            os.close(fd)
        return
    tmp = _temp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with _removed_on_error(tmp):
        try:
            fd = os.open(tmp, flags, create_mode)
        except FileNotFoundError:
            if not parents:
                raise
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, flags, create_mode)
        try:
            _fill(fd, data, mode, durable)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def _open_unnamed(folder: str, create_mode: int, parents: bool) -> int | None:
    """A descriptor on a new unnamed file in ``folder`` (``O_TMPFILE``), or None where the
    platform, kernel or file system has none."""
    if _O_TMPFILE is None:
        return None
    try:
        return os.open(folder, os.O_WRONLY | _O_TMPFILE, create_mode)
    except FileNotFoundError:
        if not parents:
            raise
        os.makedirs(folder, exist_ok=True)
        return _open_unnamed(folder, create_mode, parents=False)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise


def _fill(fd: int, data: bytes, mode: int | None, durable: bool) -> None:
    # os.write on the descriptor, not a buffered file object: the gateway writes two files
    # per frame through here, and the wrapper's set-up and extra flush showed up in its
    # profile.
    if mode is not None:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if durable:
        os.fsync(fd)


def _link_into_place(fd: int, path: str) -> None:
    """Give the unnamed file ``fd`` the name ``path``, replacing a file already there.

    ``linkat(2)`` of ``/proc/self/fd/<fd>`` with ``AT_SYMLINK_FOLLOW``, the unprivileged way
    ``open(2)`` documents. Python's ``os.link`` calls ``linkat`` only when given a directory
    descriptor; the source path is absolute, so the kernel ignores the one passed (``fd``)."""
    source = f"/proc/self/fd/{fd}"
    try:
        os.link(source, path, src_dir_fd=fd, follow_symlinks=True)
        return
    except FileExistsError:
        pass
    tmp = _temp_name(path)
    os.link(source, tmp, src_dir_fd=fd, follow_symlinks=True)
    with _removed_on_error(tmp):
        os.replace(tmp, path)


@contextmanager
def _removed_on_error(tmp: str) -> Iterator[None]:
    """Remove the temporary file ``tmp`` (when it exists) if the block raises, then re-raise:
    a failed write leaves no half-written file behind."""
    try:
        yield
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def create_exclusive(path: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` unless it exists; True when this call created it.

    The data is written (``mode`` from the start) and fsynced under a temporary name, then
    hard-linked into place: ``link`` fails when the target exists, so two first runs never
    overwrite each other's file (a key, say) and nobody sees a half-written one.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(
    path: Path, text: str, *, parents: bool = False, durable: bool = False, mode: int | None = None
) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``parents=True`` creates missing folders."""
    write_bytes_atomic(path, text.encode("utf-8"), parents=parents, durable=durable, mode=mode)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def lock_path_for(path: Path) -> Path:
    """The sibling lock file ``sibling_lock`` takes for ``path``: ``<parent>/.<name>.lock``."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextmanager
def sibling_lock(path: Path) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``<parent>/.<name>.lock`` (waiting for it) while the
    block runs: serialises read-modify-writes and swaps of ``path`` between threads and
    processes on this host. ``path``'s folder must exist.

    The lock file is removed on the way out, while still locked, so none is left beside
    ``path``; a waiter that then gets the lock on the removed file sees that the name no
    longer points at what it locked and starts again on the new one. Not reentrant: a
    thread that holds it and asks again waits for ever.
    """
    lock = lock_path_for(path)
    while True:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(lock)
                current = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # locked a file its last holder removed: take the new one
    try:
        yield lock
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def swap_dir_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``; an older ``final`` is renamed aside,
    restored if the rename fails, and deleted once the new one is in place.

    Two swaps into one ``final`` (two runs of one asset) take turns on ``final``'s sibling
    lock (``sibling_lock``): the later one wins, neither fails, and no ``.old-*`` folder is
    left behind."""
    with sibling_lock(final):
        aside: Path | None = None
        if final.exists() or final.is_symlink():
            aside = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:12]}"
            os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            if aside is not None:
                os.replace(aside, final)
            raise
    if aside is not None:  # outside the lock: nobody else uses this unique name
        shutil.rmtree(aside, ignore_errors=True)


_LIBC: object | None = None


def _syncfs_fn() -> object | None:
    """libc's ``syncfs`` (Linux), else None."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return None
    if _LIBC is None:
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _LIBC = False
    return getattr(_LIBC, "syncfs", None) if _LIBC else None


class SyncFsHandle:
    """One descriptor on a file system, kept open so that ``sync`` reports every write-back
    error since ``arm`` first ran in this process.

    Linux keeps a write-back error sequence per file system and ``syncfs(2)`` checks it
    against what the descriptor last saw: opened before the writes it must vouch for, a
    descriptor reports an error from the kernel's background write-back of those files too,
    once. Call ``arm`` before writing, ``sync`` to flush and check. A forked child (a second
    gateway worker) opens its own descriptor at its first ``arm``: the parent's would share
    one error cursor between processes, and the first to sync would swallow the error for
    the other. Thread-safe; the descriptor closes when the handle is collected or ``close``d.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._finalizer: object | None = None

    def arm(self) -> None:
        """Open the descriptor (once per process) if it is not open; ``path`` must exist."""
        if self._fd is not None and self._pid == os.getpid():
            return
        if _syncfs_fn() is None:
            return
        with self._lock:
            pid = os.getpid()
            if self._fd is not None and self._pid == pid:
                return
            if self._fd is not None:  # inherited across a fork: close this process's copy
                if self._finalizer is not None:
                    self._finalizer.detach()  # type: ignore[attr-defined]
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            fd = os.open(self.path, os.O_RDONLY)
            self._fd, self._pid = fd, pid
            self._finalizer = weakref.finalize(self, _close_quietly, fd, pid)

    def sync(self) -> bool:
        """``syncfs(2)`` through the armed descriptor (arming it first if need be); False
        where the call is not available. Raises ``OSError`` on a write-back error."""
        fn = _syncfs_fn()
        if fn is None:
            return False
        self.arm()
        assert self._fd is not None
        if fn(self._fd) != 0:  # type: ignore[operator]
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(self.path))
        return True

    def close(self) -> None:
        with self._lock:
            fin, self._finalizer, self._fd, self._pid = self._finalizer, None, None, None
        if fin is not None:
            fin()  # type: ignore[operator]


def _close_quietly(fd: int, pid: int) -> None:
    if os.getpid() != pid:  # a forked child's copy: the parent closes its own
        return
    try:
        os.close(fd)
    except OSError:
        pass


def mount_of(path: Path | str, *, proc: Path = Path("/proc")) -> tuple[str, str, str] | None:
    """``(device, mount point, file system type)`` of the mount holding ``path``, from
    ``/proc/self/mountinfo`` (the first mount of ``path``'s device, ``major:minor``); None
    when it cannot be told (another OS, no such entry)."""
    try:
        st = os.stat(path)
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        with open(proc / "self" / "mountinfo", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 4 and fields[2] == dev and "-" in fields:
                    return dev, fields[4], fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return None
    return None


def ext4_without_journal(path: Path | str, *, proc: Path = Path("/proc"),
                         sysfs: Path = Path("/sys")) -> bool | None:
    """Whether ``path`` lies on an ext4 file system mounted without a journal (Linux); None
    when it cannot be told (another OS, no such sysfs entry).

    Such a file system (``mkfs.ext4 -O ^has_journal``, some VM images) does two things a
    frame store notices: each new file walks past every inode freed in the last minute (five
    while its inode table is dirty), ``find_inode_bit`` calling ``recently_deleted`` per inode
    (fs/ext4/ialloc.c; with a journal the check is skipped), so creating files right after
    a mass deletion costs milliseconds apiece; and after a power cut its metadata needs a
    full ``e2fsck``. ``/sys/fs/ext4/<dev>/journal_task`` reads ``<none>`` there.
    """
    found = mount_of(path, proc=proc)
    if found is None:
        return None
    dev, _, fstype = found
    if fstype != "ext4":
        return False
    try:
        name = os.path.basename(os.path.realpath(sysfs / "dev" / "block" / dev))
        task = (sysfs / "fs" / "ext4" / name / "journal_task").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return task == "<none>"
