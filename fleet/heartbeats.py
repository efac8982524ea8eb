"""Heartbeats: a per-camera time series of agent health, stored as JSON plus indexed numbers.

The gateway checks only the keys it needs (``schema_version``, ``camera_id``, ``sent_at``,
``model_version``) and keeps the whole payload, so the agent's schema
(``edge_agent.heartbeat.Heartbeat``) can grow without a gateway release. The numeric
columns are filled from the payload's keys when present (``fleet.schemas.HEARTBEAT_COLUMNS``,
which ``HeartbeatIn`` bounds to fit them).
A heartbeat re-sent with the same ``sent_at`` by the same device is acknowledged again
(202, ``duplicate: true``) and stored once.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet.auth import DevicePrincipal, ReaderPrincipal
from fleet.auth_first import AuthFirstRoute
from fleet.bounds import Id, Timestamp
from fleet.committer import CommitFailed
from fleet.db import Device, HeartbeatRow
from fleet.runtime import GatewayDep
from fleet.schemas import (
    HEARTBEAT_COLUMNS,
    ErrorOut,
    HeartbeatAccepted,
    HeartbeatIn,
    HeartbeatOut,
    dotted,
)


def numeric_columns(payload: dict[str, Any]) -> dict[str, float | int | None]:
    """Indexed numbers from a payload; missing, non-numeric or non-finite values are None."""
    out: dict[str, float | int | None] = {}
    for column, (keys, typ) in HEARTBEAT_COLUMNS.items():
        value = None
        for key in keys:
            v = dotted(payload, key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                value = typ(v)
                break
        out[column] = value
    return out


def heartbeat_out(r: HeartbeatRow) -> HeartbeatOut:
    return HeartbeatOut(
        id=r.id, camera_id=r.camera_id, device_id=r.device_id, sent_at=r.sent_at,
        received_at=r.received_at, schema_version=r.schema_version,
        model_version=r.model_version, fps=r.fps, latency_p50_ms=r.latency_p50_ms,
        latency_p95_ms=r.latency_p95_ms, errors=r.errors, dropped_frames=r.dropped_frames,
        outbox_depth=r.outbox_depth, payload=r.payload,
    )


router = APIRouter(tags=["heartbeats"], route_class=AuthFirstRoute)


@router.post(
    "/v1/heartbeats",
    status_code=202,
    response_model=HeartbeatAccepted,
    responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 413: {"model": ErrorOut},
               422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}},
)
def post_heartbeat(
    body: HeartbeatIn,
    principal: DevicePrincipal,
    gw: GatewayDep,
) -> HeartbeatAccepted:
    """Store one heartbeat of this device's camera (the token and the device's rate limit are
    checked before the body is read)."""
    if body.camera_id != principal.camera_id:
        raise HTTPException(
            403, f"heartbeat camera_id {body.camera_id} is not this device's camera "
            f"({principal.camera_id})"
        )
    payload = body.model_dump(mode="json")
    now = gw.now()
    device_id = principal.device_id
    assert device_id is not None

    def insert(session: Session) -> int:
        row = HeartbeatRow(
            camera_id=body.camera_id, device_id=device_id, sent_at=body.sent_at,
            received_at=now, schema_version=body.schema_version,
            model_version=body.model_version, payload=payload, **numeric_columns(payload),
        )
        session.add(row)
        session.flush()
        session.execute(
            update(Device).where(Device.device_id == device_id).values(last_seen_at=now)
        )
        return row.id

    try:
        hb_id = gw.committer.submit(insert)
    except IntegrityError:
        with gw.db.read() as session:
            hb_id = session.scalar(select(HeartbeatRow.id).where(
                HeartbeatRow.device_id == device_id, HeartbeatRow.sent_at == body.sent_at))
        if hb_id is None:  # pragma: no cover - constraint fired but row vanished
            raise HTTPException(503, "heartbeat could not be stored; retry") from None
        return HeartbeatAccepted(heartbeat_id=hb_id, duplicate=True)
    except (CommitFailed, TimeoutError) as exc:
        raise HTTPException(503, f"heartbeat not stored ({exc}); retry later") from exc
    gw.stats.count("heartbeats_stored")
    return HeartbeatAccepted(heartbeat_id=hb_id)


@router.get(
    "/v1/cameras/{camera_id}/heartbeats",
    response_model=list[HeartbeatOut],
    responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
def list_heartbeats(
    camera_id: Annotated[Id, Path()],
    principal: ReaderPrincipal,
    gw: GatewayDep,
    since: Annotated[Timestamp | None, Query(description="Only sent_at >= since.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[HeartbeatOut]:
    """Heartbeats of one camera in ``sent_at`` order: the first ``limit`` at or after
    ``since``, or the latest ``limit`` when ``since`` is absent. Devices see their own
    camera only."""
    if principal.device_id is not None and principal.camera_id != camera_id:
        raise HTTPException(403, f"this device may read camera {principal.camera_id} only")
    q = select(HeartbeatRow).where(HeartbeatRow.camera_id == camera_id)
    with gw.db.read() as session:
        if since is not None:
            rows = list(session.scalars(
                q.where(HeartbeatRow.sent_at >= since)
                .order_by(HeartbeatRow.sent_at, HeartbeatRow.id).limit(limit)))
        else:
            rows = list(session.scalars(
                q.order_by(HeartbeatRow.sent_at.desc(), HeartbeatRow.id.desc()).limit(limit)))
            rows.reverse()
        return [heartbeat_out(r) for r in rows]
