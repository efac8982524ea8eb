"""Per-frame-key locks: two uploads of the same ``camera/frame`` id never interleave their
writes, and uploads of different ids never wait on each other.

An upload holds its keys from the file write until its row is committed (``fleet.intake``),
so a lock is held for a whole group commit — tens of milliseconds under load. The gateway
used to stripe keys over 4096 locks; at 32 agents × 16-frame batches about 500 keys are held
at a time, so a new batch shared a stripe with one in flight 6 times in 10 and waited for
that batch's commit (measured: handler threads were waiting on a stripe in 13–14 % of their
samples, benchmarks/results/gateway_intake_profile.md). Here a lock exists per key while
someone holds or waits for it, and is dropped after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyLocks:
    """Exclusive locks named by string keys, created on demand and freed when unused."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, users)

    def _join(self, key: str) -> threading.Lock:
        with self._mutex:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
            return lock

    def _leave(self, key: str) -> None:
        with self._mutex:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    @contextmanager
    def hold(self, keys: list[str]) -> Iterator[None]:
        """Hold every key of ``keys`` (taken in sorted order, so two callers holding
        overlapping sets never wait on each other in a cycle)."""
        taken: list[tuple[str, threading.Lock]] = []
        try:
            for key in sorted(set(keys)):
                lock = self._join(key)
                try:
                    lock.acquire()
                except BaseException:
                    self._leave(key)
                    raise
                taken.append((key, lock))
            yield
        finally:
            for key, lock in reversed(taken):
                lock.release()
                self._leave(key)

    def __len__(self) -> int:
        """Keys currently held or waited for."""
        with self._mutex:
            return len(self._locks)
