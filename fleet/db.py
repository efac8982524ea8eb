"""Gateway database: SQLAlchemy 2.0 models, engine and sessions.

SQLite (the default) runs in WAL mode with ``synchronous=FULL`` so a committed row survives a
crash; write transactions start with ``BEGIN IMMEDIATE`` (a ``write`` session) so two writers
queue on ``busy_timeout`` instead of failing on a lock upgrade. Any other URL (Postgres) gets
a plain engine. Datetimes are stored as UTC and always come back timezone-aware.

``model_manifests`` / ``rollouts`` hold published models and staged rollouts
(``fleet.rollouts``); cohort membership is computed from device ids, not stored.
``camera_configs`` / ``camera_config_versions`` hold each camera's configuration document and
its history (``fleet.camera_config``). ``frame_erasures`` records every erasure of a camera's
frames (``fleet.privacy``): the group committer's insert and the start-up reconciles refuse
a frame one covers (``erased_frames``), so a late upload cannot bring an erased frame back.
``traffic_intervals`` holds each traffic interval record
as posted (``fleet.traffic``); its rows are also split into ``traffic_line_counts``,
``traffic_zone_stats`` and ``traffic_events`` (written in the same transaction), so queries by
camera, line, zone, class, kind and time are SQL over indexed columns. ``camera_drift`` holds
each camera's latest drift report (``fleet.drift``).

The schema in a database is made and changed only by the Alembic revisions in
``fleet/migrations`` (never ``create_all``): a change to these models needs a revision, and
tests/test_fleet_migrations.py fails until the migrated schema matches them again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

logger = logging.getLogger(__name__)

# Integer on SQLite so the primary key aliases ROWID (autoincrement); BIGINT elsewhere.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes stored as naive UTC (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class DeviceStatus(StrEnum):
    pending_verification = "pending_verification"
    active = "active"
    inactive = "inactive"
    maintenance = "maintenance"
    error = "error"


class TokenKind(StrEnum):
    enrollment = "enrollment"
    access = "access"
    refresh = "refresh"
    admin = "admin"


class Base(DeclarativeBase):
    pass


class Device(Base):
    """One enrolled edge agent, bound to one camera."""

    __tablename__ = "devices"
    # One live (not revoked) device per camera, enforced by the database itself: two
    # concurrent enrollments of one camera cannot both pass the application's check.
    __table_args__ = (
        Index(
            "uq_devices_live_camera",
            "camera_id",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    camera_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(32), default=DeviceStatus.active.value)
    scopes: Mapped[str] = mapped_column(String(200))  # space-separated
    agent_version: Mapped[str] = mapped_column(String(100))
    hardware: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split()


class Token(Base):
    """Every credential: enrollment, access, refresh and admin tokens, stored as SHA-256."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(
        ForeignKey("devices.device_id"), nullable=True, index=True
    )
    scopes: Mapped[str] = mapped_column(String(200))
    camera_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    require_verification: Mapped[bool] = mapped_column(Boolean, default=False)
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    parent_id: Mapped[int | None] = mapped_column(BigIntPK, nullable=True)

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split()


class FrameRow(Base):
    """One stored frame; the pixels and sidecar live in the frame store at ``path``."""

    __tablename__ = "frames"
    __table_args__ = (UniqueConstraint("camera_id", "frame_id", name="uq_frames_camera_frame"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    frame_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    path: Mapped[str] = mapped_column(Text)  # relative to the frame store root
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    importance: Mapped[float] = mapped_column(Float, default=1.0)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    n_detections: Mapped[int] = mapped_column(Integer, default=0)
    recovered: Mapped[bool] = mapped_column(Boolean, default=False)


class FrameErasureRow(Base):
    """One erasure of a camera's frames (``POST /v1/privacy/erase``), kept for good.

    Written (and committed) before the erasure lists and deletes anything. A frame of
    ``camera_id`` captured in ``[since, covers_until)`` is refused by every insert of a
    ``frames`` row after it (``erased_frames``): an upload in flight during the erasure, a
    late upload of an erased frame, a start-up reconcile. ``until`` is the range asked for;
    ``covers_until`` is ``until`` cut at one day (``fleet.bounds.CLOCK_SKEW``, the furthest
    ahead of its clock the gateway accepts a capture time) after the erasure, so a range
    reaching into the future does not refuse the camera's frames for good."""

    __tablename__ = "frame_erasures"
    __table_args__ = (Index("ix_frame_erasures_camera_since", "camera_id", "since"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    until: Mapped[datetime] = mapped_column(UTCDateTime())
    covers_until: Mapped[datetime] = mapped_column(UTCDateTime())
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime())
    erased_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class HeartbeatRow(Base):
    """One heartbeat: the whole payload as JSON plus the numeric fields worth indexing."""

    __tablename__ = "heartbeats"
    __table_args__ = (
        Index("ix_heartbeats_camera_sent", "camera_id", "sent_at"),
        Index("ix_heartbeats_camera_received", "camera_id", "received_at"),  # latest_heartbeat
        UniqueConstraint("device_id", "sent_at", name="uq_heartbeats_device_sent"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    schema_version: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    fps: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    errors: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dropped_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outbox_depth: Mapped[int | None] = mapped_column(Integer, nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class AuditEvent(Base):
    """Append-only log of every auth and admin action."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | denied
    actor: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    token_id: Mapped[int | None] = mapped_column(BigIntPK, nullable=True)
    client: Mapped[str | None] = mapped_column(String(100), nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class GatewayStateRow(Base):
    """Small key/value facts the gateway keeps between runs (e.g. the last reconcile)."""

    __tablename__ = "gateway_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RolloutStatus(StrEnum):
    active = "active"
    paused = "paused"
    complete = "complete"
    rolled_back = "rolled_back"
    cancelled = "cancelled"  # superseded by a newer rollout before it completed


class ModelManifestRow(Base):
    """A published model: the signed manifest and its content-addressed file."""

    __tablename__ = "model_manifests"

    manifest_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    file_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    model_version: Mapped[str] = mapped_column(String(200), index=True)
    rollout_id: Mapped[str] = mapped_column(String(100))
    key_id: Mapped[str] = mapped_column(String(16))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(Text)  # relative to the models folder
    published_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    published_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class RolloutRow(Base):
    """One staged rollout of a manifest: stages, thresholds, where it is, what happened."""

    __tablename__ = "rollouts"

    rollout_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(ForeignKey("model_manifests.manifest_sha256"))
    model_version: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, percent, mode}]
    stage_index: Mapped[int] = mapped_column(Integer, default=0)
    stage_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Cohort = devices with h(device_id) < threshold; only ever grows (see fleet.rollouts).
    cohort_threshold: Mapped[float] = mapped_column(Float, default=0.0)
    hold_seconds: Mapped[float] = mapped_column(Float)
    budgets: Mapped[dict[str, Any]] = mapped_column(JSON)
    previous_model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    previous_manifest_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    health: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # per stage name


class CameraConfigRow(Base):
    """A camera's current configuration document (``fleet.camera_config``); no row means
    version 0, the empty document."""

    __tablename__ = "camera_configs"

    camera_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class CameraConfigVersionRow(Base):
    """Append-only history: every version a camera's configuration has had."""

    __tablename__ = "camera_config_versions"
    __table_args__ = (
        UniqueConstraint("camera_id", "version", name="uq_camera_config_versions_camera_version"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class CameraDriftRow(Base):
    """A camera's latest drift report (``fleet.drift``): the verdict and scores of the newest
    window the platform reported; read at each scrape of ``/metrics``."""

    __tablename__ = "camera_drift"

    camera_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime())
    window_end: Mapped[datetime] = mapped_column(UTCDateTime())
    verdict: Mapped[str] = mapped_column(String(32))
    drifted: Mapped[bool] = mapped_column(Boolean)
    scores: Mapped[dict[str, float]] = mapped_column(JSON)
    model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reported_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class TrafficIntervalRow(Base):
    """One traffic interval record as posted (``fleet.traffic``); ``record_id`` makes a resend
    a no-op. Records of one camera and interval from several agent runs sum."""

    __tablename__ = "traffic_intervals"
    __table_args__ = (Index("ix_traffic_intervals_camera_start", "camera_id", "interval_start"),)

    record_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    interval_start: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    interval_s: Mapped[int] = mapped_column(Integer)
    covered_s: Mapped[float] = mapped_column(Float)
    frames: Mapped[int] = mapped_column(Integer)
    config_version: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    document: Mapped[dict[str, Any]] = mapped_column(JSON)


class TrafficLineCountRow(Base):
    """One (line, direction, class) row of a record: vehicles, PCU and their speeds."""

    __tablename__ = "traffic_line_counts"
    __table_args__ = (
        Index("ix_traffic_line_counts_camera_start", "camera_id", "interval_start"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(
        ForeignKey("traffic_intervals.record_id"), index=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    interval_start: Mapped[datetime] = mapped_column(UTCDateTime())
    interval_s: Mapped[int] = mapped_column(Integer)
    line: Mapped[str] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(String(64))
    class_name: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer)
    pcu: Mapped[float] = mapped_column(Float)
    speeds_kmh: Mapped[list[float]] = mapped_column(JSON)


class TrafficZoneStatRow(Base):
    """One zone's statistics in a record."""

    __tablename__ = "traffic_zone_stats"
    __table_args__ = (
        Index("ix_traffic_zone_stats_camera_start", "camera_id", "interval_start"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(
        ForeignKey("traffic_intervals.record_id"), index=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    interval_start: Mapped[datetime] = mapped_column(UTCDateTime())
    interval_s: Mapped[int] = mapped_column(Integer)
    covered_s: Mapped[float] = mapped_column(Float)
    zone: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)  # the record's zone object


class TrafficEventRow(Base):
    """One traffic event (jam, stopped vehicle, wrong way, ...) of a record."""

    __tablename__ = "traffic_events"
    __table_args__ = (Index("ix_traffic_events_camera_at", "camera_id", "at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(
        ForeignKey("traffic_intervals.record_id"), index=True)
    camera_id: Mapped[str] = mapped_column(String(64))
    interval_start: Mapped[datetime] = mapped_column(UTCDateTime())
    event_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    zone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    line: Mapped[str | None] = mapped_column(String(64), nullable=True)
    event: Mapped[dict[str, Any]] = mapped_column(JSON)  # the record's event object


class Database:
    """Engine plus two session factories: ``read()`` (plain BEGIN) and ``write()``."""

    def __init__(
        self,
        url: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 30_000,
        pool_size: int = 16,
        max_overflow: int = 64,
    ) -> None:
        if url.startswith(("postgresql://", "postgres://")):
            # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed;
            # psycopg2 is (the Dagster Postgres storage needs it too).
            url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = _sqlite_engine(url, synchronous, busy_timeout_ms, pool_size, max_overflow)
            writer = self.engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        else:
            self.engine = create_engine(
                url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True
            )
            writer = self.engine
        self.read = sessionmaker(self.engine, expire_on_commit=False)
        self.write = sessionmaker(writer, expire_on_commit=False)
        path = sqlite_path(url) if self.is_sqlite else None
        self._turn_path = path.with_name(path.name + ".writer-turn") if path else None
        self._turn_fd: int | None = None
        self._turn_mutex = threading.Lock()

    @contextmanager
    def writer_turn(self) -> Iterator[None]:
        """SQLite file: wait for the database's one writer slot in the kernel (an ``flock``
        on ``<db>.writer-turn``, shared by every process of the gateway), so the next writer
        starts the moment the last one commits. Without it, writers from several worker
        processes meet in SQLite's busy handler, which sleeps 1, 2, 5, ... up to 100 ms
        between retries whatever the holder does (benchmarks/results/
        gateway_intake_profile.md). Other databases: nothing to wait for here."""
        if self._turn_path is None:
            yield
            return
        with self._turn_mutex:  # the threads of this process, one at a time
            if self._turn_fd is None:
                self._turn_fd = os.open(self._turn_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._turn_fd, fcntl.LOCK_EX)  # released by the kernel if we die
            try:
                yield
            finally:
                fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.engine.dispose()
        with self._turn_mutex:
            if self._turn_fd is not None:
                os.close(self._turn_fd)
                self._turn_fd = None

    def get_state(self, session: Session, key: str) -> str | None:
        row = session.get(GatewayStateRow, key)
        return row.value if row is not None else None

    def set_state(self, session: Session, key: str, value: str) -> None:
        row = session.get(GatewayStateRow, key)
        if row is None:
            session.add(GatewayStateRow(key=key, value=value))
        else:
            row.value = value


# The statements every stored frame's transaction runs, built once. Built per call (with
# the ORM's ``update(Device)``, which also synchronises the session), they cost about 1.1 ms
# of CPU a transaction more, in SQLAlchemy's statement construction, cache-key walk and ORM
# bookkeeping: a fifth of a single upload's CPU (benchmarks/results/intake_request_cost.md).
# Run on the session's connection: Core statements, no ORM state to keep.
_DEVICES, _FRAMES, _ERASURES = (Device.__table__, FrameRow.__table__,
                                FrameErasureRow.__table__)  # type: ignore[attr-defined]
_TOUCH_DEVICE = (update(_DEVICES).where(_DEVICES.c.device_id == bindparam("b_device_id"))
                 .values(last_seen_at=bindparam("b_seen_at")))
_ERASURES_OF_CAMERAS = select(
    _ERASURES.c.camera_id, _ERASURES.c.since, _ERASURES.c.covers_until, _ERASURES.c.erased_at,
).where(_ERASURES.c.camera_id.in_(bindparam("b_camera_ids", expanding=True)))
# INSERT ... ON CONFLICT DO NOTHING RETURNING, per dialect (SQLite's for any other)
_INSERT_NEW_FRAMES = {
    name: (dialect_insert(_FRAMES)
           .on_conflict_do_nothing(index_elements=["camera_id", "frame_id"])
           .returning(_FRAMES.c.camera_id, _FRAMES.c.frame_id))
    for name, dialect_insert in (("postgresql", postgresql_insert), ("sqlite", sqlite_insert))
}


def touch_device(session: Session, device_id: str, now: datetime) -> None:
    """Set the device's ``last_seen_at`` (a Core UPDATE: no ORM object is loaded or kept in
    sync)."""
    session.connection().execute(_TOUCH_DEVICE, {"b_device_id": device_id, "b_seen_at": now})


def insert_new_frames(session: Session, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Insert the ``frames`` rows whose ``(camera_id, frame_id)`` is not stored yet, in ONE
    statement (``INSERT ... ON CONFLICT DO NOTHING RETURNING``, SQLite ≥ 3.35 and
    PostgreSQL); returns the keys it inserted. A duplicate needs no SAVEPOINT and no retry
    row by row: under load every statement the group committer runs holds the database's
    one writer slot a little longer, and waits for the GIL between statements."""
    if not rows:
        return set()
    connection = session.connection()
    stmt = _INSERT_NEW_FRAMES.get(connection.dialect.name, _INSERT_NEW_FRAMES["sqlite"])
    return {(c, f) for c, f in connection.execute(stmt, rows)}


def stored_frame_paths(session: Session,
                       keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``(camera_id, frame_id) -> path`` of the ``frames`` rows among ``keys`` (queried
    per camera, 500 ids at a time)."""
    by_camera: dict[str, list[str]] = {}
    for camera_id, frame_id in keys:
        by_camera.setdefault(camera_id, []).append(frame_id)
    out: dict[tuple[str, str], str] = {}
    for camera_id, frame_ids in by_camera.items():
        for i in range(0, len(frame_ids), 500):
            out.update(((camera_id, f), p) for f, p in session.execute(
                select(FrameRow.frame_id, FrameRow.path).where(
                    FrameRow.camera_id == camera_id,
                    FrameRow.frame_id.in_(frame_ids[i:i + 500]))))
    return out


def database_unavailable(exc: BaseException) -> bool:
    """The database could not run a statement now — connection refused or lost, server
    shutting down, a lock or statement timeout, a deadlock, SQLite's ``database is locked``,
    no pool connection free — as opposed to refusing the data (``IntegrityError``,
    ``DataError``). Nothing about the request is wrong: answer 503, keep what was written,
    let the client retry. PostgreSQL's "program limit exceeded" (SQLSTATE class 54, an
    ``OperationalError`` in psycopg2) is the statement itself, not the server: excluded."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, OperationalError):
        code = getattr(exc.orig, "pgcode", None)
        return not (isinstance(code, str) and code.startswith("54"))
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def camera_lock_key(camera_id: str) -> int:
    """The PostgreSQL advisory lock key of one camera's frames (a signed 64-bit hash)."""
    digest = hashlib.blake2b(f"roadloop.frames:{camera_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_camera_frames(session: Session, camera_ids: Iterable[str], *,
                       exclusive: bool) -> None:
    """PostgreSQL: take the transaction-level advisory lock of each camera's frames (in key
    order), exclusive for an erasure writing its ``frame_erasures`` row, shared for a
    transaction inserting ``frames`` rows. An erasure so waits for the inserts in flight,
    and every insert after it sees its row. Every gateway process and replica takes the
    same locks. SQLite: nothing to take — write transactions begin with ``BEGIN IMMEDIATE``
    (``Database.write``), so they already run one at a time and see every earlier commit."""
    if session.get_bind().dialect.name != "postgresql":
        return
    take = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    for key in sorted({camera_lock_key(c) for c in camera_ids}):
        session.execute(text(f"SELECT {take}(:key)"), {"key": key})


def erased_frames(session: Session, frames: Iterable[tuple[str, str, datetime]],
                  ) -> dict[tuple[str, str, datetime], datetime]:
    """Of ``frames`` (``(camera_id, frame_id, captured_at)``), those an erasure covers
    (``frame_erasures``): ``(camera_id, frame_id, captured_at) -> erased_at`` — keyed by the
    capture time too, since two uploads of one frame id may claim different times and only
    the one inside the range is covered. Takes the cameras' shared locks first
    (``lock_camera_frames``), so call it in the transaction that inserts the rows, before
    inserting them. One indexed query for all the cameras."""
    by_camera: dict[str, list[tuple[str, datetime]]] = {}
    for camera_id, frame_id, captured_at in frames:
        by_camera.setdefault(camera_id, []).append((frame_id, captured_at))
    if not by_camera:
        return {}
    lock_camera_frames(session, by_camera, exclusive=False)
    erasures = session.connection().execute(
        _ERASURES_OF_CAMERAS, {"b_camera_ids": sorted(by_camera)}).all()
    out: dict[tuple[str, str, datetime], datetime] = {}
    for camera_id, since, covers_until, erased_at in erasures:
        for frame_id, captured_at in by_camera[camera_id]:
            if since <= captured_at < covers_until:
                out.setdefault((camera_id, frame_id, captured_at), erased_at)
    return out


def sqlite_path(url: str) -> Path | None:
    """File behind a ``sqlite:///...`` URL (None for in-memory)."""
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def _sqlite_engine(
    url: str, synchronous: str, busy_timeout_ms: int, pool_size: int, max_overflow: int
) -> Engine:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=60,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below): pysqlite's implicit transactions break
        # SAVEPOINTs and start writers as DEFERRED.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

    return engine
