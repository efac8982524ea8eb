"""One ``syncfs(2)`` for the frames of several processes: group commit for the file-system flush.

The gateway's workers each flush the frame store once per group commit (``FrameStore.sync``)
before committing its rows. ``syncfs`` flushes the whole file system, so one worker's call
also makes every file the others had finished writing before it *started* durable. At 1000
frames/s offered in batches of 16, four workers commit about 62 times a second, mostly one
request at a time, and each of those commits paid for its own flush.

``SharedSyncfs.sync`` takes the time it was called (``CLOCK_MONOTONIC``, one clock for all
processes of a boot), then waits for the store's flush turn (an ``flock`` on a small file
in the store, released by the kernel if its holder dies). Holding it, it reads when the last
successful flush *started*: if that was after this call began, the caller's files are
durable already and it returns; otherwise it flushes and records its own start. Callers
that queue behind a running flush are all covered by the next one.

The record holds the boot id with the time: a monotonic time from before a reboot, or from
another machine sharing the volume, covers nothing here. A failed flush records nothing.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

_RECORD = struct.Struct("<16sQ")  # boot id (16 bytes), start of the last good flush (ns)


def boot_id() -> bytes:
    """This boot's id (Linux), 16 bytes; zeros where the kernel does not say."""
    try:
        text = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return bytes.fromhex(text.replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return b"\0" * 16


class SharedSyncfs:
    """Flushes of the file system under ``root`` shared by every process that uses the same
    ``turn_file``. ``flush(root)`` does the work: ``fsutil.syncfs`` (returns False where the
    call does not exist; then nothing is shared and the caller falls back)."""

    def __init__(self, root: Path, turn_file: Path, flush: Callable[[Path], bool]) -> None:
        self.root = Path(root)
        self.turn_file = Path(turn_file)
        self._flush = flush
        self._mutex = threading.Lock()  # flock does not exclude threads sharing one fd
        self._fd: int | None = None
        self._boot = boot_id()
        self.flushes = 0  # this process's flushes ...
        self.shared = 0  # ... and the calls another flush had already covered

    def sync(self, called_ns: int | None = None) -> bool:
        """Make everything written before this call durable; False when ``flush`` is not
        available. ``called_ns`` (tests) stands for the time of the call. Raises ``OSError``
        from a failed flush."""
        called = time.monotonic_ns() if called_ns is None else called_ns
        with self._mutex:
            fd = self._turn_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if self._last_start(fd) >= called:
                    self.shared += 1
                    return True
                started = time.monotonic_ns()
                if not self._flush(self.root):
                    return False
                os.pwrite(fd, _RECORD.pack(self._boot, started), 0)
                self.flushes += 1
                return True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _last_start(self, fd: int) -> int:
        data = os.pread(fd, _RECORD.size, 0)
        if len(data) != _RECORD.size:
            return -1
        boot, started = _RECORD.unpack(data)
        # An unknown boot id (all zeros) could be any boot's: never trust such a record.
        return started if boot == self._boot and any(boot) else -1

    def _turn_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.turn_file, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
