"""Operator routes (scope ``camera:admin``): devices, enrollment tokens, audit log, stats."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.auth import (
    AdminPrincipal,
    audit,
    client_address,
    create_enrollment_token,
    revoke_device,
)
from fleet.auth_first import AuthFirstRoute
from fleet.bounds import Action, Id, Timestamp
from fleet.db import AuditEvent, Device, DeviceStatus
from fleet.runtime import GatewayDep
from fleet.schemas import (
    AuditEventOut,
    DeviceOut,
    DeviceStatusUpdate,
    EnrollmentTokenCreate,
    EnrollmentTokenOut,
    ErrorOut,
)

DeviceIdPath = Annotated[Id, Path(description="A device id (GET /v1/devices lists them).")]
router = APIRouter(tags=["admin"], route_class=AuthFirstRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
    409: {"model": ErrorOut}, 422: {"model": ErrorOut},
}


def device_out(d: Device) -> DeviceOut:
    return DeviceOut(
        device_id=d.device_id,
        camera_id=d.camera_id,
        status=DeviceStatus(d.status),
        scopes=d.scope_list,
        agent_version=d.agent_version,
        hardware=d.hardware,
        enrolled_at=d.enrolled_at,
        updated_at=d.updated_at,
        last_seen_at=d.last_seen_at,
        revoked_at=d.revoked_at,
        status_reason=d.status_reason,
    )


def _device_or_404(session: Session, device_id: str) -> Device:
    """The device row, or an HTTP 404 that says where to find the ids."""
    device = session.get(Device, device_id)
    if device is None:
        raise HTTPException(404, f"no device {device_id} (GET /v1/devices lists them)")
    return device


@router.get("/v1/devices", response_model=list[DeviceOut], responses=_ERRORS)
def list_devices(
    _: AdminPrincipal,
    gw: GatewayDep,
    status: DeviceStatus | None = None,
    camera_id: Id | None = None,
) -> list[DeviceOut]:
    """All devices, oldest enrollment first (filter by ``status`` / ``camera_id``)."""
    q = select(Device).order_by(Device.enrolled_at, Device.device_id)
    if status is not None:
        q = q.where(Device.status == status.value)
    if camera_id is not None:
        q = q.where(Device.camera_id == camera_id)
    with gw.db.read() as session:
        return [device_out(d) for d in session.scalars(q)]


@router.post("/v1/devices/{device_id}/status", response_model=DeviceOut, responses=_ERRORS)
def set_device_status(
    device_id: DeviceIdPath,
    body: DeviceStatusUpdate,
    request: Request,
    principal: AdminPrincipal,
    gw: GatewayDep,
) -> DeviceOut:
    """Change a device's status (e.g. verify a pending device by setting it active)."""
    now = gw.now()
    with gw.db.write() as session:
        device = _device_or_404(session, device_id)
        if device.revoked_at is not None:
            raise HTTPException(
                409, f"device {device_id} was revoked; a revoked device cannot change status "
                "(enroll the camera again)"
            )
        old = device.status
        device.status = body.status.value
        device.status_reason = body.reason
        device.updated_at = now
        audit(session, now, "device_status_changed", actor=principal.actor, device_id=device_id,
              token_id=principal.token_id, client=client_address(request),
              detail={"from": old, "to": body.status.value, "reason": body.reason})
        session.commit()
        gw.auth_cache.forget_device(device_id)
        return device_out(device)


@router.post("/v1/devices/{device_id}/revoke", response_model=DeviceOut, responses=_ERRORS)
def revoke(
    device_id: DeviceIdPath,
    request: Request,
    principal: AdminPrincipal,
    gw: GatewayDep,
) -> DeviceOut:
    """Revoke a device and every token it holds (idempotent)."""
    now = gw.now()
    with gw.db.write() as session:
        device = _device_or_404(session, device_id)
        n = revoke_device(session, device, now)
        audit(session, now, "device_revoked", actor=principal.actor, device_id=device_id,
              token_id=principal.token_id, client=client_address(request),
              detail={"tokens_revoked": n})
        session.commit()
        gw.limiter.forget(device_id)
        gw.auth_cache.forget_device(device_id)  # refused at once here, elsewhere within the
        # principal cache bound (principal_cache_s)
        return device_out(device)


@router.post(
    "/v1/enrollment-tokens", status_code=201, response_model=EnrollmentTokenOut,
    responses=_ERRORS,
)
def new_enrollment_token(
    body: EnrollmentTokenCreate,
    request: Request,
    principal: AdminPrincipal,
    gw: GatewayDep,
) -> EnrollmentTokenOut:
    """Mint a one-time enrollment token (the HTTP twin of ``roadloop fleet token create``)."""
    now = gw.now()
    ttl = body.ttl_s or gw.settings.enrollment_token_ttl_s
    with gw.db.write() as session:
        try:
            token, row = create_enrollment_token(
                session, now, ttl_s=ttl, scopes=body.scopes, camera_id=body.camera_id,
                require_verification=body.require_verification, label=body.label,
                actor=principal.actor,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        session.commit()
        return EnrollmentTokenOut(
            enrollment_token=token, expires_at=row.expires_at, scopes=row.scope_list,
            camera_id=row.camera_id, require_verification=row.require_verification,
        )


@router.get("/v1/audit", response_model=list[AuditEventOut], responses=_ERRORS)
def audit_log(
    _: AdminPrincipal,
    gw: GatewayDep,
    since: Timestamp | None = None,
    action: Action | None = None,
    device_id: Id | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventOut]:
    """Audit events, newest first (refusals counted so far are written first, so the log is
    never behind: they are aggregated rows with ``detail.count``)."""
    gw.denials.flush()
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if since is not None:
        q = q.where(AuditEvent.at >= since)
    if action is not None:
        q = q.where(AuditEvent.action == action)
    if device_id is not None:
        q = q.where(AuditEvent.device_id == device_id)
    with gw.db.read() as session:
        return [
            AuditEventOut(
                id=e.id, at=e.at, action=e.action, outcome=e.outcome, actor=e.actor,
                device_id=e.device_id, token_id=e.token_id, client=e.client, detail=e.detail,
            )
            for e in session.scalars(q)
        ]


@router.get("/v1/stats", responses=_ERRORS)
def stats(
    _: AdminPrincipal, gw: GatewayDep
) -> dict[str, Any]:
    """Counters and per-stage timings since start (where intake time goes)."""
    snap = gw.stats.snapshot()
    snap["group_commit"] = {
        "batches": gw.committer.batches,
        "items": gw.committer.items,
        "mean_batch": round(gw.committer.items / gw.committer.batches, 2)
        if gw.committer.batches else 0.0,
    }
    snap["worker_pid"] = os.getpid()  # with --workers N: which process answered
    snap["as_of"] = datetime.now().astimezone().isoformat()
    return snap
