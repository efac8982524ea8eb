"""Durable outbox of sampled frames waiting for the gateway (SQLite WAL + a spool folder).

Layout under ``root``: ``outbox.db`` (SQLite, WAL, ``synchronous=FULL``) and ``spool/`` with
one ``<frame_id>.jpg`` per queued frame. The ``outbox`` table holds what is still to send
(metadata JSON, importance, size, attempts, next attempt time); ``journal`` remembers what
happened to every frame ever queued (``queued | acked | duplicate | evicted | rejected |
lost``) so a restart — or a test — can tell a sent frame from a lost one; ``counters``
persists totals (evictions, duplicates absorbed, …) across restarts.

Crash safety:

* ``put``: the JPEG is written to a dot-prefixed temp file, fsynced and renamed into
  ``spool/`` *before* its row is committed. A crash in between leaves an orphan file
  without a row; nothing references it.
* ``ack``: the row is deleted (journal → acked) *before* the file. A crash in between leaves
  another orphan file.
* On open, ``reconcile`` removes temp files and orphan files, and drops rows whose file
  vanished (journal → lost, counted).
* A frame is removed only once the gateway acknowledged it (201, or 409 = already stored);
  the idempotency key is ``frame_id``, so a frame sent twice across a crash is stored once.

Bounded disk: when queued bytes exceed ``max_bytes`` the lowest-importance frames (oldest
first among equals) are evicted — possibly the new one — and counted (``evicted_total``).

Retries: ``fail`` schedules the next attempt with exponential backoff and full jitter:
``delay = uniform(0, min(max_s, base_s * 2**attempt))`` (attempt 0 after the first failure),
at least the server's ``Retry-After`` when it sent one. The next attempt time is wall-clock
time: one further ahead than any delay the agent sets (``retry_horizon_s``) was set while the
clock was fast, and is taken as due now (``due``, ``next_due_at``).

The journal keeps at most ``journal_max_rows`` finished frames: pruned when the outbox is
opened and again every ``journal_max_rows // 10`` finishes (at most 1000), so a long run's
journal overshoots the bound by a tenth at most.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from edge_agent.fsutil import write_bytes_atomic

logger = logging.getLogger(__name__)

# The longest a server's ``Retry-After`` may hold a frame back (and pause the uploader): an
# hour, as long as ``uploader.MAX_UPLOAD_LINGER_S`` may hold a fresh one. A larger, non-finite
# or far-future value (a misconfigured proxy) is taken as this; a server asking for longer
# than the agent's own backoff cap (``retry_max_s``) is still honoured up to it.
MAX_RETRY_AFTER_S = 3600.0


def retry_horizon_s(backoff: BackoffPolicy) -> float:
    """The longest delay the agent ever puts on a queued item: its backoff cap or the longest
    ``Retry-After`` honoured. An item scheduled further ahead than this from now was failed
    while the wall clock was fast (stepped back since): it is due now, not in a year."""
    return max(backoff.max_s, MAX_RETRY_AFTER_S)


def bounded_retry_after(value: float | None) -> float | None:
    """A server-requested delay within ``[0, MAX_RETRY_AFTER_S]`` (nan/inf -> the maximum)."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return MAX_RETRY_AFTER_S
    return min(max(value, 0.0), MAX_RETRY_AFTER_S)


_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    frame_id TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    metadata TEXT NOT NULL,
    importance REAL NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_evict ON outbox (importance, created_at);
CREATE TABLE IF NOT EXISTS journal (
    frame_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    importance REAL NOT NULL,
    queued_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS journal_finished ON journal (finished_at);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(RuntimeError):
    """The outbox cannot be opened or written; the message names the path."""


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with full jitter (AWS architecture blog's "Full Jitter")."""

    base_s: float = 1.0
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError(
                f"need 0 < base_s <= max_s, got base_s={self.base_s} max_s={self.max_s}"
            )

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay after ``attempt`` earlier failures (0-based)."""
        return min(self.max_s, self.base_s * 2 ** min(max(attempt, 0), 62))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0.0, self.ceiling(attempt))


@dataclass
class OutboxItem:
    frame_id: str
    path: Path
    metadata: dict[str, Any]
    importance: float
    size: int
    created_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class PutResult:
    queued: bool  # False: the frame was already queued/sent, or evicted at once
    evicted: list[str] = field(default_factory=list)  # frame ids evicted to make room


@dataclass
class ReconcileReport:
    temp_files_removed: int = 0
    orphan_files_removed: int = 0
    rows_without_file: int = 0


class Outbox:
    """See the module docstring. Thread-safe (one connection behind a lock)."""

    def __init__(
        self,
        root: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backoff: BackoffPolicy | None = None,
        seed: int | None = None,
        journal_max_rows: int = 100_000,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.root = Path(root)
        self.spool = self.root / "spool"
        self.db_path = self.root / "outbox.db"
        self.max_bytes = int(max_bytes)
        self.backoff = backoff or BackoffPolicy()
        self._rng = random.Random(seed)
        self.journal_max_rows = journal_max_rows
        # finishes (ack, reject, evict) between two journal prunes: a tenth of the bound
        self._prune_every = max(1, min(1000, journal_max_rows // 10))
        self._finished_since_prune = 0
        self._lock = threading.RLock()
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.db_path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.db_path}: cannot open the outbox ({exc})") from exc
        self.last_reconcile = self.reconcile()
        self._prune_journal()

    # ------------------------------------------------------------------ helpers
    def _tx(self):
        return _Transaction(self._db)

    def _bump(self, name: str, n: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {k: int(v) for k, v in self._db.execute("SELECT name, value FROM counters")}

    @property
    def evicted_total(self) -> int:
        return self.counter("evicted")

    def _file_for(self, frame_id: str) -> Path:
        return self.spool / f"{frame_id}.jpg"

    def _set_journal(self, frame_id: str, status: str, now: float) -> None:
        self._db.execute(
            "UPDATE journal SET status = ?, finished_at = ? WHERE frame_id = ?",
            (status, now, frame_id),
        )

    # ------------------------------------------------------------------ recovery
    def reconcile(self) -> ReconcileReport:
        """Remove temp and orphan spool files; drop rows whose file is gone (see module doc)."""
        report = ReconcileReport()
        with self._lock:
            rows = {fid: f for fid, f in self._db.execute("SELECT frame_id, file FROM outbox")}
            referenced = set(rows.values())
            for path in self.spool.iterdir():
                if path.name.startswith("."):
                    path.unlink(missing_ok=True)
                    report.temp_files_removed += 1
                elif path.name not in referenced:
                    path.unlink(missing_ok=True)
                    report.orphan_files_removed += 1
            now = time.time()
            missing = [fid for fid, f in rows.items() if not (self.spool / f).is_file()]
            if missing:
                with self._tx():
                    for fid in missing:
                        self._db.execute("DELETE FROM outbox WHERE frame_id = ?", (fid,))
                        self._set_journal(fid, "lost", now)
                    self._bump("lost", len(missing))
                report.rows_without_file = len(missing)
        if report.temp_files_removed or report.orphan_files_removed or report.rows_without_file:
            logger.warning("outbox %s reconciled after an unclean stop: %s", self.root, report)
        return report

    def _prune_journal(self) -> None:
        with self._lock, self._tx():
            self._db.execute(
                "DELETE FROM journal WHERE status != 'queued' AND frame_id IN ("
                " SELECT frame_id FROM journal WHERE status != 'queued'"
                " ORDER BY finished_at DESC LIMIT -1 OFFSET ?)",
                (self.journal_max_rows,),
            )
            self._finished_since_prune = 0

    def _finished(self, n: int = 1) -> None:
        """``n`` frames left the outbox: prune the journal every ``_prune_every`` of them (a
        failed prune is logged: the frames' own changes are committed already)."""
        with self._lock:
            self._finished_since_prune += n
            if self._finished_since_prune < self._prune_every:
                return
            try:
                self._prune_journal()
            except sqlite3.Error as exc:
                logger.warning("outbox %s: cannot prune the journal (%s); later", self.root, exc)

    # ------------------------------------------------------------------ producer side
    def put(
        self,
        frame_id: str,
        data: bytes,
        metadata: dict[str, Any],
        importance: float,
        *,
        now: float | None = None,
    ) -> PutResult:
        """Queue one frame durably (file, then row), then enforce ``max_bytes``."""
        if not _ID_RE.fullmatch(frame_id or ""):
            raise ValueError(f"invalid frame_id {frame_id!r}: must match [A-Za-z0-9_.-]{{1,64}}")
        now = time.time() if now is None else now
        with self._lock:
            known = self._db.execute(
                "SELECT status FROM journal WHERE frame_id = ?", (frame_id,)
            ).fetchone()
            if known is not None:
                logger.debug(
                    "frame %s already in the outbox journal (%s); ignored", frame_id, known[0]
                )
                return PutResult(queued=False)
            target = self._file_for(frame_id)
            try:  # a dot-prefixed temp file until renamed: reconcile removes leftovers
                write_bytes_atomic(target, data, sync_dir=True)
            except OSError as exc:
                raise OutboxError(f"{target}: cannot write the spooled frame ({exc})") from exc
            try:
                self._insert(frame_id, target, data, metadata, importance, now)
            except sqlite3.Error as exc:
                # The transaction was rolled back: no row references the file (a full disk,
                # SQLITE_FULL). Do not leave it in spool/, uncounted, until the next restart.
                try:
                    target.unlink(missing_ok=True)
                except OSError as unlink_exc:
                    logger.warning("cannot remove %s: %s", target, unlink_exc)
                raise OutboxError(
                    f"{self.db_path}: cannot queue frame {frame_id} ({exc})") from exc
            evicted = self._enforce_bound(now)
        return PutResult(queued=frame_id not in evicted, evicted=evicted)

    def _insert(self, frame_id: str, target: Path, data: bytes, metadata: dict[str, Any],
                importance: float, now: float) -> None:
        """The frame's row, its journal entry and the counter, in one transaction."""
        with self._tx():
            self._db.execute(
                "INSERT INTO outbox(frame_id, file, metadata, importance, size, created_at,"
                " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (frame_id, target.name, json.dumps(metadata), float(importance), len(data),
                 now, 0.0),
            )
            self._db.execute(
                "INSERT INTO journal(frame_id, status, importance, queued_at)"
                " VALUES (?, 'queued', ?, ?)",
                (frame_id, float(importance), now),
            )
            self._bump("queued")

    def _enforce_bound(self, now: float) -> list[str]:
        evicted: list[str] = []
        total = self.total_bytes()
        while total > self.max_bytes:
            row = self._db.execute(
                "SELECT frame_id, file, size FROM outbox ORDER BY importance ASC, created_at ASC,"
                " rowid ASC LIMIT 1"
            ).fetchone()
            if row is None:
                break
            fid, fname, size = row
            with self._tx():
                self._db.execute("DELETE FROM outbox WHERE frame_id = ?", (fid,))
                self._set_journal(fid, "evicted", now)
                self._bump("evicted")
            (self.spool / fname).unlink(missing_ok=True)
            evicted.append(fid)
            total -= size
        if evicted:
            self._finished(len(evicted))
            logger.warning(
                "outbox over %d bytes: evicted %d lowest-importance frame(s)",
                self.max_bytes,
                len(evicted),
            )
        return evicted

    # ------------------------------------------------------------------ consumer side
    def due(self, now: float | None = None, limit: int = 16) -> list[OutboxItem]:
        """Frames whose next attempt is due, most important first (then oldest); a next
        attempt beyond ``retry_horizon_s`` from ``now`` is due (set while the clock was fast)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT frame_id, file, metadata, importance, size, created_at, attempts,"
                " next_attempt_at, last_error FROM outbox"
                " WHERE next_attempt_at <= ? OR next_attempt_at > ?"
                " ORDER BY importance DESC, created_at ASC, rowid ASC LIMIT ?",
                (now, now + retry_horizon_s(self.backoff), limit),
            ).fetchall()
        return [
            OutboxItem(
                r[0], self.spool / r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8]
            )
            for r in rows
        ]

    def next_due_at(self, now: float | None = None) -> float | None:
        """When the next frame is due (``now`` for one beyond ``retry_horizon_s``, see
        ``due``); None when the outbox is empty."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(CASE WHEN next_attempt_at > ? THEN ? ELSE next_attempt_at END)"
                " FROM outbox", (now + retry_horizon_s(self.backoff), now)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def _finish(self, frame_id: str, status: str, counter: str, now: float | None) -> None:
        """Drop ``frame_id`` from the outbox for good: journal ``status``, bump ``counter``,
        then delete its spool file."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT file FROM outbox WHERE frame_id = ?", (frame_id,)
            ).fetchone()
            with self._tx():
                self._db.execute("DELETE FROM outbox WHERE frame_id = ?", (frame_id,))
                self._set_journal(frame_id, status, now)
                self._bump(counter)
            if row is not None:
                (self.spool / row[0]).unlink(missing_ok=True)
            self._finished()

    def ack(self, frame_id: str, *, duplicate: bool = False, now: float | None = None) -> None:
        """The gateway stored the frame (201) or already had it (409): forget it."""
        status, counter = ("duplicate", "duplicates") if duplicate else ("acked", "acked")
        self._finish(frame_id, status, counter, now)

    def reject(self, frame_id: str, reason: str, *, now: float | None = None) -> None:
        """The gateway refused the frame for good (4xx other than 401/403/409/429)."""
        self._finish(frame_id, "rejected", "rejected", now)
        logger.error("gateway rejected frame %s for good: %s", frame_id, reason)

    def fail(
        self,
        frame_id: str,
        error: str,
        *,
        now: float | None = None,
        retry_after: float | None = None,
    ) -> float:
        """A transient failure: schedule the next attempt; returns the delay chosen (s)."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT attempts FROM outbox WHERE frame_id = ?", (frame_id,)
            ).fetchone()
            if row is None:
                return 0.0
            delay = self.backoff.delay(int(row[0]), self._rng)
            retry_after = bounded_retry_after(retry_after)
            if retry_after is not None:
                delay = max(delay, retry_after)
            with self._tx():
                self._db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
                    " WHERE frame_id = ?",
                    (now + delay, error[:500], frame_id),
                )
                self._bump("failed_attempts")
        return delay

    # ------------------------------------------------------------------ inspection
    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def total_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0])

    def journal(self, status: str | None = None) -> dict[str, str]:
        """``{frame_id: status}`` of every remembered frame (optionally one status only)."""
        with self._lock:
            if status is None:
                rows = self._db.execute("SELECT frame_id, status FROM journal")
            else:
                rows = self._db.execute(
                    "SELECT frame_id, status FROM journal WHERE status = ?", (status,)
                )
            return dict(rows.fetchall())

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection.

    The rollback happens only while a transaction is active: SQLite ends one itself on some
    errors (``SQLITE_FULL``), and a ``ROLLBACK`` then would fail ("cannot rollback - no
    transaction is active") and hide the real error. A failed ``COMMIT`` is rolled back too,
    so the connection never stays inside a transaction every later ``BEGIN`` refuses."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                rollback_if_active(self.db)
                raise
        else:
            rollback_if_active(self.db)


def rollback_if_active(db: sqlite3.Connection) -> None:
    """``ROLLBACK`` if ``db`` is inside a transaction; a failing one is logged, not raised
    (the caller is already raising the error that matters)."""
    if not db.in_transaction:
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        logger.warning("rollback failed: %s", exc)


def read_journal(root: Path | str) -> dict[str, str]:
    """``{frame_id: status}`` from an outbox folder without touching the spool (read-only)."""
    db = Path(root) / "outbox.db"
    if not db.is_file():
        raise OutboxError(f"{db}: no outbox here")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT frame_id, status FROM journal").fetchall())
    except sqlite3.OperationalError as exc:  # no journal (yet: an agent is creating it)
        raise OutboxError(f"{db}: no outbox journal ({exc})") from exc
    finally:
        conn.close()
