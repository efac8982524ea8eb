"""Traffic analytics: agents post interval records; operators query them.

Contract: ``docs/fleet-api.md`` → "Traffic analytics". In short:

* ``POST /v1/traffic/intervals`` (device token, like heartbeats: the token and the device's
  rate limit before the body) stores one record of the device's own camera (403 otherwise):
  the record as posted plus its line, zone and event rows, all in one transaction (one
  savepoint of the group commit), so a record is stored whole or not at all. 201; the same
  ``record_id`` again is a 409 (the agent treats it as acknowledged), so a resend never
  counts twice.
* ``GET /v1/traffic/intervals`` (``camera:admin``): the records as posted, in
  ``(interval_start, record_id)`` order, paginated by an opaque keyset cursor.
* ``GET /v1/traffic/counts|zones|events`` (``camera:admin``): see ``fleet.traffic_queries``.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet.auth import AdminPrincipal, DevicePrincipal
from fleet.auth_first import AuthFirstRoute
from fleet.bounds import EARLIEST, LATEST, Timestamp, text_problem
from fleet.committer import CommitFailed
from fleet.db import (
    Device,
    TrafficEventRow,
    TrafficIntervalRow,
    TrafficLineCountRow,
    TrafficZoneStatRow,
)
from fleet.runtime import GatewayDep
from fleet.schemas import ErrorOut
from fleet.traffic_schemas import (
    TrafficIntervalIn,
    TrafficIntervalOut,
    TrafficIntervalPage,
    TrafficIntervalStored,
)
from roadloop.data.frame_records import FrameId

router = APIRouter(tags=["traffic"], route_class=AuthFirstRoute)
READ_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 422: {"model": ErrorOut}}

CameraQuery = Annotated[FrameId | None, Query(description="Only this camera.")]
SinceQuery = Annotated[Timestamp | None, Query(description="Only interval_start >= since.")]
UntilQuery = Annotated[Timestamp | None, Query(description="Only interval_start < until.")]


def record_rows(record: TrafficIntervalIn, device_id: str | None, received_at: datetime
                ) -> list[Any]:
    """The interval row and its line, zone and event rows (the record's whole storage)."""
    document = record.model_dump(mode="json")
    common = {"record_id": record.record_id, "camera_id": record.camera_id,
              "interval_start": record.interval_start}
    rows: list[Any] = [TrafficIntervalRow(
        **common, device_id=device_id, interval_s=record.interval_s,
        covered_s=record.covered_s, frames=record.frames, config_version=record.config_version,
        model_version=record.model_version, received_at=received_at, document=document)]
    rows += [TrafficLineCountRow(**common, interval_s=record.interval_s, line=r.line,
                                 direction=r.direction, class_name=r.class_name, count=r.count,
                                 pcu=r.pcu, speeds_kmh=list(r.speeds_kmh))
             for r in record.lines]
    rows += [TrafficZoneStatRow(**common, interval_s=record.interval_s,
                                covered_s=record.covered_s, zone=z.zone, state=z.state,
                                stats=doc)
             for z, doc in zip(record.zones, document["zones"], strict=True)]
    rows += [TrafficEventRow(**common, event_id=e.event_id, kind=e.kind, at=e.at, zone=e.zone,
                             line=e.line, event=doc)
             for e, doc in zip(record.events, document["events"], strict=True)]
    return rows


@router.post(
    "/v1/traffic/intervals",
    status_code=201,
    response_model=TrafficIntervalStored,
    responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut},
               409: {"model": ErrorOut, "description": "Already stored: treat as acknowledged."},
               413: {"model": ErrorOut}, 422: {"model": ErrorOut}, 429: {"model": ErrorOut},
               503: {"model": ErrorOut, "description": "Not stored; retry later."}},
)
def post_traffic_interval(
    body: TrafficIntervalIn, principal: DevicePrincipal, gw: GatewayDep
) -> TrafficIntervalStored:
    """Store one traffic interval record of this device's camera; idempotent by
    ``record_id`` (201, then 409)."""
    if body.camera_id != principal.camera_id:
        raise HTTPException(
            403, f"traffic record camera_id {body.camera_id} is not this device's camera "
            f"({principal.camera_id}); a device posts records of its enrolled camera only")
    now = gw.now()
    device_id = principal.device_id

    def insert(session: Session) -> None:
        parent, *children = record_rows(body, device_id, now)
        session.add(parent)
        session.flush()  # the primary key first: a duplicate fails before its rows are built
        session.add_all(children)
        session.flush()
        session.execute(update(Device).where(Device.device_id == device_id)
                        .values(last_seen_at=now))

    try:
        gw.committer.submit(insert)
    except IntegrityError as exc:
        with gw.db.read() as session:
            known = session.get(TrafficIntervalRow, body.record_id) is not None
        if not known:  # pragma: no cover - a constraint other than the record id
            raise HTTPException(503, f"traffic record {body.record_id} not stored; retry "
                                "later") from exc
        gw.stats.count("traffic_records_duplicate")
        raise HTTPException(409, f"traffic record {body.record_id} already stored") from None
    except (CommitFailed, TimeoutError) as exc:
        raise HTTPException(503, f"traffic record {body.record_id} not stored ({exc}); retry "
                            "later — it is not acknowledged") from exc
    gw.stats.count("traffic_records_stored")
    gw.metrics.traffic_records.inc()
    return TrafficIntervalStored(record_id=body.record_id)


# --------------------------------------------------------------------------- raw records
def encode_cursor(start: datetime, record_id: str) -> str:
    raw = f"{start.isoformat()}|{record_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(interval_start, record_id)`` of a cursor ``encode_cursor`` made; else a 422. A record
    id with a NUL is refused here: PostgreSQL refuses it as a parameter (a 500, where SQLite
    answered an empty page)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        start, record_id = raw.split("|", 1)
        at = datetime.fromisoformat(start)
        if at.tzinfo is None or not record_id or not EARLIEST <= at < LATEST:
            raise ValueError("not a cursor")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(422, "cursor is not one this gateway gave out: pass next_cursor "
                            "of the previous page unchanged") from None
    problem = text_problem(record_id)
    if problem is not None:
        raise HTTPException(422, f"cursor is not one this gateway gave out: its record id "
                            f"{problem}; pass next_cursor of the previous page unchanged")
    return at, record_id


@router.get("/v1/traffic/intervals", response_model=TrafficIntervalPage, responses=READ_ERRORS)
def list_traffic_intervals(
    principal: AdminPrincipal,
    gw: GatewayDep,
    camera_id: CameraQuery = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=400,
                                        description="next_cursor of the previous page.")] = None,
) -> TrafficIntervalPage:
    """Stored traffic records as posted (plus ``received_at``), ordered by
    ``(interval_start, record_id)``."""
    t = TrafficIntervalRow
    q = select(t)
    if camera_id is not None:
        q = q.where(t.camera_id == camera_id)
    if since is not None:
        q = q.where(t.interval_start >= since)
    if until is not None:
        q = q.where(t.interval_start < until)
    if cursor is not None:
        at, last = decode_cursor(cursor)
        q = q.where(or_(t.interval_start > at, and_(t.interval_start == at, t.record_id > last)))
    q = q.order_by(t.interval_start, t.record_id).limit(limit + 1)
    with gw.db.read() as session:
        rows = list(session.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    items = [TrafficIntervalOut(**{**r.document, "received_at": r.received_at}) for r in rows]
    next_cursor = encode_cursor(rows[-1].interval_start, rows[-1].record_id) if more else None
    return TrafficIntervalPage(items=items, next_cursor=next_cursor)
