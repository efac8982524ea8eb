"""Drift events and window verdicts, kept in one SQLite file (``<artifacts>/drift/events.db``).

A window evaluated again replaces its rows (the latest verdict stands), so re-running a
partition never duplicates an event. One event per metric that crossed its minor line:
``{camera, window, metric, value, threshold, reference, model_version}``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from roadloop.monitoring.models import DriftVerdict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS window_verdicts (
    camera_id TEXT NOT NULL, window_start TEXT NOT NULL, window_end TEXT NOT NULL,
    verdict TEXT NOT NULL, score REAL, metric TEXT, threshold REAL, reference_id TEXT,
    model_version TEXT, evaluated_at TEXT NOT NULL, detail TEXT NOT NULL,
    PRIMARY KEY (camera_id, window_start));
CREATE TABLE IF NOT EXISTS drift_events (
    camera_id TEXT NOT NULL, window_start TEXT NOT NULL, metric TEXT NOT NULL,
    severity TEXT NOT NULL, value REAL NOT NULL, threshold REAL NOT NULL,
    threshold_significant REAL, reference_id TEXT NOT NULL, model_version TEXT,
    created_at TEXT NOT NULL, PRIMARY KEY (camera_id, window_start, metric));
CREATE INDEX IF NOT EXISTS drift_events_time ON drift_events (window_start);
"""


class DriftEvent(BaseModel):
    camera_id: str
    window_start: datetime
    metric: str
    severity: str
    value: float
    threshold: float
    threshold_significant: float | None
    reference_id: str
    model_version: str | None
    created_at: datetime


def events_of(verdict: DriftVerdict, now: datetime) -> list[DriftEvent]:
    """One event per metric of the verdict at or over its minor line."""
    ref = (verdict.reference or {}).get("reference_id")
    return [
        DriftEvent(camera_id=verdict.camera_id, window_start=verdict.window_start,
                   metric=m.name, severity=m.verdict, value=m.value, threshold=m.threshold,
                   threshold_significant=m.threshold_significant, reference_id=ref,
                   model_version=verdict.model_version, created_at=now)
        for m in verdict.metrics
        if m.verdict in ("minor", "significant") and m.value is not None
        and m.threshold is not None and ref
    ]


class DriftEventStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # one transaction: commit, or roll back on error
                yield db
        finally:
            db.close()

    def record(self, verdict: DriftVerdict, now: datetime) -> list[DriftEvent]:
        """Store a window's verdict and its events, replacing an earlier evaluation."""
        events = events_of(verdict, now)
        key = (verdict.camera_id, verdict.window_start.isoformat())
        with self._db() as db:
            db.execute("DELETE FROM drift_events WHERE camera_id=? AND window_start=?", key)
            db.execute(
                "INSERT OR REPLACE INTO window_verdicts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (*key, verdict.window_end.isoformat(), verdict.verdict, verdict.score,
                 verdict.metric, verdict.threshold,
                 (verdict.reference or {}).get("reference_id"), verdict.model_version,
                 now.isoformat(), verdict.model_dump_json()))
            db.executemany(
                "INSERT INTO drift_events VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(e.camera_id, e.window_start.isoformat(), e.metric, e.severity, e.value,
                  e.threshold, e.threshold_significant, e.reference_id, e.model_version,
                  e.created_at.isoformat()) for e in events])
        return events

    def events(self, camera_id: str | None = None, limit: int = 1000) -> list[DriftEvent]:
        q = "SELECT * FROM drift_events"
        args: tuple = ()
        if camera_id is not None:
            q, args = q + " WHERE camera_id=?", (camera_id,)
        with self._db() as db:
            rows = db.execute(q + " ORDER BY window_start DESC, metric LIMIT ?", (*args, limit))
            cols = [c[0] for c in rows.description]
            return [DriftEvent.model_validate(dict(zip(cols, r, strict=True))) for r in rows]

    def verdict(self, camera_id: str, window_start: datetime) -> DriftVerdict | None:
        with self._db() as db:
            row = db.execute("SELECT detail FROM window_verdicts WHERE camera_id=? AND "
                             "window_start=?", (camera_id, window_start.isoformat())).fetchone()
        return DriftVerdict.model_validate(json.loads(row[0])) if row else None
