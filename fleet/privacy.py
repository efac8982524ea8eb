"""Retention and erasure on the gateway (scope ``camera:admin``; docs/retention.md).

The platform (``roadloop.retention``, run by Dagster or ``roadloop privacy erase``) decides
what goes; these routes delete the gateway's own copies: ``frames`` rows and their files in
the gateway's frame store, heartbeats and traffic interval records. Files go before rows,
so a restart's reconcile (``fleet.reconcile``) never brings a deleted frame's row back.
An erasure also walks the camera's files in the store: a frame written just before a crash
has files but no row yet, and the reconcile would otherwise give it one after the erasure.
Every call is audited.

An erasure first commits its ``frame_erasures`` row (``FrameErasureRow``), on PostgreSQL
under the camera's exclusive advisory lock (``fleet.db.lock_camera_frames``), and only then
lists and deletes. Every ``frames`` insert takes that lock shared and looks for such rows in
its own transaction (``fleet.db.erased_frames``; on SQLite write transactions run one at a
time), so whichever gateway process or replica an upload runs in: a row committed before
the erasure's is deleted by it, and an insert after it refuses the frame (410, its files
removed). The start-up reconciles insert their rows the same way. The erased range stays
erased: a late upload of one of its frames is refused too (``docs/retention.md``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fleet.auth import AdminPrincipal, audit, client_address
from fleet.auth_first import AuthFirstRoute
from fleet.bounds import CLOCK_SKEW, Id, Timestamp
from fleet.db import (
    Device,
    FrameErasureRow,
    FrameRow,
    HeartbeatRow,
    TrafficEventRow,
    TrafficIntervalRow,
    TrafficLineCountRow,
    TrafficZoneStatRow,
    lock_camera_frames,
)
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut
from roadloop.data.frame_records import StoredFrame, in_window
from roadloop.retention.leftovers import select_leftovers

logger = logging.getLogger(__name__)
router = APIRouter(tags=["privacy"], route_class=AuthFirstRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}
MAX_FRAMES = 1000


class EraseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo is a 422, not a no-op

    camera_id: Id
    since: Timestamp
    until: Timestamp

    @model_validator(mode="after")
    def _range(self) -> EraseRequest:
        if self.until <= self.since:
            raise ValueError("empty or inverted range: until must be after since")
        return self


class EraseOut(BaseModel):
    camera_id: str
    since: datetime
    until: datetime
    frames_deleted: int = Field(description="Frames removed: rows, and files without a row.")
    bytes_deleted: int
    files_without_row: int = Field(
        default=0, description="Of frames_deleted, frames found in the store with no row "
        "(written just before a crash; a restart's reconcile would have recorded them).")


class FrameKey(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo is a 422, not a no-op

    camera_id: Id
    frame_id: Id


class ExpireRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo is a 422, not a no-op

    frames: list[FrameKey] = Field(default_factory=list, max_length=MAX_FRAMES,
                                   description="Frames the platform expired (its policy).")
    heartbeats_before: Timestamp | None = None
    traffic_before: Timestamp | None = None


class ExpireOut(BaseModel):
    frames_deleted: int
    bytes_deleted: int
    heartbeats_deleted: int
    traffic_records_deleted: int


def _held_bytes(gw: Gateway, rows: list[FrameRow]) -> dict[str, int]:
    """``{row.path: bytes}`` of the rows whose frame the store holds: image + record as
    stored, from one size listing of each ``<camera>/<day>/`` folder the rows name
    (``FrameStorage.day_sizes``: no record or image is read, and on the object store none is
    downloaded). The gateway's own paths are cache paths on the object store: a copy there
    says nothing about the bucket. A row whose files are gone (the platform's retention
    deleted them from a shared store first) is not in it: this call freed nothing of it."""
    folders = {(row.camera_id, Path(row.path).parent.name) for row in rows}
    held: dict[str, int] = {}
    for camera, day in sorted(folders):
        for frame_id, size in gw.store.day_sizes(camera, day).items():
            held[f"{camera}/{day}/{frame_id}.jpg"] = size
    return held


def _relative(gw: Gateway, frame: StoredFrame) -> str:
    """A listed frame's image path relative to the store: what ``FrameRow.path`` holds."""
    return frame.image.relative_to(gw.store.root).as_posix()


def _drop_frames(gw: Gateway, session: Session, rows: list[FrameRow]) -> int:
    """Delete the rows' files (sidecar, then image), then the rows; returns the bytes the
    store held for them (``_held_bytes``)."""
    held = _held_bytes(gw, rows)
    freed = 0
    for row in rows:
        freed += held.get(Path(row.path).as_posix(), 0)
        gw.store.remove_frame(gw.store.root / Path(row.path))
    for row in rows:
        session.delete(row)
    return freed


def _drop_stored_files(gw: Gateway, camera_id: str, since: datetime,
                       until: datetime) -> dict[str, StoredFrame]:
    """Delete every frame of ``camera_id`` in ``[since, until)`` that the frame store holds,
    row or no row, from its listing (``FrameStorage.stored_frames``: no image is read, and
    on the object store none is downloaded; sizes are image + record as stored): the
    readable frames captured in the range, and the unreadable ones (an image without its
    record, a record without its image, a record that does not parse) whose UTC day folder
    overlaps it, as the platform's erasure takes them (``roadloop.retention.leftovers``: a
    privacy request errs toward deleting). Returns what it deleted, by image path relative
    to the store (``FrameRow.path``). Called after the erasure's ``frame_erasures`` row is
    committed: an upload of one of these frames in flight then either committed its row
    before (the erasure deletes the row next) or has its insert refused (it removes its own
    files too), in this process or any other."""
    listed = gw.store.stored_frames(camera_id, start=since, end=until)
    chosen = [f for f in listed if f.record is not None and in_window(f.record, since, until)]
    leftovers = {left.image for left in select_leftovers(listed, start=since, end=until)}
    chosen += [f for f in listed if f.image in leftovers]
    deleted: dict[str, StoredFrame] = {}
    for f in chosen:
        if f.record is None:
            logger.warning("erasure of %s: deleting unreadable frame %s (day %s)", camera_id,
                           f.image, f.day)
        gw.store.remove_frame(f.image)  # the object store's cached copy goes too
        deleted[_relative(gw, f)] = f
    return deleted


def _record_erasure(gw: Gateway, body: EraseRequest, now: datetime, actor: str | None,
                    ) -> datetime:
    """Commit the erasure's ``frame_erasures`` row, on PostgreSQL under the camera's
    exclusive lock (it waits for the ``frames`` inserts in flight); returns the end of the
    capture times it covers: ``until``, cut at ``CLOCK_SKEW`` past the later of the
    gateway's clock and the wall clock — no upload can carry a later capture time before
    then (``fleet.bounds.EventTime``), and a range reaching into the future must not refuse
    the camera's new frames for good."""
    covers_until = min(body.until, max(now, datetime.now(UTC)) + CLOCK_SKEW)
    with gw.db.write() as session:
        lock_camera_frames(session, [body.camera_id], exclusive=True)
        session.add(FrameErasureRow(camera_id=body.camera_id, since=body.since,
                                    until=body.until, covers_until=covers_until,
                                    erased_at=now, erased_by=actor))
        session.commit()
    return covers_until


@router.post("/v1/privacy/erase", response_model=EraseOut, responses=_ERRORS)
def erase_frames(body: EraseRequest, request: Request, principal: AdminPrincipal,
                 gw: GatewayDep) -> EraseOut:
    """Delete every frame of ``camera_id`` captured in ``[since, until)``: the files the
    frame store holds (also those of a frame whose row a crash never committed), then the
    rows. The range stays erased: a frame of it uploaded later, or in flight meanwhile on
    any gateway, is refused (410). 404 when the gateway never knew the camera (no device,
    no frame); nothing is deleted."""
    now = gw.now()
    with gw.db.read() as session:
        known = session.scalar(select(Device.device_id).where(
            Device.camera_id == body.camera_id).limit(1)) or session.scalar(
            select(FrameRow.id).where(FrameRow.camera_id == body.camera_id).limit(1))
    if known is None:
        raise HTTPException(404, f"unknown camera {body.camera_id!r}: no device was ever "
                            "enrolled for it and it has no frames (GET /v1/devices lists "
                            "them); nothing deleted")
    # What is deleted is what the erasure record covers: a frame the erasure deletes can
    # never be acknowledged afterwards. Later capture times cannot be stored yet.
    end = _record_erasure(gw, body, now, principal.actor)
    files = _drop_stored_files(gw, body.camera_id, body.since, end)
    with gw.db.write() as session:
        rows = list(session.scalars(select(FrameRow).where(
            FrameRow.camera_id == body.camera_id, FrameRow.captured_at >= body.since,
            FrameRow.captured_at < end)))
        for row in rows:  # files the listing did not show (gone already): a no-op delete,
            if Path(row.path).as_posix() not in files:  # and the gateway's cached copy
                gw.store.remove_frame(gw.store.root / Path(row.path))
            session.delete(row)
        freed = sum(f.size_bytes for f in files.values())
        without_row = len({f.frame_id for f in files.values()} - {r.frame_id for r in rows})
        audit(session, now, "frames_erased", actor=principal.actor,
              token_id=principal.token_id, client=client_address(request),
              detail={"camera_id": body.camera_id, "since": body.since.isoformat(),
                      "until": body.until.isoformat(), "frames": len(rows) + without_row,
                      "files_without_row": without_row,
                      "unreadable_files": sum(f.record is None for f in files.values()),
                      "refuses_captured_before": end.isoformat()})
        session.commit()
    return EraseOut(camera_id=body.camera_id, since=body.since, until=body.until,
                    frames_deleted=len(rows) + without_row, bytes_deleted=freed,
                    files_without_row=without_row)


@router.post("/v1/privacy/expire", response_model=ExpireOut, responses=_ERRORS)
def expire(body: ExpireRequest, request: Request, principal: AdminPrincipal,
           gw: GatewayDep) -> ExpireOut:
    """Delete what retention expired: the listed frames (rows and files), heartbeats sent
    before ``heartbeats_before`` and traffic records starting before ``traffic_before``."""
    now = gw.now()
    with gw.db.write() as session:
        rows: list[FrameRow] = []
        by_camera: dict[str, list[str]] = {}
        for key in body.frames:
            by_camera.setdefault(key.camera_id, []).append(key.frame_id)
        for camera, ids in by_camera.items():
            rows += list(session.scalars(select(FrameRow).where(
                FrameRow.camera_id == camera, FrameRow.frame_id.in_(ids))))
        freed = _drop_frames(gw, session, rows)
        heartbeats = traffic = 0
        if body.heartbeats_before is not None:
            heartbeats = session.execute(delete(HeartbeatRow).where(
                HeartbeatRow.sent_at < body.heartbeats_before)).rowcount or 0
        if body.traffic_before is not None:
            old = select(TrafficIntervalRow.record_id).where(
                TrafficIntervalRow.interval_start < body.traffic_before)
            for child in (TrafficLineCountRow, TrafficZoneStatRow, TrafficEventRow):
                session.execute(delete(child).where(child.record_id.in_(old)))
            traffic = session.execute(delete(TrafficIntervalRow).where(
                TrafficIntervalRow.interval_start < body.traffic_before)).rowcount or 0
        out = ExpireOut(frames_deleted=len(rows), bytes_deleted=freed,
                        heartbeats_deleted=heartbeats, traffic_records_deleted=traffic)
        audit(session, now, "retention_applied", actor=principal.actor,
              token_id=principal.token_id, client=client_address(request),
              detail={**out.model_dump(),
                      "heartbeats_before": body.heartbeats_before.isoformat()
                      if body.heartbeats_before else None,
                      "traffic_before": body.traffic_before.isoformat()
                      if body.traffic_before else None})
        session.commit()
    return out
