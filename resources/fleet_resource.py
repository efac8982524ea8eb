"""The fleet gateway as a Dagster resource: publish signed models, start and drive rollouts,
read and change a camera's configuration (e.g. boost its sampling while drift is examined).

The platform signs (``roadloop.release.signing``, key under ``<home>/keys``); the gateway checks the
signature against its configured public key, stores the file and runs the stages. Calls use
an operator token (``camera:admin``): ``admin_token``, else ``ROADLOOP_FLEET_ADMIN_TOKEN``,
else the file ``admin_token_file`` (default ``<home>/fleet/admin-token``; create one with
``roadloop fleet admin-token create > .roadloop/fleet/admin-token``).
"""

import contextlib
import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dagster as dg
from pydantic import Field

from roadloop.fleet_admin import (
    ADMIN_TOKEN_ENV,
    FleetAdmin,
    FleetConflict,
    FleetError,
    FleetUnavailable,  # noqa: F401  (re-exported: assets and sensors import it from here)
)
from roadloop.monitoring.windows import heartbeat_time
from roadloop.release.signing import (
    build_manifest,
    key_id,
    load_or_create_signing_key,
    manifest_sha256,
    sign_manifest,
)
from roadloop.settings import get_settings


class FleetResource(dg.ConfigurableResource):
    """Operator client of the fleet gateway (``docs/fleet-api.md``, "Model rollouts")."""

    gateway_url: str = Field(description="Gateway base URL, e.g. http://127.0.0.1:8700.")
    admin_token: str | None = Field(
        default=None, description=f"camera:admin token; default ${ADMIN_TOKEN_ENV} or the file."
    )
    admin_token_file: str | None = Field(
        default=None, description="File holding the admin token; default <home>/fleet/admin-token."
    )
    key_dir: str | None = Field(
        default=None, description="Signing key folder; default <home>/keys (created on first use)."
    )
    hold_seconds: float | None = Field(
        default=None, description="Hold per stage; default: the gateway's (1800 s)."
    )
    p95_latency_budget_ms: float | None = Field(
        default=None, description="Rollout latency budget; default: the gateway's."
    )
    timeout_s: float = 60.0

    # -- plumbing (roadloop.fleet_admin: the same calls without Dagster) -----------------
    def admin(self) -> FleetAdmin:
        return FleetAdmin(gateway_url=self.gateway_url, token=self.admin_token,
                          token_file=Path(self.admin_token_file) if self.admin_token_file
                          else None, timeout_s=self.timeout_s)

    def _token(self) -> str:
        return self.admin().admin_token()

    def _request(self, method: str, path: str, *,
                 expect: type | tuple[type, ...] = (dict, list),
                 **kw: Any) -> dict[str, Any] | list[Any]:
        """``FleetAdmin.request``: the gateway's JSON answer or a ``FleetError``."""
        return self.admin().request(method, path, expect=expect, **kw)

    def signing_key_dir(self) -> Path:
        return Path(self.key_dir) if self.key_dir else get_settings().home / "keys"

    # -- operations -------------------------------------------------------------------------
    def publish(
        self,
        model_version: str,
        onnx_path: str | Path,
        input_size: int,
        class_names: list[str],
        fmt: str = "onnx-int8",
        rollout_id: str | None = None,
        input_shape: tuple[int, int] | None = None,
        variants: dict[tuple[int, int], Path] | None = None,
        expected_sha256: str | None = None,
        expected_variant_sha256: dict[tuple[int, int], str] | None = None,
    ) -> dict[str, Any]:
        """Build + sign the manifest and upload file + manifest (+ the files of ``variants``,
        the same model at other input shapes). Returns ``{manifest, manifest_sha256, key_id,
        published}``. With ``expected_sha256`` (and one per variant shape): a file whose bytes
        are not those any more is refused before anything is signed or uploaded
        (``roadloop.release.signing.build_manifest``)."""
        key = load_or_create_signing_key(self.signing_key_dir())
        manifest = sign_manifest(
            build_manifest(model_version, Path(onnx_path), input_size, class_names, rollout_id,
                           fmt, input_shape=input_shape, variants=variants,
                           expected_sha256=expected_sha256,
                           expected_variant_sha256=expected_variant_sha256),
            key,
        )
        with contextlib.ExitStack() as stack:
            files = [("file", (Path(onnx_path).name, stack.enter_context(open(onnx_path, "rb")),
                               "application/octet-stream"))]
            for path in (variants or {}).values():
                files.append(("variant", (Path(path).name, stack.enter_context(open(path, "rb")),
                                          "application/octet-stream")))
            published = self._request(
                "POST", "/v1/models", files=files, data={"manifest": json.dumps(manifest)},
                expect=dict,
            )
        return {"manifest": manifest, "manifest_sha256": manifest_sha256(manifest),
                "key_id": key_id(key), "published": published}

    def create_rollout(
        self,
        manifest_sha256: str,
        hold_seconds: float | None = None,
        stages: list[dict[str, Any]] | None = None,
        budgets: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"manifest_sha256": manifest_sha256}
        hold = hold_seconds if hold_seconds is not None else self.hold_seconds
        if hold is not None:
            body["hold_seconds"] = hold
        if stages:
            body["stages"] = stages
        merged = dict(budgets or {})
        if self.p95_latency_budget_ms is not None:
            merged.setdefault("p95_latency_budget_ms", self.p95_latency_budget_ms)
        if merged:
            body["budgets"] = merged
        return self._request("POST", "/v1/rollouts", json=body, expect=dict)  # type: ignore[return-value]

    def evaluate(self, rollout_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/rollouts/{rollout_id}/evaluate", expect=dict)  # type: ignore[return-value]

    def status(self, rollout_id: str | None = None) -> dict[str, Any] | None:
        """One rollout, or the newest one when ``rollout_id`` is None (None when there is none)."""
        if rollout_id:
            return self._request("GET", f"/v1/rollouts/{rollout_id}", expect=dict)  # type: ignore[return-value]
        rows = self._request("GET", "/v1/rollouts", params={"limit": 1}, expect=list)
        return rows[0] if rows else None  # type: ignore[index]

    def active_rollout(self) -> dict[str, Any] | None:
        """The live (active or paused) rollout, if any."""
        for status in ("active", "paused"):
            rows = self._request("GET", "/v1/rollouts", params={"status": status, "limit": 1},
                                 expect=list)
            if rows:
                return rows[0]  # type: ignore[index]
        return None

    def action(self, rollout_id: str, verb: str, reason: str | None = None) -> dict[str, Any]:
        """``pause`` | ``resume`` | ``advance`` | ``rollback``."""
        if verb not in ("pause", "resume", "advance", "rollback"):
            raise ValueError(f"unknown rollout action {verb!r}")
        kw: dict[str, Any] = {"json": {"reason": reason}} if verb == "rollback" and reason else {}
        return self._request("POST", f"/v1/rollouts/{rollout_id}/{verb}", expect=dict, **kw)  # type: ignore[return-value]

    # -- camera configuration (docs/fleet-api.md, "Camera configuration") -------------------
    def camera_config(self, camera_id: str) -> dict[str, Any]:
        """``{camera_id, version, sha256, config, updated_at, updated_by}``; version 0 and
        ``config: {}`` when the camera has none."""
        return self._request("GET", _config_path(camera_id), expect=dict)  # type: ignore[return-value]

    def put_camera_config(
        self, camera_id: str, config: dict[str, Any], expected_version: int | None, reason: str
    ) -> dict[str, Any]:
        """Replace the camera's document; ``expected_version`` is the version it is based on
        (0: none yet; None: overwrite). ``FleetConflict`` when that version is stale."""
        body = {"config": config, "expected_version": expected_version, "reason": reason}
        return self._request("PUT", _config_path(camera_id), json=body, expect=dict)  # type: ignore[return-value]

    def boost_sampling(
        self, camera_id: str, factor: float, until: datetime, reason: str
    ) -> dict[str, Any]:
        """Multiply the camera's sampling (base rate, capped at 1, and hourly budget) by
        ``factor`` until ``until`` (timezone-aware); the agent returns to its configured rates
        by itself afterwards. Read-modify-write of ``sampling.boost`` only — every other
        setting and section is kept — retried once when another writer got there first."""
        if until.tzinfo is None or until.utcoffset() is None:
            raise ValueError(f"until must be timezone-aware, got {until.isoformat()}")
        for attempt in range(2):
            current = self.camera_config(camera_id)
            config = copy.deepcopy(current.get("config") or {})
            sampling = dict(config.get("sampling") or {})
            sampling["boost"] = {"factor": factor, "until": until.isoformat(), "reason": reason}
            config["sampling"] = sampling
            try:
                return self.put_camera_config(camera_id, config, current["version"], reason)
            except FleetConflict:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _devices(self, **params: Any) -> list[tuple[str, datetime | None]]:
        return self.admin().devices(**params)

    def live_cameras(self) -> dict[str, datetime | None]:
        """Cameras with at least one active device (enrolled, not revoked, not in maintenance)
        and when one of them was last heard from (None: never)."""
        seen: dict[str, datetime | None] = {}
        for camera, ts in self._devices(status="active"):
            prev = seen.get(camera)
            seen[camera] = max((t for t in (prev, ts) if t is not None), default=None)
        return dict(sorted(seen.items()))

    def heartbeats(self, camera_id: str, start: datetime, end: datetime,
                   page: int = 1000) -> list[dict[str, Any]]:
        """Payloads of the heartbeats a camera sent for ``[start, end)`` (by the heartbeat's
        ``window_end``, else ``sent_at``), paging through ``GET /v1/cameras/{id}/heartbeats``.
        A heartbeat is sent after its window closes, so pages run a little past ``end``."""
        since = start - timedelta(minutes=2)
        stop_after = end + timedelta(minutes=10)
        seen: set[int] = set()
        out: list[dict[str, Any]] = []
        while True:
            rows = self._request("GET", f"/v1/cameras/{camera_id}/heartbeats",
                                 params={"since": since.isoformat(), "limit": page}, expect=list)
            fresh = [r for r in rows if r["id"] not in seen]  # type: ignore[index]
            for r in fresh:
                seen.add(r["id"])
                ts = heartbeat_time(r["payload"]) if isinstance(r.get("payload"), dict) else None
                if ts is not None and start <= ts < end:
                    out.append(r["payload"])
            if len(rows) < page or not fresh:
                return out
            since = datetime.fromisoformat(rows[-1]["sent_at"])  # type: ignore[index]
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            if since >= stop_after:
                return out


    def report_drift(self, camera_id: str, report: dict[str, Any]) -> dict[str, Any]:
        """``PUT /v1/cameras/{camera_id}/drift`` with a window's verdict
        (``roadloop.monitoring.models.gateway_report``); the gateway exports it on /metrics."""
        path = f"/v1/cameras/{quote(camera_id, safe='')}/drift"
        return self._request("PUT", path, json=report, expect=dict)  # type: ignore[return-value]

    # -- traffic analytics (docs/traffic.md) ------------------------------------------------
    def traffic_intervals(self, camera_id: str | None, since: datetime, until: datetime,
                          page: int = 1000) -> list[dict[str, Any]]:
        """The traffic interval records (as the agents posted them, plus ``received_at``)
        whose ``interval_start`` lies in ``[since, until)``, of one camera or (None) all,
        in ``(interval_start, record_id)`` order: every page of ``GET /v1/traffic/intervals``,
        following ``next_cursor``."""
        for moment in (since, until):
            if moment.tzinfo is None or moment.utcoffset() is None:
                raise ValueError(f"since/until must be timezone-aware, got {moment.isoformat()}")
        params: dict[str, Any] = {"since": since.isoformat(), "until": until.isoformat(),
                                  "limit": page}
        if camera_id is not None:
            params["camera_id"] = camera_id
        out: list[dict[str, Any]] = []
        cursors: set[str] = set()
        while True:
            body = self._request("GET", "/v1/traffic/intervals", params=params, expect=dict)
            out.extend(body["items"])  # type: ignore[call-overload]
            cursor = body.get("next_cursor")  # type: ignore[union-attr]
            if not cursor:
                return out
            if cursor in cursors:  # a gateway that repeats itself must not loop us forever
                raise FleetError(f"GET /v1/traffic/intervals returned cursor {cursor!r} twice")
            cursors.add(cursor)
            params["cursor"] = cursor


    # -- retention and erasure (docs/retention.md) -----------------------------------------
    def cameras(self) -> set[str]:
        """Every camera the gateway has a device for (any status, revoked included)."""
        return self.admin().cameras()

    def erase_frames(self, camera_id: str, since: datetime, until: datetime) -> int:
        """Delete the gateway's frames (rows and files) of one camera in ``[since, until)``."""
        return self.admin().erase_frames(camera_id, since, until)

    def expire(self, frames: list[tuple[str, str]], heartbeats_before: datetime | None,
               traffic_before: datetime | None, batch: int = 1000) -> dict[str, int]:
        """Delete expired frames (in batches), heartbeats and traffic records on the gateway;
        the counts summed over the calls."""
        totals = {"frames_deleted": 0, "bytes_deleted": 0, "heartbeats_deleted": 0,
                  "traffic_records_deleted": 0}
        chunks = [frames[i:i + batch] for i in range(0, len(frames), batch)] or [[]]
        for i, chunk in enumerate(chunks):
            body: dict[str, Any] = {"frames": [{"camera_id": c, "frame_id": f} for c, f in chunk]}
            if i == 0:
                body["heartbeats_before"] = heartbeats_before.isoformat() if heartbeats_before else None
                body["traffic_before"] = traffic_before.isoformat() if traffic_before else None
            out = self._request("POST", "/v1/privacy/expire", json=body, expect=dict)
            for k in totals:
                totals[k] += int(out[k])  # type: ignore[call-overload]
        return totals


def _config_path(camera_id: str) -> str:
    return f"/v1/cameras/{quote(camera_id, safe='')}/config"


def stages_markdown(rollout: dict[str, Any]) -> str:
    """Stage table with the health recorded per stage (for the Dagster UI)."""
    lines = ["| stage | mode | percent | verdict | devices | frames | error rate | P95 ms | shadow F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    health = rollout.get("health") or {}
    for i, st in enumerate(rollout.get("stages", [])):
        h = health.get(st["name"]) or {}
        mark = " ←" if i == rollout.get("stage_index") and rollout.get("status") in ("active", "paused") else ""

        def fmt(v: Any, spec: str = "") -> str:
            return "–" if v is None else format(v, spec)

        lines.append(
            f"| {st['name']}{mark} | {st['mode']} | {st['percent']:g} | {h.get('verdict', '–')} | "
            f"{fmt(h.get('devices_reporting'))}/{fmt(h.get('cohort_size'))} | {fmt(h.get('frames'))} | "
            f"{fmt(h.get('error_rate'), '.2%')} | {fmt(h.get('p95_latency_ms'), '.1f')} | "
            f"{fmt(h.get('shadow_f1'), '.3f')} |"
        )
    return "\n".join(lines)
