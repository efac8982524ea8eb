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
* Health (``stage_health``) is judged per device: each cohort device's heartbeats give its
  own error rate, P95 latency and shadow agreement; a device fails on any budget or when its
  latest report about the rollout is ``rolled_back``/``rejected`` (a final refusal; a
  ``retrying`` one is not, and neither is a refusal the device got over); the stage fails when
  more devices fail than the cohort tolerates (``tolerated_failing_devices``: none below 10
  devices, then 10 %). Only cohort devices count, for reports as for heartbeats: a device
  that was never assigned the rollout cannot fail it.
  Heartbeats count in gateway time (a burst does not outweigh a device's history) and only
  when plausible (``fleet.heartbeat_plausibility``).
* The rule (``decide``): roll back on failing health, advance when the hold elapsed and
  health passes, hold otherwise (too little data).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.config import HEARTBEAT_MAX_FPS, GatewaySettings
from fleet.db import RolloutStatus
from fleet.heartbeat_plausibility import heartbeat_problems

Mode = Literal["serve", "shadow", "none"]
Decision = Literal["advance", "rollback", "hold", "paused", "complete", "rolled_back", "cancelled"]
LIVE = (RolloutStatus.active.value, RolloutStatus.paused.value)
# A device's first heartbeat on a new model covers a window that began on the old one: it counts
# towards failures at once, but only later heartbeats (with frames) vouch for the new model.
HEARTBEATS_TO_VOUCH = 2
# Final refusals only: an agent reports a refusal it will try again as ``retrying``.
FAILED_UPDATE_STATUSES = ("rolled_back", "rejected")
# Health is judged per device; a cohort absorbs floor(10 %) failing devices (see
# ``tolerated_failing_devices``).
FAILING_DEVICE_SHARE = 0.1
# Per device, in gateway time: a burst of at most HEALTH_BURST heartbeats counts (a retry, a
# short backlog), then one per HEALTH_REFILL_S; agents send one per window (30 s by default).
HEALTH_BURST = 3
HEALTH_REFILL_S = 1.0
# A heartbeat's frames weigh at most HEARTBEAT_MAX_FPS per second since the device's previous
# heartbeat, plus this grace for transit jitter (a window cannot outrun the gateway's clock).
FRAME_GRACE_S = 1.0
MAX_LISTED_DEVICES = 20


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
    """One stage of a rollout; also the body operators send in ``POST /v1/rollouts``
    ``stages``: unknown keys are refused and ``percent`` must be a JSON number."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=40)
    percent: float = Field(gt=0, le=100, strict=True, allow_inf_nan=False)
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
    """Validated stages: percents never decrease, no shadow stage after a serving one (a
    device that served the model would go back to shadowing it), the last serves 100, names
    unique."""
    out = [s.model_copy() for s in (stages or list(DEFAULT_STAGES))]
    if not out:
        raise ValueError("a rollout needs at least one stage")
    for i, s in enumerate(out):
        if i and s.percent < out[i - 1].percent:
            raise ValueError(f"stage percents must not decrease ({out[i - 1].percent} -> "
                             f"{s.percent}): cohorts only grow")
        serving = next((p for p in out[:i] if p.mode == "serve"), None)
        if s.mode == "shadow" and serving is not None:
            label = f"stages[{i}]" + (f" ({s.name!r})" if s.name else "")
            raise ValueError(f"{label} shadows at {s.percent:g} % after stage "
                             f"{serving.name!r} served the model: "
                             "devices that serve it would go back to shadowing it; put every "
                             "shadow stage before the first serving one")
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
    """What the heartbeats of a stage's cohort say about the new model.

    ``error_rate``, ``p95_latency_ms`` and ``shadow_f1`` are the values the cohort is judged
    by: the (k+1)-th worst device's, k = ``tolerated_failing_devices`` (None while fewer
    devices reported one). ``heartbeats``/``frames``/``errors`` are the counted totals.
    """

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
    devices_failing: int = 0
    tolerated_failing_devices: int = 0
    failing_devices: list[str] = Field(
        default=[], description=f"Ids of the failing devices (at most {MAX_LISTED_DEVICES}).")
    heartbeats_ignored: int = Field(
        default=0, description="Implausible (stored before the checks) or beyond a burst.")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _weighted_quantile(pairs: list[tuple[float, float]], q: float) -> float | None:
    """Smallest value whose cumulative weight reaches ``q`` of the total (nearest rank)."""
    pairs = sorted((v, w) for v, w in pairs if w > 0)
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= q * total * (1 - 1e-12):
            return v
    return pairs[-1][0]


def tolerated_failing_devices(cohort_size: int) -> int:
    """How many failing devices a cohort of ``cohort_size`` absorbs: ``floor(10 %)``.

    The cohort is judged by its 90th-percentile device (nearest rank), so below 10 devices
    the worst device decides, 10-19 tolerate one, 20-29 two... Why this rule:

    * Per device, never fleet-wide sums: a device's numbers describe that device only, so
      one lying device cannot dilute the others' errors or latencies (its own good or absurd
      numbers make at most one healthy device).
    * By the cohort's *size*, not by how many devices reported: a device cannot raise the
      tolerance by reporting (nor lower it by staying silent); it is fixed when the stage
      begins.
    * 10 %: edge devices fail for reasons that are not the model (a hot enclosure, a bad
      link, a camera glitch). One such device in ten must not roll back a healthy model; a
      model that breaks more than one device in ten is not fit for the fleet. A tiny cohort
      has no device to spare, so its worst device decides.
    """
    return math.floor(cohort_size * FAILING_DEVICE_SHARE)


@dataclass
class _DeviceHealth:
    """One device's counted heartbeats about the new model in the stage."""

    heartbeats: int = 0
    frames: float = 0.0
    errors: float = 0.0
    vouched_frames: float = 0.0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (P95, frames)
    f1: list[tuple[float, float]] = field(default_factory=list)  # (agreement F1, frames)
    last_at: datetime | None = None
    tokens: float = HEALTH_BURST

    def admit(self, at: datetime | None, since: datetime, frames: float) -> float | None:
        """The weight (frames) a heartbeat received at ``at`` counts with; None: a burst.

        Gateway time, which no device controls: a token bucket of ``HEALTH_BURST``
        heartbeats refilled one per ``HEALTH_REFILL_S``, and at most ``HEARTBEAT_MAX_FPS``
        frames per second since the device's previous heartbeat (plus ``FRAME_GRACE_S``).
        Without ``at`` (a caller with no receive times) every heartbeat counts as sent."""
        if at is None:
            return frames
        gap = max(0.0, (at - (self.last_at or since)).total_seconds())
        self.last_at = at
        self.tokens = min(float(HEALTH_BURST), self.tokens + gap / HEALTH_REFILL_S)
        if self.tokens < 1:
            return None
        self.tokens -= 1
        return min(frames, HEARTBEAT_MAX_FPS * (gap + FRAME_GRACE_S))

    def add(self, frames: float, weight: float, errors: float, latency: float | None,
            f1: float | None) -> None:
        self.heartbeats += 1
        self.frames += weight
        self.errors += (errors * weight / frames) if frames else 0.0
        if self.heartbeats >= HEARTBEATS_TO_VOUCH and weight > 0:  # an empty window: nothing
            self.vouched_frames += weight
        if latency is not None and weight > 0:
            self.latencies.append((latency, weight))
        if f1 is not None and weight > 0:
            self.f1.append((f1, weight))

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.frames if self.frames > 0 else None

    @property
    def p95_latency_ms(self) -> float | None:
        """Frame-weighted 95th percentile of the windows' P95s: a burst of windows with few
        (or clipped) frames cannot hide slow ones that carry the device's real traffic."""
        return _weighted_quantile(self.latencies, 0.95)

    @property
    def f1_frames(self) -> float:
        return sum(w for _, w in self.f1)

    @property
    def shadow_f1(self) -> float | None:
        total = self.f1_frames
        return sum(v * w for v, w in self.f1) / total if total > 0 else None


def _text(value: Any) -> str | None:
    """``value`` when it is a string: a stored payload is JSON as the agent sent it (rows from
    before the plausibility checks included), and a list is not hashable."""
    return value if isinstance(value, str) else None


def _sample(p: dict[str, Any], stage: Stage, rollout_id: str, model_ids: set[str]) -> tuple[float, float, float | None, float | None] | None:
    """``(frames, errors, P95 latency, shadow F1)`` of a heartbeat about the new model."""
    if stage.mode == "shadow":
        sh = p.get("shadow")
        if not isinstance(sh, dict):
            return None
        if _text(sh.get("model_version")) not in model_ids and p.get("rollout_id") != rollout_id:
            return None
        return (_num(sh.get("frames")) or 0.0, _num(sh.get("errors")) or 0.0,
                _num(sh.get("latency_p95_ms")), _num(sh.get("agreement_f1")))
    if p.get("update_status") in FAILED_UPDATE_STATUSES:
        return None
    on_new = (_text(p.get("model_version")) in model_ids
              or (p.get("rollout_id") == rollout_id
                  and p.get("update_status") in (None, "serving")))
    if not on_new:
        return None
    lat = _num(p.get("latency_p95_ms"))
    if lat is None and isinstance(p.get("latency_ms"), dict):
        lat = _num(p["latency_ms"].get("p95"))
    return (_num(p.get("frames_processed")) or 0.0, _num(p.get("errors")) or 0.0, lat, None)


def _kth(values: list[float], k: int, worst_first: bool) -> float | None:
    ordered = sorted(values, reverse=worst_first)
    return ordered[k] if len(ordered) > k else None


def stage_health(
    *,
    rollout_id: str,
    model_ids: set[str],
    stage: Stage,
    since: datetime,
    now: datetime,
    cohort: set[str],
    heartbeats: list[tuple[str, dict[str, Any]]] | list[tuple[str, dict[str, Any], datetime]],
    failure_reports: list[tuple[str, dict[str, Any]]],
    budgets: Budgets,
) -> StageHealth:
    """Health of one stage from ``(device_id, payload[, received_at])`` heartbeats received
    since it began, in the order received.

    Only heartbeats about the new model count: in a serve stage those whose ``rollout_id``
    is this rollout's (or whose ``model_version`` is the new model's version or SHA-256); in
    the shadow stage the ``shadow`` block. ``failure_reports`` are each device's latest
    report about this rollout (any stage; ``fleet.rollout_db.compute_health``): one counts
    when it is ``rolled_back``/``rejected`` and comes from a cohort device — a device outside
    the cohort was never sent the manifest, so its report is not evidence about the model.

    Each cohort device is judged on its own heartbeats (``_DeviceHealth``: frame-weighted
    error rate, P95 and shadow F1; bursts and frames beyond the gateway clock do not count);
    a device fails on any budget or on its failure report, and the stage fails when more
    devices fail than ``tolerated_failing_devices(cohort size)``.
    """
    devices: dict[str, _DeviceHealth] = {}
    ignored = 0
    for item in heartbeats:
        device_id, p = item[0], item[1]
        if device_id not in cohort:
            continue
        sample = _sample(p, stage, rollout_id, model_ids)
        if sample is None:
            continue
        if heartbeat_problems(p):  # stored before the route checked plausibility
            ignored += 1
            continue
        frames, errors, lat, f1 = sample
        dev = devices.setdefault(device_id, _DeviceHealth())
        weight = dev.admit(item[2] if len(item) > 2 else None, since, frames)  # type: ignore[misc]
        if weight is None:
            ignored += 1
            continue
        dev.add(frames, weight, errors, lat, f1)

    failing: dict[str, list[str]] = {}
    for device_id, p in failure_reports:
        if device_id not in cohort or p.get("update_status") not in FAILED_UPDATE_STATUSES:
            continue
        failing.setdefault(device_id, []).append(
            f"device {device_id} reported {p.get('update_status')}: "
            f"{p.get('update_reason') or 'no reason given'}")
    for device_id, dev in sorted(devices.items()):
        why = []
        rate, p95, f1 = dev.error_rate, dev.p95_latency_ms, dev.shadow_f1
        if rate is not None and dev.errors > 0 and rate > budgets.max_error_rate:
            why.append(f"device {device_id}: error rate {rate:.2%} > "
                       f"{budgets.max_error_rate:.2%} ({dev.errors:.0f} errors / "
                       f"{dev.frames:.0f} frames)")
        if p95 is not None and p95 > budgets.p95_latency_budget_ms:
            why.append(f"device {device_id}: P95 latency {p95:.1f} ms > budget "
                       f"{budgets.p95_latency_budget_ms:g} ms")
        if (stage.mode == "shadow" and f1 is not None and dev.f1_frames >= budgets.min_frames
                and f1 < budgets.min_shadow_f1):
            why.append(f"device {device_id}: shadow agreement F1 {f1:.3f} < floor "
                       f"{budgets.min_shadow_f1:g}")
        if why:
            failing.setdefault(device_id, []).extend(why)

    tolerated = tolerated_failing_devices(len(cohort))
    rates = [r for d in devices.values() if (r := d.error_rate) is not None]
    p95s = [v for d in devices.values() if (v := d.p95_latency_ms) is not None]
    f1s = [v for d in devices.values() if (v := d.shadow_f1) is not None]
    error_rate = _kth(rates, tolerated, worst_first=True)
    p95 = _kth(p95s, tolerated, worst_first=True)
    shadow_f1 = _kth(f1s, tolerated, worst_first=False)
    reporting = [d for d in devices.values() if d.heartbeats >= HEARTBEATS_TO_VOUCH
                 and d.vouched_frames > 0]
    vouched_frames = sum(d.vouched_frames for d in devices.values())
    needed = max(1, math.ceil(budgets.min_reporting_fraction * len(cohort))) if cohort else 1
    reasons: list[str] = []
    if len(failing) > tolerated:
        verdict: Literal["pass", "fail", "insufficient"] = "fail"
        listed = list(failing.items())[:MAX_LISTED_DEVICES]
        reasons = [r for _, why in listed for r in why]
        more = len(failing) - len(listed)
        reasons.append(f"{len(failing)} of {len(cohort)} cohort devices fail "
                       f"({tolerated} tolerated)" + (f"; {more} more not listed" if more else ""))
    else:
        if len(reporting) < needed:
            reasons.append(f"{len(reporting)}/{needed} cohort devices reported "
                           f"{HEARTBEATS_TO_VOUCH}+ heartbeats on the new model")
        if vouched_frames < budgets.min_frames:
            reasons.append(f"{vouched_frames:.0f}/{budgets.min_frames} frames after each "
                           "device's first window on the new model")
        if stage.mode == "shadow" and not f1s:
            reasons.append("no shadow agreement reported yet")
        verdict = "insufficient" if reasons else "pass"
    return StageHealth(
        stage=stage.name, mode=stage.mode, percent=stage.percent, since=since, evaluated_at=now,
        cohort_size=len(cohort), devices_reporting=len(reporting), devices_needed=needed,
        heartbeats=sum(d.heartbeats for d in devices.values()),
        frames=round(sum(d.frames for d in devices.values())),
        errors=round(sum(d.errors for d in devices.values())),
        error_rate=round(error_rate, 6) if error_rate is not None else None,
        p95_latency_ms=round(p95, 3) if p95 is not None else None,
        shadow_f1=round(shadow_f1, 4) if shadow_f1 is not None else None,
        verdict=verdict, reasons=reasons, devices_failing=len(failing),
        tolerated_failing_devices=tolerated, failing_devices=list(failing)[:MAX_LISTED_DEVICES],
        heartbeats_ignored=ignored,
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
