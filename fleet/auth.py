"""Credentials: hashed random tokens, enrollment, rotating refresh, scope checks, audit log.

Every token is ``secrets.token_urlsafe(32)`` (256 bits) and only its SHA-256 is stored, so
a leaked database grants nothing; a plain (unsalted) hash is enough for random secrets of
that size and keeps lookup a single indexed equality. There are no default credentials:
the first admin token comes from ``roadloop fleet admin-token create`` on the gateway host.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet.auth_first import (
    ADMIN_TOKEN,
    DEVICE_TOKEN,
    AuthFirstRoute,
    bearer_token,
    credential_exchange,
    early_dependency,
    route_path,
)
from fleet.config import SCOPES
from fleet.db import AuditEvent, Device, DeviceStatus, Token, TokenKind
from fleet.ratelimit import enforce_rate_limit
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import EnrollRequest, EnrollResponse, ErrorOut, RefreshRequest, TokenResponse

logger = logging.getLogger(__name__)

DEVICE_SCOPES = ("camera:read", "camera:write")
ADMIN_SCOPE = "camera:admin"


def new_token() -> str:
    # Never start with "-": a token is pasted into command lines (`--enroll-token TOKEN`),
    # where a leading dash reads as an option.
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def has_scope(scopes: frozenset[str] | set[str] | list[str], needed: str) -> bool:
    """``camera:admin`` implies ``camera:read``; nothing else is implied."""
    return needed in scopes or (needed == "camera:read" and ADMIN_SCOPE in scopes)


def check_scopes(scopes: list[str], allowed: tuple[str, ...] = DEVICE_SCOPES) -> list[str]:
    """Normalised scope list, or ``ValueError`` naming the unknown/forbidden ones."""
    out = sorted(set(scopes))
    if not out:
        raise ValueError("at least one scope is required")
    bad = [s for s in out if s not in allowed]
    if bad:
        hint = "" if all(s in SCOPES for s in bad) else f" (known scopes: {', '.join(SCOPES)})"
        raise ValueError(f"scope(s) {', '.join(bad)} not allowed here; use {allowed}{hint}")
    return out


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin token, or a device's access token."""

    token_id: int
    kind: str
    scopes: frozenset[str]
    device_id: str | None = None
    camera_id: str | None = None
    device_status: str | None = None
    expires_at: datetime | None = None  # the token's: a cached principal never outlives it

    @property
    def actor(self) -> str:
        return f"device:{self.device_id}" if self.device_id else f"admin-token:{self.token_id}"


# --------------------------------------------------------------------------- audit
def audit(
    session: Session,
    now: datetime,
    action: str,
    *,
    outcome: str = "ok",
    actor: str | None = None,
    device_id: str | None = None,
    token_id: int | None = None,
    client: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one audit event to ``session`` (committed with the action it records)."""
    session.add(
        AuditEvent(
            at=now,
            action=action,
            outcome=outcome,
            actor=actor,
            device_id=device_id,
            token_id=token_id,
            client=client,
            detail=detail,
        )
    )


def audit_denied(
    gw: Gateway,
    action: str,
    reason: str,
    *,
    client: str | None = None,
    device_id: str | None = None,
    token_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Count a refused attempt for the audit log: refusals are aggregated per (client,
    reason, route, token) and window into one row with a count (``fleet.denials``), so a
    flood costs no database write per request. ``detail["path"]`` names the route."""
    extra = dict(detail or {})
    route = extra.pop("path", None)
    gw.denials.record(action, reason, client=client, route=route, token_id=token_id,
                      device_id=device_id, detail=extra)
    gw.stats.count(f"denied_{action}")


def client_address(request: Request) -> str | None:
    """The caller's address for the audit log's ``client`` (None when the server has none)."""
    return request.client.host if request.client else None


# --------------------------------------------------------------------------- token minting
def _mint(
    session: Session,
    kind: TokenKind,
    now: datetime,
    ttl_s: int,
    scopes: list[str],
    *,
    device_id: str | None = None,
    camera_id: str | None = None,
    require_verification: bool = False,
    label: str | None = None,
    parent_id: int | None = None,
) -> tuple[str, Token]:
    token = new_token()
    row = Token(
        token_hash=hash_token(token),
        kind=kind.value,
        device_id=device_id,
        scopes=" ".join(scopes),
        camera_id=camera_id,
        require_verification=require_verification,
        label=label,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
        parent_id=parent_id,
    )
    session.add(row)
    session.flush()
    return token, row


def create_enrollment_token(
    session: Session,
    now: datetime,
    *,
    ttl_s: int,
    scopes: list[str] | None = None,
    camera_id: str | None = None,
    require_verification: bool = False,
    label: str | None = None,
    actor: str = "cli",
) -> tuple[str, Token]:
    """Mint a one-time enrollment token (caller commits). Raises ``ValueError`` on bad scopes;
    ``scopes=None`` means ``camera:write``, an empty list is refused (never a silent default)."""
    scope_list = check_scopes(["camera:write"] if scopes is None else scopes)
    token, row = _mint(
        session,
        TokenKind.enrollment,
        now,
        ttl_s,
        scope_list,
        camera_id=camera_id,
        require_verification=require_verification,
        label=label,
    )
    audit(
        session,
        now,
        "enrollment_token_created",
        actor=actor,
        token_id=row.id,
        detail={"scopes": scope_list, "camera_id": camera_id, "ttl_s": ttl_s,
                "require_verification": require_verification, "label": label},
    )
    return token, row


def create_admin_token(
    session: Session, now: datetime, *, ttl_s: int, label: str | None = None, actor: str = "cli"
) -> tuple[str, Token]:
    """Mint an operator access token with ``camera:admin`` (caller commits)."""
    token, row = _mint(session, TokenKind.admin, now, ttl_s, [ADMIN_SCOPE], label=label)
    audit(session, now, "admin_token_created", actor=actor, token_id=row.id,
          detail={"ttl_s": ttl_s, "label": label})
    return token, row


def revoke_admin_token(session: Session, token_id: int, now: datetime, *,
                       actor: str = "cli", reason: str | None = None) -> Token | None:
    """Revoke the admin token ``token_id`` (caller commits); None when there is no admin token
    of that id. Audited ``admin_token_revoked`` when it changes anything; revoking a revoked
    token again changes nothing. Admin routes look the token up on every request (no cached
    principal), so the next request with it gets 401 "admin token was revoked"."""
    tok = session.scalar(select(Token).where(Token.id == token_id,
                                             Token.kind == TokenKind.admin.value))
    if tok is None or tok.revoked_at is not None:
        return tok
    tok.revoked_at = now
    audit(session, now, "admin_token_revoked", actor=actor, token_id=tok.id,
          detail={"label": tok.label, "reason": reason})
    return tok


def revoke_device(session: Session, device: Device, now: datetime) -> int:
    """Mark the device revoked and inactive and revoke every token it holds; returns count."""
    device.revoked_at = device.revoked_at or now
    device.status = DeviceStatus.inactive.value
    device.updated_at = now
    result = session.execute(
        update(Token)
        .where(Token.device_id == device.device_id, Token.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount or 0)


# --------------------------------------------------------------------------- authentication
def authenticate(
    gw: Gateway,
    token: str | None,
    scope: str,
    *,
    device_only: bool = False,
    active_device: bool = False,
    client: str | None = None,
    path: str = "",
) -> Principal:
    """Resolve a bearer token to a ``Principal`` or raise 401/403 (and audit the refusal)."""

    def deny(status: int, reason: str, message: str, **kw: Any) -> HTTPException:
        audit_denied(gw, "auth_failure", reason, client=client, detail={"path": path}, **kw)
        headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else None
        return HTTPException(status_code=status, detail=message, headers=headers)

    if not token:
        raise deny(401, "missing_token",
                   "missing bearer token: send 'Authorization: Bearer <access token>' "
                   "(enroll with POST /v1/enroll to get one)")
    now = gw.now()
    with gw.db.read() as session:
        row = session.execute(
            select(Token, Device)
            .outerjoin(Device, Token.device_id == Device.device_id)
            .where(Token.token_hash == hash_token(token))
        ).first()
    if row is None:
        raise deny(401, "unknown_token", "unknown access token: enroll again or refresh your token")
    tok, device = row
    ids = {"token_id": tok.id, "device_id": tok.device_id}
    if tok.kind not in (TokenKind.access.value, TokenKind.admin.value):
        raise deny(401, f"wrong_kind:{tok.kind}",
                   f"this is a {tok.kind} token, not an access token: use the access_token "
                   "returned by /v1/enroll or /v1/token/refresh", **ids)
    if device is not None and device.revoked_at is not None:
        raise deny(401, "device_revoked",
                   f"device {device.device_id} was revoked: enroll again with a new "
                   "enrollment token", **ids)
    admin = tok.kind == TokenKind.admin.value  # no refresh token: an operator mints anew
    if tok.revoked_at is not None:
        raise deny(401, "token_revoked",
                   "admin token was revoked: create a new one with `roadloop fleet admin-token "
                   "create`" if admin else "access token was revoked: refresh it or enroll "
                   "again", **ids)
    if tok.expires_at <= now:
        raise deny(401, "token_expired",
                   f"{'admin' if admin else 'access'} token expired at "
                   f"{tok.expires_at.isoformat()}: "
                   + ("create a new one with `roadloop fleet admin-token create`" if admin
                      else "get a new one with POST /v1/token/refresh"), **ids)
    scopes = frozenset(tok.scope_list)
    if not has_scope(scopes, scope):
        raise deny(403, "missing_scope",
                   f"token lacks scope {scope} (it has: {', '.join(sorted(scopes))})", **ids)
    if (device_only or active_device) and device is None:
        raise deny(403, "not_a_device",
                   "this route is for enrolled devices: an admin token cannot post frames or "
                   "heartbeats", **ids)
    if active_device and device is not None and device.status != DeviceStatus.active.value:
        raise deny(403, f"device_{device.status}",
                   f"device {device.device_id} is {device.status}: only active devices may post "
                   "frames or heartbeats (ask an operator to set it active)", **ids)
    return Principal(
        token_id=tok.id,
        kind=tok.kind,
        scopes=scopes,
        device_id=device.device_id if device else None,
        camera_id=device.camera_id if device else None,
        device_status=device.status if device else None,
        expires_at=tok.expires_at,
    )


def require_scope(
    scope: str, *, device_only: bool = False, active_device: bool = False,
    rate_limited: bool = False,
) -> Callable[..., Any]:
    """Dependency factory: ``Depends(require_scope("camera:write", active_device=True))``.

    An ``early_dependency``: on an ``AuthFirstRoute`` it runs before the body is read, and
    so does the per-device rate limit when ``rate_limited``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    variant = ("scope", scope, device_only, active_device)

    def cache_ttl(gw: Gateway) -> float:
        """How long a principal stays cached: frames and heartbeats only."""
        return gw.settings.principal_cache_s if active_device else 0.0

    def resolve_from_memory(request: Request, gw: Gateway) -> Principal | None:
        """Frames and heartbeats of a principal cached less than ``principal_cache_s`` ago:
        the principal (its rate limit taken), without the thread pool; else None."""
        token = bearer_token(request)
        ttl = cache_ttl(gw)
        if not token or ttl <= 0:
            return None
        principal = gw.auth_cache.cached_principal(hash_token(token), variant, gw.now(), ttl)
        if principal is not None and rate_limited and principal.device_id is not None:
            enforce_rate_limit(gw, principal)
        return principal

    def resolve(request: Request, gw: Gateway) -> Principal:
        """From the database, in the thread pool, once ``resolve_from_memory`` found no
        cached principal (``fleet.auth_first._resolve`` tries it first); the principal is
        then cached for frames and heartbeats."""
        token = bearer_token(request)
        principal = authenticate(
            gw,
            token,
            scope,
            device_only=device_only,
            active_device=active_device,
            client=client_address(request),
            path=route_path(request),
        )
        if token and cache_ttl(gw) > 0:
            gw.auth_cache.remember_principal(hash_token(token), variant, principal)
        if rate_limited and principal.device_id is not None:
            enforce_rate_limit(gw, principal)
        return principal

    # Which tokens can hold the scope: admin tokens camera:admin (which implies camera:read),
    # device tokens camera:read / camera:write.
    if scope == ADMIN_SCOPE:
        schemes = (ADMIN_TOKEN,)
    elif scope == "camera:read" and not (device_only or active_device):
        schemes = (DEVICE_TOKEN, ADMIN_TOKEN)
    else:
        schemes = (DEVICE_TOKEN,)
    return early_dependency(resolve, f"require_{scope.replace(':', '_')}", schemes,
                            resolve_from_memory=resolve_from_memory if active_device else None)


AdminPrincipal = Annotated[Principal, Depends(require_scope(ADMIN_SCOPE))]
# Frames and heartbeats: an active device, within its rate limit (both before the body).
DevicePrincipal = Annotated[
    Principal, Depends(require_scope("camera:write", active_device=True, rate_limited=True))
]
ReaderPrincipal = Annotated[Principal, Depends(require_scope("camera:read"))]


def token_exists(gw: Gateway, token: str, kind: TokenKind) -> bool:
    """Whether a token of ``kind`` with this hash is stored, from a read: a made-up token is
    refused without the write lock that the exchange takes (on SQLite, BEGIN IMMEDIATE —
    the lock every frame commit waits on)."""
    with gw.db.read() as session:
        return session.scalar(select(Token.id).where(
            Token.token_hash == hash_token(token), Token.kind == kind.value)) is not None


# --------------------------------------------------------------------------- routes
router = APIRouter(tags=["enrollment"], route_class=AuthFirstRoute)
UNKNOWN_ENROLLMENT_TOKEN = ("unknown enrollment token: ask an operator for one "
                            "(roadloop fleet token create)")
UNKNOWN_REFRESH_TOKEN = "unknown refresh token: enroll again"
INVALID_TOKEN_HEADERS = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 409: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


# The credential is in the body: no bearer token (explicitly public in OpenAPI).
@router.post("/v1/enroll", status_code=201, response_model=EnrollResponse, responses=_ERRORS,
             openapi_extra={"security": []})
@credential_exchange
def enroll(
    body: EnrollRequest, request: Request, gw: GatewayDep
) -> EnrollResponse:
    """Exchange a one-time enrollment token for a device identity and tokens."""
    now = gw.now()
    client = client_address(request)
    s = gw.settings
    failure: tuple[int, str, str, dict[str, Any]] | None = None
    if not token_exists(gw, body.enrollment_token, TokenKind.enrollment):
        audit_denied(gw, "enroll", "unknown_token", client=client,
                     detail={"camera_id": body.camera_id})
        raise HTTPException(401, UNKNOWN_ENROLLMENT_TOKEN)
    with gw.db.write() as session:
        # FOR UPDATE: on Postgres two concurrent enrollments with one token serialise here
        # (SQLite's BEGIN IMMEDIATE write session already does; SQLite ignores the clause).
        tok = session.scalar(
            select(Token).where(
                Token.token_hash == hash_token(body.enrollment_token),
                Token.kind == TokenKind.enrollment.value,
            ).with_for_update()
        )
        if tok is None:
            failure = (401, "unknown_token", UNKNOWN_ENROLLMENT_TOKEN, {})
        elif tok.used_at is not None:
            failure = (401, "token_reused", ("enrollment token was already used: each token "
                       "enrolls one device; ask an operator for a new one"), {"token_id": tok.id})
        elif tok.revoked_at is not None:
            failure = (401, "token_revoked", "enrollment token was revoked", {"token_id": tok.id})
        elif tok.expires_at <= now:
            failure = (401, "token_expired", (f"enrollment token expired at "
                       f"{tok.expires_at.isoformat()}: ask an operator for a new one"),
                       {"token_id": tok.id})
        elif tok.camera_id is not None and tok.camera_id != body.camera_id:
            failure = (403, "camera_mismatch", (f"enrollment token is for camera {tok.camera_id}, "
                       f"not {body.camera_id}"), {"token_id": tok.id})
        else:
            holder = session.scalar(
                select(Device).where(
                    Device.camera_id == body.camera_id, Device.revoked_at.is_(None)
                )
            )
            if holder is not None:
                failure = (409, "camera_taken", (f"camera {body.camera_id} is already enrolled as "
                           f"device {holder.device_id}: revoke that device first "
                           f"(POST /v1/devices/{holder.device_id}/revoke)"),
                           {"token_id": tok.id, "device_id": holder.device_id})
        if failure is None:
            assert tok is not None
            tok.used_at = now
            status = (DeviceStatus.pending_verification if tok.require_verification
                      else DeviceStatus.active)
            device = Device(
                device_id=f"dev-{secrets.token_hex(8)}",
                camera_id=body.camera_id,
                status=status.value,
                scopes=tok.scopes,
                agent_version=body.agent_version,
                hardware=body.hardware,
                enrolled_at=now,
                updated_at=now,
            )
            session.add(device)
            token_id = tok.id
            try:
                session.flush()
            except IntegrityError:  # another enrollment of this camera won the race
                session.rollback()  # the token stays unused
                failure = (409, "camera_taken", (f"camera {body.camera_id} was just enrolled by "
                           "another device: revoke that device first"), {"token_id": token_id})
        if failure is None:
            access, _ = _mint(session, TokenKind.access, now, s.access_token_ttl_s,
                              tok.scope_list, device_id=device.device_id)
            refresh, _ = _mint(session, TokenKind.refresh, now, s.refresh_token_ttl_s,
                               tok.scope_list, device_id=device.device_id)
            audit(session, now, "enrolled", actor=f"device:{device.device_id}",
                  device_id=device.device_id, token_id=tok.id, client=client,
                  detail={"camera_id": body.camera_id, "agent_version": body.agent_version,
                          "status": status.value})
            session.commit()
            gw.stats.count("enrolled")
            return EnrollResponse(
                device_id=device.device_id,
                access_token=access,
                refresh_token=refresh,
                expires_in=s.access_token_ttl_s,
                scopes=tok.scope_list,
                model_public_key=gw.model_key.get_or_none(),
            )
    code, reason, message, ids = failure
    audit_denied(gw, "enroll", reason, client=client,
                 detail={"camera_id": body.camera_id}, **ids)
    raise HTTPException(status_code=code, detail=message)


@router.post("/v1/token/refresh", response_model=TokenResponse, responses=_ERRORS,
             openapi_extra={"security": []})
@credential_exchange
def refresh(
    body: RefreshRequest, request: Request, gw: GatewayDep
) -> TokenResponse:
    """Trade a refresh token for a new access + refresh pair; the old refresh token dies.

    A rotated refresh token presented again means two parties hold the family (a copied
    token): the whole family is revoked — the device and every token issued since its
    enrollment — so neither keeps access; the device enrolls again with a new enrollment
    token (RFC 9700, refresh token reuse detection)."""
    now = gw.now()
    client = client_address(request)
    s = gw.settings
    failure: tuple[str, str, dict[str, Any]] | None = None
    family_revoked = False
    if not token_exists(gw, body.refresh_token, TokenKind.refresh):
        audit_denied(gw, "token_refresh", "unknown_token", client=client)
        raise HTTPException(401, UNKNOWN_REFRESH_TOKEN, headers=INVALID_TOKEN_HEADERS)
    with gw.db.write() as session:
        tok = session.scalar(  # FOR UPDATE: one refresh token rotates once (see enroll)
            select(Token).where(
                Token.token_hash == hash_token(body.refresh_token),
                Token.kind == TokenKind.refresh.value,
            ).with_for_update()
        )
        device = session.get(Device, tok.device_id) if tok is not None and tok.device_id else None
        if tok is None or device is None:
            failure = ("unknown_token", UNKNOWN_REFRESH_TOKEN, {})
        elif device.revoked_at is not None:
            failure = ("device_revoked", (f"device {device.device_id} was revoked: enroll again "
                       "with a new enrollment token"),
                       {"token_id": tok.id, "device_id": device.device_id})
        elif tok.used_at is not None:
            n = revoke_device(session, device, now)
            audit(session, now, "token_family_revoked", outcome="denied",
                  actor=f"device:{device.device_id}", device_id=device.device_id,
                  token_id=tok.id, client=client,
                  detail={"reason": "refresh_reused", "tokens_revoked": n})
            session.commit()
            family_revoked = True
            failure = ("refresh_reused", (f"refresh token was already used: a rotated refresh "
                       f"token presented again means it was copied, so device "
                       f"{device.device_id} and all its tokens are now revoked; enroll again "
                       "with a new enrollment token"),
                       {"token_id": tok.id, "device_id": device.device_id})
        elif tok.revoked_at is not None:
            failure = ("token_revoked", "refresh token was revoked: enroll again",
                       {"token_id": tok.id, "device_id": device.device_id})
        elif tok.expires_at <= now:
            failure = ("token_expired", (f"refresh token expired at {tok.expires_at.isoformat()}:"
                       " enroll again"), {"token_id": tok.id, "device_id": device.device_id})
        if failure is None:
            assert tok is not None and device is not None
            tok.used_at = now
            tok.revoked_at = now
            access, _ = _mint(session, TokenKind.access, now, s.access_token_ttl_s,
                              tok.scope_list, device_id=device.device_id, parent_id=tok.id)
            new_refresh, _ = _mint(session, TokenKind.refresh, now, s.refresh_token_ttl_s,
                                   tok.scope_list, device_id=device.device_id, parent_id=tok.id)
            audit(session, now, "token_refreshed", actor=f"device:{device.device_id}",
                  device_id=device.device_id, token_id=tok.id, client=client)
            session.commit()
            return TokenResponse(access_token=access, refresh_token=new_refresh,
                                 expires_in=s.access_token_ttl_s)
    reason, message, ids = failure
    if family_revoked:
        gw.limiter.forget(ids["device_id"])
        gw.auth_cache.forget_device(ids["device_id"])
    audit_denied(gw, "token_refresh", reason, client=client, **ids)
    raise HTTPException(status_code=401, detail=message,
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
