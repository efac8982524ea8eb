"""The fleet gateway's operator API over HTTP, without Dagster: the token, one request with
its errors, and the calls that more than one caller makes (``resources.FleetResource`` for
Dagster, ``roadloop privacy erase`` from the command line).

Calls use an operator token (``camera:admin``): the one given, else
``$ROADLOOP_FLEET_ADMIN_TOKEN``, else the first line of the token file (default
``<home>/fleet/admin-token``; ``roadloop fleet admin-token create`` writes one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ADMIN_TOKEN_ENV = "ROADLOOP_FLEET_ADMIN_TOKEN"


class FleetError(RuntimeError):
    """The gateway answered with an error; the message carries its ``detail``."""


class FleetUnavailable(FleetError):
    """The gateway could not be reached at all."""


class FleetConflict(FleetError):
    """409: the change was based on something that changed meanwhile (a stale version)."""


@dataclass(frozen=True)
class FleetAdmin:
    """One gateway, called with an operator token."""

    gateway_url: str
    token: str | None = None
    token_file: Path | None = None  # default: <home>/fleet/admin-token
    timeout_s: float = 60.0

    def admin_token(self) -> str:
        if self.token:
            return self.token
        if os.environ.get(ADMIN_TOKEN_ENV):
            return os.environ[ADMIN_TOKEN_ENV]
        path = self.token_file
        if path is None:
            from roadloop.settings import get_settings

            path = get_settings().home / "fleet" / "admin-token"
        text = path.read_text().strip() if path.is_file() else ""
        if not text:
            raise FleetError(f"no fleet admin token: set {ADMIN_TOKEN_ENV} or write one to {path} "
                             "(roadloop fleet admin-token create)")
        return text.splitlines()[0]

    def request(self, method: str, path: str, *,
                expect: type | tuple[type, ...] = (dict, list),
                **kw: Any) -> dict[str, Any] | list[Any]:
        """The gateway's JSON answer, a ``dict`` or ``list`` (``expect`` narrows it). Anything
        else (a body that is not JSON, such as a proxy's HTML page answered 200, or another
        JSON type) is a ``FleetError`` like an error status: callers take their "gateway
        unavailable" path instead of failing on the shape."""
        url = self.gateway_url.rstrip("/") + path
        headers = {"Authorization": f"Bearer {self.admin_token()}"}
        try:
            r = httpx.request(method, url, headers=headers, timeout=self.timeout_s, **kw)
        except httpx.TransportError as exc:
            raise FleetUnavailable(
                f"fleet gateway unreachable at {self.gateway_url} ({type(exc).__name__}: {exc}); "
                "start it with `roadloop gateway serve` or point ROADLOOP_GATEWAY_URL at it"
            ) from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            kind = FleetConflict if r.status_code == 409 else FleetError
            raise kind(f"{method} {path} -> {r.status_code}: {detail}")
        try:
            body = r.json()
        except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
            raise FleetError(
                f"{method} {path} -> {r.status_code} is not JSON "
                f"({r.headers.get('content-type', 'no content type')}): {r.text[:200]!r}"
            ) from exc
        if not isinstance(body, expect):
            names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple)
                                                     else (expect,)))
            raise FleetError(f"{method} {path} -> {r.status_code}: expected a JSON "
                             f"{names}, got {type(body).__name__}: {str(body)[:200]!r}")
        return body

    def devices(self, **params: Any) -> list[tuple[str, datetime | None]]:
        """``GET /v1/devices`` as ``(camera_id, last_seen_at)`` pairs; a row without a camera
        id or with a ``last_seen_at`` that is not a time is a ``FleetError``."""
        rows = self.request("GET", "/v1/devices", params=params or None, expect=list)
        out: list[tuple[str, datetime | None]] = []
        for i, d in enumerate(rows):
            camera = d.get("camera_id") if isinstance(d, dict) else None
            raw = d.get("last_seen_at") if isinstance(d, dict) else None
            if not isinstance(camera, str) or not camera:
                raise FleetError(f"GET /v1/devices: row {i} has no camera_id: {str(d)[:200]!r}")
            try:
                ts = datetime.fromisoformat(raw) if raw is not None else None
            except (TypeError, ValueError) as exc:
                raise FleetError(f"GET /v1/devices: row {i} ({camera}) has last_seen_at "
                                 f"{raw!r}, not a time") from exc
            if ts is not None and ts.tzinfo is None:
                ts = ts.replace(tzinfo=UTC)
            out.append((camera, ts))
        return out

    def cameras(self) -> set[str]:
        """Every camera the gateway has a device for (any status, revoked included)."""
        return {camera for camera, _ in self.devices()}

    def erase_frames(self, camera_id: str, since: datetime, until: datetime) -> int:
        """Delete the gateway's frames (rows and files) of one camera in ``[since, until)``."""
        body = {"camera_id": camera_id, "since": since.isoformat(), "until": until.isoformat()}
        out = self.request("POST", "/v1/privacy/erase", json=body, expect=dict)
        try:
            return int(out["frames_deleted"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetError(f"POST /v1/privacy/erase: no frames_deleted in "
                             f"{str(out)[:200]!r}") from exc


__all__ = ["ADMIN_TOKEN_ENV", "FleetAdmin", "FleetConflict", "FleetError", "FleetUnavailable"]
