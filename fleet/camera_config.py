"""Per-camera configuration: the platform changes one camera's settings while it runs.

Contract: ``docs/fleet-api.md`` → "Camera configuration". In short:

* ``PUT /v1/cameras/{camera_id}/config`` (``camera:admin``) replaces the camera's document
  (``fleet.camera_config_schemas.CameraConfig``) with optimistic concurrency: the body names
  the version it was based on (``expected_version``) and a stale one is a 409 carrying the
  current version. Writing the document that is already current changes nothing (no new
  version, not audited), so a retried PUT whose answer was lost is harmless. Every change is
  a new version in the history and a row in the audit log.
* ``GET /v1/cameras/{camera_id}/config`` — the camera's own device (``camera:write`` or
  ``camera:read``), or a reader/admin token. ETag + ``If-None-Match`` make an unchanged
  config a 304, so agents poll it after every heartbeat. A camera with no configuration
  answers 200 with version 0 and the empty document: agents need no special case.
* ``GET /v1/cameras/{camera_id}/config/history`` (``camera:read``; a device its own camera).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fleet.auth import AdminPrincipal, Principal, ReaderPrincipal, audit, client_address
from fleet.auth_first import AuthFirstRoute
from fleet.camera_config_schemas import (
    CameraConfigOut,
    CameraConfigPut,
    CameraConfigVersionOut,
    config_etag,
    document_sha256,
)
from fleet.db import CameraConfigRow, CameraConfigVersionRow
from fleet.rollouts import require_device_or_admin
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut
from roadloop.data.frame_records import FrameId

EMPTY_SHA256 = document_sha256({})
# A camera's agent holds camera:write (maybe camera:read): either reads its own camera's
# config; reader and admin tokens read any camera (resolved before the body, rate limited
# per device, like the manifest).
CameraReader = Annotated[Principal, Depends(require_device_or_admin(device_only=False))]
CameraIdPath = Annotated[FrameId, Path(description="The camera's id (as enrolled).")]
router = APIRouter(tags=["camera config"], route_class=AuthFirstRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 409: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


def _own_camera_only(principal: Principal, camera_id: str) -> None:
    if principal.device_id is not None and principal.camera_id != camera_id:
        raise HTTPException(403, f"this device may read camera {principal.camera_id}'s "
                                 "configuration only")


def _out(camera_id: str, row: CameraConfigRow | None, changed: bool | None = None
         ) -> CameraConfigOut:
    if row is None:
        return CameraConfigOut(camera_id=camera_id, version=0, sha256=EMPTY_SHA256, config={},
                               updated_at=None, updated_by=None, changed=changed)
    return CameraConfigOut(camera_id=camera_id, version=row.version, sha256=row.sha256,
                           config=row.document, updated_at=row.updated_at,
                           updated_by=row.updated_by, changed=changed)


def _etag_headers(out: CameraConfigOut) -> dict[str, str]:
    return {"ETag": config_etag(out.version, out.sha256), "Cache-Control": "no-cache"}


def current_config(gw: Gateway, camera_id: str) -> CameraConfigOut:
    with gw.db.read() as session:
        return _out(camera_id, session.get(CameraConfigRow, camera_id))


@router.put("/v1/cameras/{camera_id}/config", response_model=CameraConfigOut,
            responses=_ERRORS)
def put_camera_config(
    camera_id: CameraIdPath,
    body: CameraConfigPut,
    request: Request,
    principal: AdminPrincipal,
    gw: GatewayDep,
    response: Response,
) -> CameraConfigOut:
    """Replace the camera's configuration (a new version) unless it is already current."""
    document = body.config.canonical()
    sha = document_sha256(document)
    now = gw.now()
    with gw.db.write() as session:
        # FOR UPDATE: on Postgres two writers of one camera serialise here (SQLite's write
        # session already does); two first writes race to the primary key instead.
        row = session.scalar(select(CameraConfigRow)
                             .where(CameraConfigRow.camera_id == camera_id).with_for_update())
        current = row.version if row is not None else 0
        if (row.sha256 if row is not None else EMPTY_SHA256) == sha:
            out = _out(camera_id, row, changed=False)
            response.headers.update(_etag_headers(out))
            return out
        if body.expected_version is not None and body.expected_version != current:
            raise HTTPException(
                409, f"camera {camera_id} configuration is at version {current}, not "
                f"{body.expected_version}: GET it, apply your change to version {current} and "
                f"PUT again with expected_version {current}",
                headers={"ETag": config_etag(current, row.sha256 if row else EMPTY_SHA256)})
        version = current + 1
        if row is None:
            row = CameraConfigRow(camera_id=camera_id)
            session.add(row)
        row.version, row.document, row.sha256 = version, document, sha
        row.updated_at, row.updated_by = now, principal.actor
        session.add(CameraConfigVersionRow(
            camera_id=camera_id, version=version, document=document, sha256=sha,
            created_at=now, created_by=principal.actor, reason=body.reason))
        audit(session, now, "camera_config_changed", actor=principal.actor,
              token_id=principal.token_id, client=client_address(request),
              detail={"camera_id": camera_id, "from_version": current, "to_version": version,
                      "sha256": sha, "reason": body.reason})
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise HTTPException(
                409, f"camera {camera_id} configuration was changed by another writer at the "
                "same time: GET it and PUT again") from None
        out = _out(camera_id, row, changed=True)
    gw.stats.count("camera_config_changed")
    response.headers.update(_etag_headers(out))
    return out


@router.get("/v1/cameras/{camera_id}/config", response_model=CameraConfigOut,
            responses={**_ERRORS, 304: {"description": "unchanged (If-None-Match)"}})
def get_camera_config(
    camera_id: CameraIdPath, request: Request, principal: CameraReader, gw: GatewayDep
) -> Response:
    """The camera's current configuration (version 0 and ``{}`` when none was set)."""
    _own_camera_only(principal, camera_id)
    out = current_config(gw, camera_id)
    headers = _etag_headers(out)
    gw.stats.count("camera_config_polls")
    match = request.headers.get("if-none-match")
    if match and headers["ETag"] in [t.strip() for t in match.split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(content=out.model_dump_json(exclude={"changed"}), headers=headers,
                    media_type="application/json")


@router.get("/v1/cameras/{camera_id}/config/history",
            response_model=list[CameraConfigVersionOut], responses=_ERRORS)
def camera_config_history(
    camera_id: CameraIdPath,
    principal: ReaderPrincipal,
    gw: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CameraConfigVersionOut]:
    """Every version of the camera's configuration, newest first."""
    _own_camera_only(principal, camera_id)
    q = (select(CameraConfigVersionRow).where(CameraConfigVersionRow.camera_id == camera_id)
         .order_by(CameraConfigVersionRow.version.desc()).limit(limit))
    with gw.db.read() as session:
        return [CameraConfigVersionOut(camera_id=r.camera_id, version=r.version, sha256=r.sha256,
                                       config=r.document, created_at=r.created_at,
                                       created_by=r.created_by, reason=r.reason)
                for r in session.scalars(q)]
