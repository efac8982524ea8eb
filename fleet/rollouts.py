"""Staged model rollouts: signed manifests, cohorts, health per stage, automatic rollback.

Contract: ``docs/fleet-api.md`` → "Model rollouts". In short:

* ``POST /v1/models`` stores a model file content-addressed after checking its size, its
  SHA-256 and the manifest's Ed25519 signature against the gateway's configured key.
* ``POST /v1/rollouts`` starts a rollout of a published manifest through stages
  (default ``shadow 5 % → canary 5 → 10 → 25 → 50 → 100``); one rollout is active at a
  time (a new one cancels the previous).
* A device is in a stage's cohort when ``h(device_id) < threshold``, where
  ``h = int(sha256(device_id)[:16], 16) / 2**64`` and the threshold is the stage's percent
  (raised so that at least ``min_cohort_devices`` are in it). The stored threshold only ever
  grows, so a device inside 5 % stays inside 10 % … 100 %, whatever enrolls in between.
* ``POST /v1/rollouts/{id}/evaluate`` applies the rule: roll back on failing health (error
  rate, P95 latency, shadow agreement, a device reporting ``rolled_back``/``rejected``),
  advance when the hold elapsed and health passes, hold otherwise (too little data).
* Agents poll ``GET /v1/manifest`` (ETag / ``If-None-Match``) and download
  ``GET /v1/models/{sha256}`` (``Range`` supported).

Every change (publish, create, pause, resume, advance, rollback, cancel, complete) is a row
in the audit log.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from fleet.auth import (
    ADMIN_SCOPE,
    AdminPrincipal,
    Principal,
    audit,
    authenticate,
    bearer,
    client_address,
    has_scope,
    hash_token,
)
from fleet.db import (
    Device,
    DeviceStatus,
    HeartbeatRow,
    ModelManifestRow,
    RolloutRow,
    RolloutStatus,
    Token,
)
from fleet.models_store import ModelFileRejected, ModelStore
from fleet.ratelimit import enforce_rate_limit
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut
from roadloop.errors import InvalidInputError
from roadloop.signing import SignatureError, load_public_key, manifest_sha256, verify_manifest

logger = logging.getLogger(__name__)

Mode = Literal["serve", "shadow", "none"]
Decision = Literal["advance", "rollback", "hold", "paused", "complete", "rolled_back", "cancelled"]
LIVE = (RolloutStatus.active.value, RolloutStatus.paused.value)
# A device's first heartbeat on a new model covers a window that began on the old one: it counts
# towards failures at once, but only later heartbeats (with frames) vouch for the new model.
HEARTBEATS_TO_VOUCH = 2
FAILED_UPDATE_STATUSES = ("rolled_back", "rejected")


# =========================================================================== pure logic
def cohort_hash(device_id: str) -> float:
    """Position of a device on [0, 1): the first 64 bits of SHA-256 of its id."""
    return int(hashlib.sha256(device_id.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def stage_threshold(
    previous: float, percent: float, hashes: list[float], min_devices: int
) -> float:
    """The cohort threshold of a stage: never below ``previous`` (cohorts only grow), at least
    ``percent/100``, and high enough that ``min_devices`` of ``hashes`` (sorted) are inside."""
    t = max(previous, percent / 100.0)
    if percent >= 100:
        return 1.0
    inside = bisect.bisect_left(hashes, t)
    if inside < min_devices and hashes:
        k = min(min_devices, len(hashes))
        t = max(t, math.nextafter(hashes[k - 1], math.inf))
    return min(t, 1.0)


class Stage(BaseModel):
    name: str = Field(default="", max_length=40)
    percent: float = Field(gt=0, le=100)
    mode: Literal["serve", "shadow"] = "serve"


DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage(name="shadow", percent=5, mode="shadow"),
    Stage(name="canary", percent=5),
    Stage(name="10%", percent=10),
    Stage(name="25%", percent=25),
    Stage(name="50%", percent=50),
    Stage(name="100%", percent=100),
)


def normalise_stages(stages: list[Stage] | None) -> list[Stage]:
    """Validated stages: percents never decrease, the last is 100, names unique."""
    out = [s.model_copy() for s in (stages or list(DEFAULT_STAGES))]
    if not out:
        raise ValueError("a rollout needs at least one stage")
    for i, s in enumerate(out):
        if i and s.percent < out[i - 1].percent:
            raise ValueError(f"stage percents must not decrease ({out[i - 1].percent} -> "
                             f"{s.percent}): cohorts only grow")
        if not s.name:
            s.name = "shadow" if s.mode == "shadow" else f"{s.percent:g}%"
    if out[-1].percent != 100 or out[-1].mode != "serve":
        raise ValueError("the last stage must serve 100 %")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    return out


class Budgets(BaseModel):
    """Health thresholds of a rollout (defaults from the gateway settings)."""

    max_error_rate: float = Field(ge=0, le=1)
    p95_latency_budget_ms: float = Field(gt=0)
    min_shadow_f1: float = Field(ge=0, le=1)
    min_reporting_fraction: float = Field(gt=0, le=1)
    min_frames: int = Field(ge=1)
    min_cohort_devices: int = Field(ge=0)


class BudgetsIn(BaseModel):
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    p95_latency_budget_ms: float | None = Field(default=None, gt=0)
    min_shadow_f1: float | None = Field(default=None, ge=0, le=1)
    min_reporting_fraction: float | None = Field(default=None, gt=0, le=1)
    min_frames: int | None = Field(default=None, ge=1)
    min_cohort_devices: int | None = Field(default=None, ge=0)


class StageHealth(BaseModel):
    """What the heartbeats of a stage's cohort say about the new model."""

    stage: str
    mode: str
    percent: float
    since: datetime
    evaluated_at: datetime
    cohort_size: int
    devices_reporting: int
    devices_needed: int
    heartbeats: int
    frames: int
    errors: int
    error_rate: float | None
    p95_latency_ms: float | None
    shadow_f1: float | None
    verdict: Literal["pass", "fail", "insufficient"]
    reasons: list[str] = []


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    idx = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[idx]


def stage_health(
    *,
    rollout_id: str,
    model_ids: set[str],
    stage: Stage,
    since: datetime,
    now: datetime,
    cohort: set[str],
    heartbeats: list[tuple[str, dict[str, Any]]],
    failure_reports: list[tuple[str, dict[str, Any]]],
    budgets: Budgets,
) -> StageHealth:
    """Health of one stage from ``(device_id, payload)`` heartbeats received since it began.

    Only heartbeats about the new model count: in a serve stage those whose ``rollout_id``
    is this rollout's (or whose ``model_version`` is the new model's version or SHA-256); in
    the shadow stage the ``shadow`` block. ``failure_reports`` are this rollout's heartbeats
    with ``update_status`` ``rolled_back``/``rejected`` (from any device, any stage).
    """
    reasons: list[str] = []
    for device_id, p in failure_reports:
        reasons.append(f"device {device_id} reported {p.get('update_status')}: "
                       f"{p.get('update_reason') or 'no reason given'}")
    frames = errors = n_hb = vouched_frames = 0
    latencies: list[float] = []
    f1_weighted = f1_frames = 0.0
    seen: dict[str, int] = {}  # heartbeats about the new model per device
    vouching: set[str] = set()  # devices with a later heartbeat that has frames
    for device_id, p in heartbeats:
        if device_id not in cohort:
            continue
        if stage.mode == "shadow":
            sh = p.get("shadow")
            if not isinstance(sh, dict):
                continue
            if sh.get("model_version") not in model_ids and p.get("rollout_id") != rollout_id:
                continue
            n = int(_num(sh.get("frames")) or 0)
            err = int(_num(sh.get("errors")) or 0)
            lat = _num(sh.get("latency_p95_ms"))
            f1 = _num(sh.get("agreement_f1"))
            if f1 is not None and n > 0:
                f1_weighted += f1 * n
                f1_frames += n
        else:
            if p.get("update_status") in FAILED_UPDATE_STATUSES:
                continue
            on_new = (p.get("model_version") in model_ids
                      or (p.get("rollout_id") == rollout_id
                          and p.get("update_status") in (None, "serving")))
            if not on_new:
                continue
            n = int(_num(p.get("frames_processed")) or 0)
            err = int(_num(p.get("errors")) or 0)
            lat = _num(p.get("latency_p95_ms"))
            if lat is None and isinstance(p.get("latency_ms"), dict):
                lat = _num(p["latency_ms"].get("p95"))
        n_hb += 1
        seen[device_id] = seen.get(device_id, 0) + 1
        if seen[device_id] >= HEARTBEATS_TO_VOUCH and n > 0:  # an empty window says nothing
            vouching.add(device_id)
            vouched_frames += n
        frames += n
        errors += err
        if lat is not None:
            latencies.append(lat)
    error_rate = errors / frames if frames else (1.0 if errors else None)
    p95 = _percentile(latencies, 95)
    shadow_f1 = f1_weighted / f1_frames if f1_frames else None
    if error_rate is not None and errors and error_rate > budgets.max_error_rate:
        reasons.append(f"error rate {error_rate:.2%} > {budgets.max_error_rate:.2%} "
                       f"({errors} errors / {frames} frames)")
    if p95 is not None and p95 > budgets.p95_latency_budget_ms:
        reasons.append(f"P95 latency {p95:.1f} ms > budget {budgets.p95_latency_budget_ms:g} ms")
    if (stage.mode == "shadow" and shadow_f1 is not None
            and f1_frames >= budgets.min_frames and shadow_f1 < budgets.min_shadow_f1):
        reasons.append(f"shadow agreement F1 {shadow_f1:.3f} < floor {budgets.min_shadow_f1:g}")
    reporting = vouching
    needed = max(1, math.ceil(budgets.min_reporting_fraction * len(cohort))) if cohort else 1
    if reasons:
        verdict: Literal["pass", "fail", "insufficient"] = "fail"
    else:
        missing = []
        if len(reporting) < needed:
            missing.append(f"{len(reporting)}/{needed} cohort devices reported "
                           f"{HEARTBEATS_TO_VOUCH}+ heartbeats on the new model")
        if vouched_frames < budgets.min_frames:
            missing.append(f"{vouched_frames}/{budgets.min_frames} frames after each device's "
                           "first window on the new model")
        if stage.mode == "shadow" and shadow_f1 is None:
            missing.append("no shadow agreement reported yet")
        verdict = "insufficient" if missing else "pass"
        reasons = missing
    return StageHealth(
        stage=stage.name, mode=stage.mode, percent=stage.percent, since=since, evaluated_at=now,
        cohort_size=len(cohort), devices_reporting=len(reporting), devices_needed=needed,
        heartbeats=n_hb, frames=frames, errors=errors,
        error_rate=round(error_rate, 6) if error_rate is not None else None,
        p95_latency_ms=round(p95, 3) if p95 is not None else None,
        shadow_f1=round(shadow_f1, 4) if shadow_f1 is not None else None,
        verdict=verdict, reasons=reasons,
    )


def decide(status: str, health: StageHealth | None, hold_elapsed: bool) -> Decision:
    """The automatic rule: fail → rollback; pass + hold elapsed → advance; otherwise hold."""
    if status == RolloutStatus.paused.value:
        return "paused"
    if status in (RolloutStatus.complete.value, RolloutStatus.rolled_back.value,
                  RolloutStatus.cancelled.value):
        return "complete" if status == RolloutStatus.complete.value else status  # type: ignore[return-value]
    assert health is not None
    if health.verdict == "fail":
        return "rollback"
    if health.verdict == "pass" and hold_elapsed:
        return "advance"
    return "hold"


# =========================================================================== API models
class ModelPublished(BaseModel):
    manifest_sha256: str
    sha256: str
    size: int
    model_version: str
    rollout_id: str
    key_id: str
    created: bool


class RolloutCreate(BaseModel):
    manifest_sha256: str | None = Field(default=None, min_length=64, max_length=64)
    model_version: str | None = Field(default=None, max_length=200)
    stages: list[Stage] | None = None
    hold_seconds: float | None = Field(default=None, ge=0)
    budgets: BudgetsIn | None = None


class RollbackRequest(BaseModel):
    reason: str = Field(default="manual rollback", min_length=1, max_length=1000)


class RolloutOut(BaseModel):
    rollout_id: str
    status: str
    model_version: str
    manifest_sha256: str
    sha256: str
    stage: str
    stage_index: int
    percent: float
    mode: str
    stages: list[Stage]
    cohort_size: int
    devices: int
    hold_seconds: float
    stage_started_at: datetime
    hold_remaining_s: float
    budgets: Budgets
    previous_model_version: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    reason: str | None
    history: list[dict[str, Any]]
    health: dict[str, Any]


class EvaluateOut(BaseModel):
    rollout_id: str
    decision: Decision
    status: str
    stage: str
    percent: float
    health: StageHealth | None
    rollout: RolloutOut


class Assignment(BaseModel):
    mode: Mode
    rollout_id: str | None = None
    stage: str | None = None
    percent: float | None = None
    status: str | None = None


class ManifestOut(BaseModel):
    assignment: Assignment
    manifest: dict[str, Any] | None = None
    previous_model_version: str | None = None
    baseline: dict[str, Any] | None = Field(
        default=None,
        description="Manifest of the last completed rollout before this one (the fleet's "
        "known-good model), for devices that have no previous model.",
    )


# =========================================================================== gateway state
class _RolloutState:
    """Per-gateway cache of what ``GET /v1/manifest`` needs (refreshed on change or 1 s)."""

    TTL_S = 1.0

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.store = ModelStore(gw.settings.models_dir)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.generation = 0
        self._loaded: tuple[int, float] | None = None
        self.snapshot: dict[str, Any] = {}
        self._scopes: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._pub: tuple[float, str] | None = None
        self._principals: dict[tuple[str, bool], tuple[Principal, float]] = {}
        self._seq = 0
        self._bodies: dict[tuple[Any, ...], tuple[bytes, str]] = {}

    def invalidate(self) -> None:
        with self.lock:
            self.generation += 1

    def current(self) -> dict[str, Any]:
        with self.lock:
            gen = self.generation
            fresh = self._loaded and time.monotonic() - self._loaded[1] < self.TTL_S
            if fresh and self._loaded[0] == gen:  # type: ignore[index]
                return self.snapshot
        snap = self._load()
        with self.lock:
            self._seq += 1
            snap["seq"] = self._seq
            self.snapshot = snap
            self._loaded = (gen, time.monotonic())
        return snap

    def _load(self) -> dict[str, Any]:
        with self.gw.db.read() as session:
            ro = session.scalar(
                select(RolloutRow).where(RolloutRow.status != RolloutStatus.cancelled.value)
                .order_by(RolloutRow.created_at.desc()).limit(1))
            if ro is None:
                return {"rollout": None}
            manifest = session.get(ModelManifestRow, ro.manifest_sha256)
            baseline = None
            if ro.previous_manifest_sha256:
                prev = session.get(ModelManifestRow, ro.previous_manifest_sha256)
                baseline = prev.manifest if prev else None
            stage = Stage(**ro.stages[ro.stage_index])
            return {
                "rollout": ro.rollout_id, "status": ro.status, "stage": stage,
                "threshold": 1.0 if ro.status == RolloutStatus.complete.value
                else ro.cohort_threshold,
                "manifest": manifest.manifest if manifest else None,
                "previous_model_version": ro.previous_model_version, "baseline": baseline,
            }

    PRINCIPAL_TTL_S = 2.0

    def cached_principal(self, token: str, device_only: bool) -> Principal | None:
        """A principal authenticated less than ``PRINCIPAL_TTL_S`` ago (read-only routes only:
        a revocation or expiry reaches manifest polls and downloads within that time)."""
        key = (hash_token(token), device_only)
        with self.lock:
            hit = self._principals.get(key)
        if hit is None or time.monotonic() - hit[1] > self.PRINCIPAL_TTL_S:
            return None
        return hit[0]

    def remember_principal(self, token: str, device_only: bool, principal: Principal) -> None:
        with self.lock:
            self._principals[(hash_token(token), device_only)] = (principal, time.monotonic())
            if len(self._principals) > 50_000:
                cutoff = time.monotonic() - self.PRINCIPAL_TTL_S
                for k in [k for k, v in self._principals.items() if v[1] < cutoff]:
                    del self._principals[k]

    def token_scopes(self, token: str) -> frozenset[str] | None:
        """Scopes of a token (they never change), cached; None when unknown."""
        key = hash_token(token)
        with self.lock:
            if key in self._scopes:
                self._scopes.move_to_end(key)
                return self._scopes[key]
        with self.gw.db.read() as session:
            scopes = session.scalar(select(Token.scopes).where(Token.token_hash == key))
        if scopes is None:
            return None
        value = frozenset(scopes.split())
        with self.lock:
            self._scopes[key] = value
            while len(self._scopes) > 20_000:
                self._scopes.popitem(last=False)
        return value

    def public_key(self) -> str:
        """The configured manifest public key (re-read when the file changes)."""
        path = self.gw.settings.model_public_key_file
        assert path is not None
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            raise HTTPException(
                503, f"the gateway has no model public key at {path}: copy the platform's "
                "model-signing.pub there or set ROADLOOP_GATEWAY_MODEL_PUBLIC_KEY_FILE"
            ) from None
        if self._pub is None or self._pub[0] != mtime:
            try:
                self._pub = (mtime, load_public_key(path))
            except InvalidInputError as exc:
                raise HTTPException(503, f"model public key unusable: {exc}") from exc
        return self._pub[1]


_STATES: weakref.WeakKeyDictionary[Gateway, _RolloutState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def rollout_state(gw: Gateway) -> _RolloutState:
    with _STATES_LOCK:
        st = _STATES.get(gw)
        if st is None:
            st = _STATES[gw] = _RolloutState(gw)
        return st


def model_public_key(gw: Gateway) -> str | None:
    """The base64 manifest key to hand out at enrollment (None when not configured)."""
    try:
        return rollout_state(gw).public_key()
    except HTTPException:
        return None


# =========================================================================== helpers

def require_device_or_admin(*, device_only: bool) -> Any:
    """Agents hold ``camera:write`` (and maybe ``camera:read``); either lets a device read its
    manifest and download models. Admin tokens may download (``device_only=False``)."""

    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        gw: GatewayDep,
    ) -> Principal:
        token = credentials.credentials if credentials else None
        state = rollout_state(gw)
        if token:
            cached = state.cached_principal(token, device_only)
            if cached is not None:
                return cached
        scope = "camera:read"
        if token:
            scopes = state.token_scopes(token)
            if scopes and not has_scope(scopes, "camera:read") and "camera:write" in scopes:
                scope = "camera:write"
        principal = authenticate(gw, token, scope, device_only=device_only,
                                 client=client_address(request), path=request.url.path)
        if token:
            state.remember_principal(token, device_only, principal)
        return principal

    return dependency


DeviceReader = Annotated[Principal, Depends(require_device_or_admin(device_only=True))]
ModelReader = Annotated[Principal, Depends(require_device_or_admin(device_only=False))]


def _active_hashes(session: Session) -> list[float]:
    ids = session.scalars(select(Device.device_id).where(
        Device.revoked_at.is_(None), Device.status == DeviceStatus.active.value))
    return sorted(cohort_hash(d) for d in ids)


def _cohort(session: Session, threshold: float) -> set[str]:
    ids = session.scalars(select(Device.device_id).where(
        Device.revoked_at.is_(None), Device.status == DeviceStatus.active.value))
    return {d for d in ids if cohort_hash(d) < threshold}


def _event(ro: RolloutRow, now: datetime, event: str, **detail: Any) -> None:
    stage = ro.stages[ro.stage_index]
    ro.history = [*ro.history, {"at": now.isoformat(), "event": event, "stage": stage["name"],
                                "percent": stage["percent"], **detail}]
    ro.updated_at = now


def _rollout_out(session: Session, ro: RolloutRow, now: datetime) -> RolloutOut:
    stage = Stage(**ro.stages[ro.stage_index])
    threshold = 1.0 if ro.status == RolloutStatus.complete.value else ro.cohort_threshold
    hashes = _active_hashes(session)
    manifest = session.get(ModelManifestRow, ro.manifest_sha256)
    elapsed = (now - ro.stage_started_at).total_seconds()
    return RolloutOut(
        rollout_id=ro.rollout_id, status=ro.status, model_version=ro.model_version,
        manifest_sha256=ro.manifest_sha256, sha256=manifest.file_sha256 if manifest else "",
        stage=stage.name, stage_index=ro.stage_index, percent=stage.percent, mode=stage.mode,
        stages=[Stage(**s) for s in ro.stages],
        cohort_size=bisect.bisect_left(hashes, threshold) if threshold < 1.0 else len(hashes),
        devices=len(hashes), hold_seconds=ro.hold_seconds, stage_started_at=ro.stage_started_at,
        hold_remaining_s=max(0.0, ro.hold_seconds - elapsed) if ro.status in LIVE else 0.0,
        budgets=Budgets(**ro.budgets), previous_model_version=ro.previous_model_version,
        created_at=ro.created_at, updated_at=ro.updated_at, finished_at=ro.finished_at,
        reason=ro.reason, history=ro.history, health=ro.health,
    )


def _get_rollout(session: Session, rollout_id: str) -> RolloutRow:
    ro = session.get(RolloutRow, rollout_id)
    if ro is None:
        raise HTTPException(404, f"no rollout {rollout_id} (GET /v1/rollouts lists them)")
    return ro


def _enter_stage(session: Session, ro: RolloutRow, index: int, now: datetime) -> None:
    ro.stage_index = index
    ro.stage_started_at = now
    stage = ro.stages[index]
    ro.cohort_threshold = stage_threshold(
        ro.cohort_threshold, stage["percent"], _active_hashes(session),
        int(ro.budgets["min_cohort_devices"]))


def _advance(session: Session, ro: RolloutRow, now: datetime, how: str, actor: str,
             health: StageHealth | None = None) -> str:
    """Move to the next stage, or complete after the last. Returns the audit action."""
    old = ro.stages[ro.stage_index]["name"]
    if ro.stage_index + 1 >= len(ro.stages):
        ro.status = RolloutStatus.complete.value
        ro.finished_at = now
        ro.cohort_threshold = 1.0
        _event(ro, now, "completed", how=how, actor=actor)
        return "rollout_completed"
    _enter_stage(session, ro, ro.stage_index + 1, now)
    _event(ro, now, "advanced", how=how, actor=actor, **{"from": old},
           health_verdict=health.verdict if health else None)
    return "rollout_advanced"


def _rollback(ro: RolloutRow, now: datetime, reason: str, how: str, actor: str) -> None:
    ro.status = RolloutStatus.rolled_back.value
    ro.finished_at = now
    ro.reason = reason
    _event(ro, now, "rolled_back", how=how, actor=actor, reason=reason)


def compute_health(session: Session, ro: RolloutRow, now: datetime) -> StageHealth:
    stage = Stage(**ro.stages[ro.stage_index])
    manifest = session.get(ModelManifestRow, ro.manifest_sha256)
    model_ids = {ro.model_version, manifest.file_sha256 if manifest else ""}
    cohort = _cohort(session, ro.cohort_threshold)
    rows = session.execute(
        select(HeartbeatRow.device_id, HeartbeatRow.payload)
        .where(HeartbeatRow.received_at > ro.stage_started_at)
        .order_by(HeartbeatRow.id)).all()
    failures = [
        (d, p) for d, p in session.execute(
            select(HeartbeatRow.device_id, HeartbeatRow.payload)
            .where(HeartbeatRow.received_at >= ro.created_at)).all()
        if p.get("rollout_id") == ro.rollout_id
        and p.get("update_status") in FAILED_UPDATE_STATUSES
    ]
    seen: set[str] = set()
    unique_failures = []
    for d, p in failures:  # one reason per device is enough
        if d not in seen:
            seen.add(d)
            unique_failures.append((d, p))
    return stage_health(
        rollout_id=ro.rollout_id, model_ids=model_ids, stage=stage, since=ro.stage_started_at,
        now=now, cohort=cohort, heartbeats=[(d, p) for d, p in rows],
        failure_reports=unique_failures, budgets=Budgets(**ro.budgets),
    )


# =========================================================================== routes
router = APIRouter(tags=["rollouts"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
    409: {"model": ErrorOut}, 422: {"model": ErrorOut},
}
_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["manifest"],
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "ONNX bytes (optional when this SHA-256 is stored)"},
            "manifest": {"type": "string", "description": "signed manifest JSON"},
        }}}}},
}


@router.post("/v1/models", status_code=201, response_model=ModelPublished,
             responses={**_ERRORS, 413: {"model": ErrorOut}, 503: {"model": ErrorOut}},
             openapi_extra=_UPLOAD_DOC)
async def publish_model(
    request: Request, principal: AdminPrincipal, gw: GatewayDep, response: Response
) -> ModelPublished:
    """Publish a model: its file and signed manifest (size, SHA-256, signature checked)."""
    state = rollout_state(gw)
    public_key = state.public_key()
    form = await request.form(max_files=1, max_fields=2, max_part_size=256 * 1024)
    try:
        raw_manifest = form.get("manifest")
        upload = form.get("file")
        if raw_manifest is None:
            raise HTTPException(422, "missing form field 'manifest' (signed manifest JSON)")
        text = (await raw_manifest.read()).decode("utf-8", "replace") \
            if isinstance(raw_manifest, UploadFile) else raw_manifest
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HTTPException(422, f"manifest is not valid JSON ({exc})") from exc
        try:
            verify_manifest(manifest, public_key)
        except SignatureError as exc:
            raise HTTPException(422, f"manifest rejected: {exc}") from exc
        sha, size = str(manifest["sha256"]), manifest["size"]
        if not isinstance(size, int) or size <= 0:
            raise HTTPException(422, f"manifest size must be a positive integer, got {size!r}")
        try:
            path = state.store.path_for(sha)
        except ValueError as exc:
            raise HTTPException(422, f"manifest sha256: {exc}") from exc
        if isinstance(upload, UploadFile):
            try:
                await run_in_threadpool(state.store.ingest, upload.file, sha, size)
            except ModelFileRejected as exc:
                raise HTTPException(422, f"model file rejected: {exc}") from exc
        elif not path.is_file():
            raise HTTPException(422, f"missing form field 'file': no stored model {sha}")
    finally:
        await form.close()
    return await run_in_threadpool(_record_model, gw, principal, manifest, request, response)


def _record_model(gw: Gateway, principal: Principal, manifest: dict[str, Any],
                  request: Request, response: Response) -> ModelPublished:
    now = gw.now()
    msha = manifest_sha256(manifest)
    with gw.db.write() as session:
        row = session.get(ModelManifestRow, msha)
        created = row is None
        if row is None:
            clash = session.scalar(select(ModelManifestRow).where(
                ModelManifestRow.rollout_id == manifest["rollout_id"]))
            if clash is not None:
                raise HTTPException(409, f"rollout id {manifest['rollout_id']} already belongs to "
                                    f"manifest {clash.manifest_sha256}: sign a new manifest")
            row = ModelManifestRow(
                manifest_sha256=msha, file_sha256=manifest["sha256"], size=manifest["size"],
                model_version=str(manifest["model_version"]),
                rollout_id=str(manifest["rollout_id"]), key_id=str(manifest["key_id"]),
                manifest=manifest, path=f"{manifest['sha256']}.onnx", published_at=now,
                published_by=principal.actor)
            session.add(row)
            audit(session, now, "model_published", actor=principal.actor,
                  token_id=principal.token_id, client=client_address(request),
                  detail={"manifest_sha256": msha, "sha256": manifest["sha256"],
                          "model_version": row.model_version, "rollout_id": row.rollout_id,
                          "key_id": row.key_id})
            session.commit()
    if not created:
        response.status_code = 200
    return ModelPublished(manifest_sha256=msha, sha256=row.file_sha256, size=row.size,
                          model_version=row.model_version, rollout_id=row.rollout_id,
                          key_id=row.key_id, created=created)


@router.post("/v1/rollouts", status_code=201, response_model=RolloutOut, responses=_ERRORS)
def create_rollout(
    body: RolloutCreate, request: Request, principal: AdminPrincipal, gw: GatewayDep
) -> RolloutOut:
    """Start a rollout of a published manifest; cancels the rollout that is still live."""
    s = gw.settings
    try:
        stages = normalise_stages(body.stages)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    defaults = Budgets(
        max_error_rate=s.rollout_max_error_rate, p95_latency_budget_ms=s.rollout_p95_latency_budget_ms,
        min_shadow_f1=s.rollout_min_shadow_f1, min_reporting_fraction=s.rollout_min_reporting_fraction,
        min_frames=s.rollout_min_frames, min_cohort_devices=s.rollout_min_cohort_devices)
    overrides = body.budgets.model_dump(exclude_none=True) if body.budgets else {}
    budgets = defaults.model_copy(update=overrides)
    now = gw.now()
    with gw.db.write() as session:
        if body.manifest_sha256:
            manifest = session.get(ModelManifestRow, body.manifest_sha256)
            what = f"manifest {body.manifest_sha256}"
        elif body.model_version:
            manifest = session.scalar(select(ModelManifestRow).where(
                ModelManifestRow.model_version == body.model_version)
                .order_by(ModelManifestRow.published_at.desc()).limit(1))
            what = f"model version {body.model_version}"
        else:
            raise HTTPException(422, "give manifest_sha256 or model_version")
        if manifest is None:
            raise HTTPException(404, f"no published {what}: POST /v1/models first")
        if session.get(RolloutRow, manifest.rollout_id) is not None:
            raise HTTPException(409, f"rollout {manifest.rollout_id} already exists: a manifest "
                                "is rolled out once; publish a new one (new rollout id)")
        for old in session.scalars(select(RolloutRow).where(RolloutRow.status.in_(LIVE))):
            old.status = RolloutStatus.cancelled.value
            old.finished_at = now
            old.reason = f"superseded by {manifest.rollout_id}"
            _event(old, now, "cancelled", actor=principal.actor, by=manifest.rollout_id)
            audit(session, now, "rollout_cancelled", actor=principal.actor,
                  token_id=principal.token_id, client=client_address(request),
                  detail={"rollout_id": old.rollout_id, "superseded_by": manifest.rollout_id})
        previous = session.scalar(select(RolloutRow).where(
            RolloutRow.status == RolloutStatus.complete.value)
            .order_by(RolloutRow.finished_at.desc()).limit(1))
        ro = RolloutRow(
            rollout_id=manifest.rollout_id, manifest_sha256=manifest.manifest_sha256,
            model_version=manifest.model_version, status=RolloutStatus.active.value,
            stages=[st.model_dump() for st in stages], stage_index=0, stage_started_at=now,
            cohort_threshold=0.0,
            hold_seconds=body.hold_seconds if body.hold_seconds is not None
            else s.rollout_hold_seconds,
            budgets=budgets.model_dump(),
            previous_model_version=previous.model_version if previous else None,
            previous_manifest_sha256=previous.manifest_sha256 if previous else None,
            created_at=now, updated_at=now, created_by=principal.actor, history=[], health={})
        _enter_stage(session, ro, 0, now)
        _event(ro, now, "created", actor=principal.actor)
        session.add(ro)
        audit(session, now, "rollout_created", actor=principal.actor, token_id=principal.token_id,
              client=client_address(request),
              detail={"rollout_id": ro.rollout_id, "model_version": ro.model_version,
                      "manifest_sha256": ro.manifest_sha256, "hold_seconds": ro.hold_seconds,
                      "stages": [st.name for st in stages], "budgets": ro.budgets})
        session.commit()
        rollout_state(gw).invalidate()
        return _rollout_out(session, ro, now)


@router.get("/v1/rollouts", response_model=list[RolloutOut], responses=_ERRORS)
def list_rollouts(
    _: AdminPrincipal, gw: GatewayDep, status: RolloutStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[RolloutOut]:
    """Rollouts, newest first (filter by ``status``)."""
    q = select(RolloutRow).order_by(RolloutRow.created_at.desc()).limit(limit)
    if status is not None:
        q = q.where(RolloutRow.status == status.value)
    now = gw.now()
    with gw.db.read() as session:
        return [_rollout_out(session, ro, now) for ro in session.scalars(q)]


@router.get("/v1/rollouts/{rollout_id}", response_model=RolloutOut, responses=_ERRORS)
def get_rollout(rollout_id: str, _: AdminPrincipal, gw: GatewayDep) -> RolloutOut:
    """One rollout: stage, percent, cohort size, status, history, health per stage."""
    with gw.db.read() as session:
        return _rollout_out(session, _get_rollout(session, rollout_id), gw.now())


def _change(gw: Gateway, rollout_id: str, principal: Principal, request: Request,
            action: str) -> RolloutOut:
    now = gw.now()
    with gw.db.write() as session:
        ro = _get_rollout(session, rollout_id)
        audit_action = f"rollout_{action}"
        if action == "paused":
            if ro.status != RolloutStatus.active.value:
                raise HTTPException(409, f"rollout {rollout_id} is {ro.status}; only an active "
                                    "rollout can be paused")
            ro.status = RolloutStatus.paused.value
            _event(ro, now, "paused", actor=principal.actor)
        elif action == "resumed":
            if ro.status != RolloutStatus.paused.value:
                raise HTTPException(409, f"rollout {rollout_id} is {ro.status}; only a paused "
                                    "rollout can be resumed")
            ro.status = RolloutStatus.active.value
            _event(ro, now, "resumed", actor=principal.actor)
        elif action == "advanced":
            if ro.status != RolloutStatus.active.value:
                raise HTTPException(409, f"rollout {rollout_id} is {ro.status}; only an active "
                                    "rollout can advance (resume it first if paused)")
            audit_action = _advance(session, ro, now, "manual", principal.actor)
        stage = ro.stages[ro.stage_index]
        audit(session, now, audit_action, actor=principal.actor, token_id=principal.token_id,
              client=client_address(request), detail={"rollout_id": rollout_id, "stage": stage["name"],
                                               "percent": stage["percent"], "status": ro.status})
        session.commit()
        rollout_state(gw).invalidate()
        return _rollout_out(session, ro, now)


@router.post("/v1/rollouts/{rollout_id}/pause", response_model=RolloutOut, responses=_ERRORS)
def pause_rollout(rollout_id: str, request: Request, principal: AdminPrincipal,
                  gw: GatewayDep) -> RolloutOut:
    """Stop advancing (devices keep their current assignment)."""
    return _change(gw, rollout_id, principal, request, "paused")


@router.post("/v1/rollouts/{rollout_id}/resume", response_model=RolloutOut, responses=_ERRORS)
def resume_rollout(rollout_id: str, request: Request, principal: AdminPrincipal,
                   gw: GatewayDep) -> RolloutOut:
    return _change(gw, rollout_id, principal, request, "resumed")


@router.post("/v1/rollouts/{rollout_id}/advance", response_model=RolloutOut, responses=_ERRORS)
def advance_rollout(rollout_id: str, request: Request, principal: AdminPrincipal,
                    gw: GatewayDep) -> RolloutOut:
    """Go to the next stage now (skips the hold and the health rule)."""
    return _change(gw, rollout_id, principal, request, "advanced")


@router.post("/v1/rollouts/{rollout_id}/rollback", response_model=RolloutOut, responses=_ERRORS)
def rollback_rollout(rollout_id: str, request: Request, principal: AdminPrincipal,
                     gw: GatewayDep, body: RollbackRequest | None = None) -> RolloutOut:
    """Roll the whole rollout back: every device returns to its previous model."""
    reason = (body or RollbackRequest()).reason
    now = gw.now()
    with gw.db.write() as session:
        ro = _get_rollout(session, rollout_id)
        if ro.status not in (*LIVE, RolloutStatus.complete.value):
            raise HTTPException(409, f"rollout {rollout_id} is {ro.status}: nothing to roll back")
        _rollback(ro, now, reason, "manual", principal.actor)
        stage = ro.stages[ro.stage_index]
        audit(session, now, "rollout_rolled_back", actor=principal.actor,
              token_id=principal.token_id, client=client_address(request),
              detail={"rollout_id": rollout_id, "stage": stage["name"], "reason": reason,
                      "how": "manual"})
        session.commit()
        rollout_state(gw).invalidate()
        return _rollout_out(session, ro, now)


@router.post("/v1/rollouts/{rollout_id}/evaluate", response_model=EvaluateOut, responses=_ERRORS)
def evaluate_rollout(rollout_id: str, request: Request, principal: AdminPrincipal,
                     gw: GatewayDep) -> EvaluateOut:
    """Apply the automatic rule now: rollback on failing health, advance when the hold elapsed
    and health passes, hold otherwise. Terminal rollouts answer their status."""
    now = gw.now()
    with gw.db.write() as session:
        ro = _get_rollout(session, rollout_id)
        health = compute_health(session, ro, now) if ro.status in LIVE else None
        elapsed = (now - ro.stage_started_at) >= timedelta(seconds=ro.hold_seconds)
        decision = decide(ro.status, health, elapsed)
        stage = ro.stages[ro.stage_index]
        if health is not None:
            ro.health = {**ro.health, stage["name"]: health.model_dump(mode="json")}
        changed = decision in ("advance", "rollback")
        if decision == "rollback":
            assert health is not None
            reason = "; ".join(health.reasons)
            _rollback(ro, now, reason, "automatic", principal.actor)
            audit(session, now, "rollout_rolled_back", actor=principal.actor,
                  token_id=principal.token_id, client=client_address(request),
                  detail={"rollout_id": rollout_id, "stage": stage["name"], "reason": reason,
                          "how": "automatic", "health": health.model_dump(mode="json")})
        elif decision == "advance":
            action = _advance(session, ro, now, "automatic", principal.actor, health)
            new = ro.stages[ro.stage_index]
            audit(session, now, action, actor=principal.actor, token_id=principal.token_id,
                  client=client_address(request),
                  detail={"rollout_id": rollout_id, "from": stage["name"], "stage": new["name"],
                          "percent": new["percent"], "how": "automatic",
                          "health": health.model_dump(mode="json") if health else None})
            if action == "rollout_completed":
                decision = "complete"
        session.commit()
        if changed:
            rollout_state(gw).invalidate()
        out = _rollout_out(session, ro, now)
    return EvaluateOut(rollout_id=rollout_id, decision=decision, status=out.status,
                       stage=out.stage, percent=out.percent, health=health, rollout=out)


def _encoded(state: _RolloutState, snap: dict[str, Any], out: ManifestOut) -> tuple[bytes, str]:
    """JSON body + ETag of an assignment; cached per snapshot and mode (few distinct bodies)."""
    key = (snap.get("seq"), out.assignment.mode)
    with state.lock:
        hit = state._bodies.get(key)
    if hit is not None:
        return hit
    body = json.dumps(out.model_dump(mode="json"), sort_keys=True,
                      separators=(",", ":")).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    with state.lock:
        if len(state._bodies) > 64:
            state._bodies.clear()
        state._bodies[key] = (body, etag)
    return body, etag


@router.get("/v1/manifest", response_model=ManifestOut,
            responses={**_ERRORS, 304: {"description": "unchanged (If-None-Match)"}})
def get_manifest(request: Request, principal: DeviceReader, gw: GatewayDep) -> Response:
    """This device's assignment: which model to serve or shadow (ETag / If-None-Match)."""
    enforce_rate_limit(gw, principal)
    snap = rollout_state(gw).current()
    assert principal.device_id is not None
    if snap.get("rollout") is None:
        out = ManifestOut(assignment=Assignment(mode="none"))
    else:
        stage: Stage = snap["stage"]
        status = snap["status"]
        inside = cohort_hash(principal.device_id) < snap["threshold"]
        live = status != RolloutStatus.rolled_back.value and inside
        mode: Mode = ("serve" if status == RolloutStatus.complete.value else stage.mode) \
            if live else "none"
        out = ManifestOut(
            assignment=Assignment(mode=mode, rollout_id=snap["rollout"], stage=stage.name,
                                  percent=100.0 if status == RolloutStatus.complete.value
                                  else stage.percent, status=status),
            manifest=snap["manifest"] if live else None,
            previous_model_version=snap["previous_model_version"], baseline=snap["baseline"])
    body, etag = _encoded(rollout_state(gw), snap, out)
    gw.stats.count("manifest_polls")
    match = request.headers.get("if-none-match")
    if match and etag in [t.strip() for t in match.split(",")]:
        gw.stats.count("manifest_not_modified")
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
    return Response(content=body, media_type="application/json",
                    headers={"ETag": etag, "Cache-Control": "no-cache"})


@router.get("/v1/models/{sha256}", responses={**_ERRORS, 206: {"description": "partial"},
                                              416: {"description": "range not satisfiable"}})
def download_model(sha256: str, principal: ModelReader, gw: GatewayDep) -> FileResponse:
    """A published model file (``Range`` requests answered with 206)."""
    if principal.device_id is not None:
        enforce_rate_limit(gw, principal)
    store = rollout_state(gw).store
    if not store.has(sha256):
        raise HTTPException(404, f"no model {sha256} on this gateway")
    gw.stats.count("model_downloads")
    response = FileResponse(store.path_for(sha256), media_type="application/octet-stream",
                            headers={"ETag": f'"{sha256}"', "Cache-Control": "no-cache"})
    response.chunk_size = 1 << 20  # 1 MiB reads: fewer thread hops per download
    return response


__all__ = [
    "ADMIN_SCOPE", "DEFAULT_STAGES", "Budgets", "Stage", "StageHealth", "cohort_hash",
    "decide", "model_public_key", "normalise_stages", "rollout_state", "router",
    "stage_health", "stage_threshold",
]
