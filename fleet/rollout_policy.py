"""Rollout policy: cohorts, stages, health and the automatic rule — pure functions.

No FastAPI, no database session: everything here takes plain values (device ids, stage
lists, heartbeat payloads) so it is tested without a gateway. ``fleet.rollout_db`` applies
it to the rows, ``fleet.rollouts`` serves it.

* A device is in a stage's cohort when ``h(device_id) < threshold``, where
  ``h = int(sha256(device_id)[:16], 16) / 2**64`` and the threshold is the stage's percent
  (raised so that at least ``min_cohort_devices`` are in it). The stored threshold only ever
  grows, so a device inside 5 % stays inside 10 % … 100 %, whatever enrolls in between.
* Stages (default ``shadow 5 % → canary 5 → 10 → 25 → 50 → 100``) never decrease and end
  serving 100 %.
* The rule (``decide``): roll back on failing health (error rate, P95 latency, shadow
  agreement, a device reporting ``rolled_back``/``rejected``), advance when the hold elapsed
  and health passes, hold otherwise (too little data).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from fleet.config import GatewaySettings
from fleet.db import RolloutStatus

Mode = Literal["serve", "shadow", "none"]
Decision = Literal["advance", "rollback", "hold", "paused", "complete", "rolled_back", "cancelled"]
LIVE = (RolloutStatus.active.value, RolloutStatus.paused.value)
# A device's first heartbeat on a new model covers a window that began on the old one: it counts
# towards failures at once, but only later heartbeats (with frames) vouch for the new model.
HEARTBEATS_TO_VOUCH = 2
FAILED_UPDATE_STATUSES = ("rolled_back", "rejected")


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


def default_budgets(settings: GatewaySettings) -> Budgets:
    """The gateway's configured health thresholds (``ROADLOOP_GATEWAY_ROLLOUT_*``)."""
    s = settings
    return Budgets(
        max_error_rate=s.rollout_max_error_rate,
        p95_latency_budget_ms=s.rollout_p95_latency_budget_ms,
        min_shadow_f1=s.rollout_min_shadow_f1,
        min_reporting_fraction=s.rollout_min_reporting_fraction,
        min_frames=s.rollout_min_frames,
        min_cohort_devices=s.rollout_min_cohort_devices,
    )


def assignment_mode(device_id: str, stage: Stage, status: str, threshold: float) -> Mode:
    """What a device does with the rollout's model: inside the cohort of a rollout that is not
    rolled back it serves (always, once complete) or shadows as its stage says; else none."""
    if status == RolloutStatus.rolled_back.value or cohort_hash(device_id) >= threshold:
        return "none"
    return "serve" if status == RolloutStatus.complete.value else stage.mode
