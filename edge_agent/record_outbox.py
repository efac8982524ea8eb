"""Durable queue of small JSON records (traffic interval records) waiting for the gateway.

The frame outbox (``edge_agent.outbox``) is built for JPEGs that may be evicted by
importance; counts are different: tiny, each one precious, and an operator's time series has
a hole for every one lost. So they get their own queue in ``<state>/outbox/records.db``
(SQLite, WAL, ``synchronous=FULL``):

* ``put`` commits the record before the agent goes on; a record id already queued or already
  acknowledged is not queued again (``put`` returns False).
* A record leaves the queue only on the gateway's acknowledgement (201, or 409: already
  stored under that ``record_id``); a crash before it is resent with the same id after the
  restart, so the gateway never stores it twice.
* Failures back off like frames (``BackoffPolicy``: exponential, full jitter, at least the
  server's ``Retry-After``); a 4xx refusal is journalled ``rejected`` and logged.
* Bounded: past ``max_records`` queued the oldest are dropped, journalled ``evicted`` and
  counted (at 60 s intervals the default holds about a month without the gateway).
* A next attempt further ahead than any delay the agent sets (``retry_horizon_s``) was set
  while the wall clock was fast: it is due now.
* The journal forgets finished records after ``JOURNAL_KEEP_S``: pruned when the queue is
  opened, and in a long run every ``JOURNAL_PRUNE_EVERY`` finishes or once the clock moved
  ``JOURNAL_PRUNE_INTERVAL_S`` since the last prune.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from edge_agent.outbox import (
    BackoffPolicy,
    bounded_retry_after,
    retry_horizon_s,
    rollback_if_active,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_RECORDS = 50_000
JOURNAL_KEEP_S = 14 * 86400
JOURNAL_PRUNE_EVERY = 1000  # finishes (ack, duplicate, reject) between two journal prunes
JOURNAL_PRUNE_INTERVAL_S = 3600.0  # ... or this much time, whichever comes first

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS records_due ON records (next_attempt_at, created_at);
CREATE TABLE IF NOT EXISTS journal (
    record_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class QueuedRecord:
    record_id: str
    kind: str
    body: str  # the JSON sent as is
    attempts: int


class RecordOutbox:
    def __init__(self, root: Path | str, *, max_records: int = DEFAULT_MAX_RECORDS,
                 backoff: BackoffPolicy | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self.backoff = backoff or BackoffPolicy()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "records.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._finished_since_prune = 0
        self._pruned_at = time.time()
        with self._lock:
            self._prune_journal(self._pruned_at)

    def _prune_journal(self, now: float) -> None:
        """Forget records finished ``JOURNAL_KEEP_S`` or more before ``now`` (lock held)."""
        self._db.execute("DELETE FROM journal WHERE finished_at IS NOT NULL AND "
                         "finished_at <= ?", (now - JOURNAL_KEEP_S,))
        self._finished_since_prune = 0
        self._pruned_at = now

    def _maybe_prune_journal(self, now: float) -> None:
        """After a finish (lock held): prune every ``JOURNAL_PRUNE_EVERY`` finishes, or once
        ``now`` is ``JOURNAL_PRUNE_INTERVAL_S`` away from the last prune (either way: a clock
        stepped back prunes too). A failed prune is logged; the finish is committed already."""
        self._finished_since_prune += 1
        if (self._finished_since_prune < JOURNAL_PRUNE_EVERY
                and abs(now - self._pruned_at) < JOURNAL_PRUNE_INTERVAL_S):
            return
        try:
            self._prune_journal(now)
        except sqlite3.Error as exc:
            rollback_if_active(self._db)
            logger.warning("record outbox %s: cannot prune the journal (%s); later",
                           self.root, exc)

    def _bump(self, name: str, n: int = 1) -> None:
        self._db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                         "value = value + excluded.value", (name, n))

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def put(self, record_id: str, body: dict[str, Any], *, kind: str = "traffic_interval",
            now: float | None = None) -> bool:
        """Queue one record durably; False when this id was queued before."""
        now = time.time() if now is None else now
        text = json.dumps(body, allow_nan=False, separators=(",", ":"))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                known = self._db.execute("SELECT 1 FROM journal WHERE record_id = ?",
                                         (record_id,)).fetchone()
                if known:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("INSERT INTO records (record_id, kind, body, created_at) "
                                 "VALUES (?, ?, ?, ?)", (record_id, kind, text, now))
                self._db.execute("INSERT INTO journal VALUES (?, 'queued', NULL)", (record_id,))
                over = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0] \
                    - self.max_records
                if over > 0:
                    old = [r[0] for r in self._db.execute(
                        "SELECT record_id FROM records ORDER BY created_at LIMIT ?", (over,))]
                    self._db.executemany("DELETE FROM records WHERE record_id = ?",
                                         [(r,) for r in old])
                    self._db.executemany("UPDATE journal SET status = 'evicted', finished_at = ?"
                                         " WHERE record_id = ?", [(now, r) for r in old])
                    self._bump("evicted", len(old))
                    logger.error("record outbox full (%d): dropped the %d oldest record(s)",
                                 self.max_records, len(old))
                self._db.execute("COMMIT")
            except BaseException:
                # only while a transaction is active: SQLite ends one itself on a full disk,
                # and a ROLLBACK then would hide the real error
                rollback_if_active(self._db)
                raise
        return True

    def due(self, now: float | None = None, limit: int = 16) -> list[QueuedRecord]:
        """Records whose next attempt is due, oldest first; a next attempt beyond
        ``retry_horizon_s`` from ``now`` is due (it was set while the clock was fast)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT record_id, kind, body, attempts FROM records"
                " WHERE next_attempt_at <= ? OR next_attempt_at > ?"
                " ORDER BY created_at LIMIT ?",
                (now, now + retry_horizon_s(self.backoff), limit)).fetchall()
        return [QueuedRecord(*r) for r in rows]

    def next_due_at(self, now: float | None = None) -> float | None:
        """When the next record is due (``now`` for one beyond ``retry_horizon_s``)."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(CASE WHEN next_attempt_at > ? THEN ? ELSE next_attempt_at END)"
                " FROM records", (now + retry_horizon_s(self.backoff), now)).fetchone()
        return None if row[0] is None else float(row[0])

    def _finish(self, record_id: str, status: str, now: float | None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM records WHERE record_id = ?", (record_id,))
                self._db.execute("UPDATE journal SET status = ?, finished_at = ? "
                                 "WHERE record_id = ?", (status, now, record_id))
                self._bump(status)
                self._db.execute("COMMIT")
            except BaseException:
                rollback_if_active(self._db)  # never left inside a transaction
                raise
            self._maybe_prune_journal(now)

    def ack(self, record_id: str, *, duplicate: bool = False, now: float | None = None) -> None:
        self._finish(record_id, "duplicate" if duplicate else "acked", now)

    def reject(self, record_id: str, reason: str, *, now: float | None = None) -> None:
        logger.error("traffic record %s refused by the gateway: %s", record_id, reason[:300])
        self._finish(record_id, "rejected", now)

    def fail(self, record_id: str, detail: str, *, retry_after: float | None = None,
             now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute("SELECT attempts FROM records WHERE record_id = ?",
                                   (record_id,)).fetchone()
            if row is None:
                return
            delay = max(self.backoff.delay(row[0]), bounded_retry_after(retry_after) or 0.0)
            self._db.execute("UPDATE records SET attempts = attempts + 1, next_attempt_at = ?, "
                             "last_error = ? WHERE record_id = ?",
                             (now + delay, detail[:500], record_id))

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def journal(self, status: str | None = None) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute("SELECT record_id, status FROM journal").fetchall()
        return {r: s for r, s in rows if status is None or s == status}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_MAX_RECORDS", "QueuedRecord", "RecordOutbox"]
