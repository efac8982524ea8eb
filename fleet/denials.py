"""Refused requests in the audit log, aggregated: one row per (action, reason, client, route,
token, device) and window, with a count — not one fsynced row per refusal.

A flood of bad tokens used to cost one database transaction (and fsync) each and left
tens of thousands of identical rows. Now a refusal is a counter bump in memory; the
counters become rows when their window ends (a background thread), when an operator reads
the audit log (``flush`` first, so the log is never behind) and at shutdown. Successful
security events (enrollment, refresh, token creation, revocation) keep their own rows,
written with the action they record (``fleet.auth.audit``).

The table is bounded: past ``max_keys`` distinct keys in one window, new clients are
folded into client ``"(other)"`` (their count is kept, their address is not), so memory
and rows per window stay bounded however many addresses a flood comes from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet.db import AuditEvent, Database

logger = logging.getLogger(__name__)

OTHER_CLIENTS = "(other)"
# (action, reason, client, route, token_id, device_id)
DenialKey = tuple[str, str, str | None, str | None, int | None, str | None]


@dataclass
class _Tally:
    count: int
    first_at: datetime
    last_at: datetime
    example: dict[str, Any] = field(default_factory=dict)


class DenialLog:
    """Counts refusals in memory and writes them as aggregated ``audit_log`` rows."""

    def __init__(self, db: Database, clock: Callable[[], datetime], window_s: float,
                 max_keys: int = 10_000) -> None:
        self.db = db
        self.clock = clock
        self.window_s = window_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one flush at a time: rows keep their order
        self._tallies: dict[DenialKey, _Tally] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rows_written = 0

    def record(self, action: str, reason: str, *, client: str | None = None,
               route: str | None = None, token_id: int | None = None,
               device_id: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """Count one refusal. ``detail`` (client-chosen values such as a camera id) is kept
        for the first refusal of a key in a window only."""
        now = self.clock()
        key: DenialKey = (action, reason, client, route, token_id, device_id)
        with self._lock:
            tally = self._tallies.get(key)
            if tally is None and len(self._tallies) >= self.max_keys:
                key = (action, reason, OTHER_CLIENTS, route, None, None)
                tally = self._tallies.get(key)
            if tally is None:
                self._tallies[key] = _Tally(1, now, now, dict(detail or {}))
            else:
                tally.count += 1
                tally.last_at = now

    def pending(self) -> int:
        """Refusals counted and not yet written."""
        with self._lock:
            return sum(t.count for t in self._tallies.values())

    def flush(self) -> int:
        """Write the counters as rows (one transaction) and start a new window; returns rows."""
        with self._write_lock:
            with self._lock:
                tallies, self._tallies = self._tallies, {}
            if not tallies:
                return 0
            try:
                with self.db.write() as session:
                    for (action, reason, client, route, token_id, device_id), t in (
                            tallies.items()):
                        session.add(AuditEvent(
                            at=t.last_at, action=action, outcome="denied",
                            device_id=device_id, token_id=token_id, client=client,
                            detail={**t.example, "reason": reason, "path": route,
                                    "count": t.count, "first_at": t.first_at.isoformat(),
                                    "last_at": t.last_at.isoformat()},
                        ))
                    session.commit()
            except Exception:  # the audit must never take the gateway down; keep the counts
                logger.exception("could not write %d aggregated denial rows", len(tallies))
                with self._lock:
                    for key, t in tallies.items():
                        mine = self._tallies.get(key)
                        if mine is None:
                            self._tallies[key] = t
                        else:
                            mine.count += t.count
                            mine.first_at = t.first_at
                return 0
            self.rows_written += len(tallies)
            return len(tallies)

    # ------------------------------------------------------------------ window thread
    def start(self) -> None:
        """Flush every ``window_s`` on a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="denial-audit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic() + self.window_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.window_s
            self.flush()

    def stop(self) -> None:
        """Stop the thread and write what is pending (shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()
