"""Rollout health under hostile or broken devices: judged per device, from plausible numbers.

One device lying (perfect, absurd or bursty numbers) must not save a failing canary; one
flaky device must not roll back a healthy rollout once the cohort is large enough; an
implausible heartbeat is refused with 422 and not stored. Policy-level tests call
``stage_health`` with receive times; gateway-level tests go through the API (``TestClient``,
the gateway's clock moved by hand) like ``tests/test_rollouts.py``.
"""
# ruff: noqa: F811

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from fleet.config import HEARTBEAT_MAX_FPS
from fleet.db import HeartbeatRow
from fleet.heartbeat_plausibility import heartbeat_problems
from fleet.rollout_policy import (
    FRAME_GRACE_S,
    Budgets,
    Stage,
    stage_health,
    tolerated_failing_devices,
)

# ``env`` is tests/test_rollouts.py's gateway fixture, shared (hence F811 on its parameters).
from tests.test_rollouts import T0, Env, env, serving, shadowing  # noqa: F401

BUDGETS = Budgets(max_error_rate=0.01, p95_latency_budget_ms=250, min_shadow_f1=0.5,
                  min_reporting_fraction=0.8, min_frames=10, min_cohort_devices=1)
CANARY = Stage(name="canary", percent=5)


def hb(**over: Any) -> dict[str, Any]:
    """A plausible 30 s window on the new model (version "7", rollout "ro-1")."""
    return {"rollout_id": "ro-1", "update_status": "serving", "model_version": "7",
            "window_s": 30.0, "frames_processed": 300, "errors": 0, "latency_p50_ms": 20.0,
            "latency_p95_ms": 40.0, **over}


BAD = {"frames_processed": 300, "errors": 150, "latency_p50_ms": 400.0,
       "latency_p95_ms": 900.0}  # 50 % errors, 900 ms P95


def health(heartbeats: list[tuple[Any, ...]], cohort: set[str], **kw: Any) -> Any:
    return stage_health(rollout_id="ro-1", model_ids={"7"}, stage=kw.pop("stage", CANARY),
                        since=T0, now=T0 + timedelta(hours=1), cohort=cohort,
                        heartbeats=heartbeats, failure_reports=kw.pop("failure_reports", []),
                        budgets=kw.pop("budgets", BUDGETS))


def windows(device: str, n: int, start_s: float, every_s: float, **over: Any
            ) -> list[tuple[str, dict[str, Any], Any]]:
    """``n`` heartbeats of ``device`` received ``every_s`` apart from ``T0 + start_s``."""
    return [(device, hb(**over), T0 + timedelta(seconds=start_s + i * every_s))
            for i in range(n)]


# =========================================================================== policy
def test_tolerance_is_the_worst_device_below_ten_then_ten_percent() -> None:
    assert [tolerated_failing_devices(n) for n in (0, 1, 2, 9, 10, 19, 20, 100)] == \
        [0, 0, 0, 0, 1, 1, 2, 10]


def test_a_lying_device_cannot_dilute_a_failing_one() -> None:
    bad = windows("a", 2, 30, 30, **BAD)
    liars = {
        "perfect": windows("b", 2, 30, 30, latency_p50_ms=1.0, latency_p95_ms=1.0),
        # plausible for a 30 s window, 100x the honest device's traffic, all perfect
        "huge": windows("b", 2, 30, 30, frames_processed=30_000, latency_p50_ms=0.5,
                        latency_p95_ms=0.5),
        # a burst of tiny-latency windows in one second
        "burst": windows("b", 60, 30, 0.01, latency_p50_ms=0.1, latency_p95_ms=0.1),
        # stored before plausibility was checked: skipped, never summed
        "negative": windows("b", 2, 30, 30, errors=-10_000_000, frames_processed=30_000),
    }
    for name, lies in liars.items():
        h = health(sorted(bad + lies, key=lambda x: x[2]), {"a", "b"})
        assert h.verdict == "fail", name
        assert h.failing_devices == ["a"], name
        assert any("device a: error rate 50.00%" in r for r in h.reasons), (name, h.reasons)
        assert any("device a: P95 latency 900.0 ms" in r for r in h.reasons), (name, h.reasons)
        assert h.error_rate == 0.5 and h.p95_latency_ms == 900.0, name  # the worst device
    assert health(sorted(bad + liars["negative"], key=lambda x: x[2]),
                  {"a", "b"}).heartbeats_ignored == 2


def test_a_burst_does_not_outweigh_a_devices_real_history() -> None:
    real = windows("a", 2, 30, 30, **BAD)
    good = {"latency_p50_ms": 1.0, "latency_p95_ms": 1.0}
    burst = windows("a", 100, 60.001, 0.001, **good)  # 100 perfect windows in 0.1 s
    h = health(real + burst, {"a"})
    assert h.verdict == "fail" and h.heartbeats_ignored >= 95
    assert h.error_rate is not None and h.error_rate > 0.2
    # Windows of absurd (but individually plausible) size right behind the real ones weigh
    # only what the gateway's clock allows.
    fat = windows("a", 2, 60.001, 0.001, frames_processed=30_000, **good)
    assert health(real + fat, {"a"}).verdict == "fail"
    # Control: the same 100 good windows as real history, 30 s apart, do outweigh one bad
    # window — the rule is about time, not about counting heartbeats.
    history = windows("a", 1, 30, 30, **BAD) + windows("a", 100, 60, 30, **good)
    recovered = health(history, {"a"})
    assert recovered.verdict == "pass", recovered.reasons


def test_frames_weigh_at_most_what_the_gateway_clock_allows() -> None:
    # Windows claiming 30 000 frames (plausible for 30 s) received 10 s after the stage began,
    # then 0.5 s later: each weighs at most HEARTBEAT_MAX_FPS x (the gap + the grace).
    h = health(windows("a", 2, 10, 0.5, frames_processed=30_000), {"a"})
    assert h.frames == round(HEARTBEAT_MAX_FPS * (10 + FRAME_GRACE_S)
                             + HEARTBEAT_MAX_FPS * (0.5 + FRAME_GRACE_S))
    assert health(windows("a", 2, 3600, 3600, frames_processed=30_000), {"a"}).frames == 60_000


@pytest.mark.parametrize(("cohort_size", "flaky", "verdict"), [
    (10, 1, "pass"),   # one flaky device in ten is absorbed
    (10, 2, "fail"),   # two are not
    (9, 1, "fail"),    # a tiny cohort: the worst device decides
    (25, 2, "pass"),
    (25, 3, "fail"),
])
def test_flaky_devices_against_cohort_size(cohort_size: int, flaky: int, verdict: str) -> None:
    devices = [f"d{i:02d}" for i in range(cohort_size)]
    beats: list[tuple[str, dict[str, Any], Any]] = []
    for i, d in enumerate(devices):
        beats += windows(d, 3, 30 + i * 0.01, 30, **(BAD if i < flaky else {}))
    h = health(sorted(beats, key=lambda x: x[2]), set(devices))
    assert h.verdict == verdict, h.reasons
    assert h.devices_failing == flaky
    assert h.tolerated_failing_devices == cohort_size // 10


def test_failure_reports_count_as_failing_devices() -> None:
    devices = {f"d{i}" for i in range(10)}
    beats = [b for d in sorted(devices) for b in windows(d, 2, 30, 30)]
    one = [("d0", {"update_status": "rolled_back", "update_reason": "guard: P95 over limit"})]
    assert health(beats, devices, failure_reports=one).verdict == "pass"
    two = [*one, ("d1", {"update_status": "rejected", "update_reason": "hash mismatch"})]
    h = health(beats, devices, failure_reports=two)
    assert h.verdict == "fail" and "hash mismatch" in "; ".join(h.reasons)
    assert health(beats, {"d0"}, failure_reports=one).verdict == "fail"  # tiny cohort


def test_shadow_agreement_is_judged_per_device() -> None:
    shadow = Stage(name="shadow", percent=5, mode="shadow")

    def sh(f1: float, frames: int) -> dict[str, Any]:
        return {"model_version": "6", "window_s": 30.0, "frames_processed": 300,
                "shadow": {"model_version": "7", "agreement_f1": f1, "frames": frames,
                           "errors": 0, "latency_p95_ms": 50.0}}

    beats = [("a", sh(0.1, 30), T0 + timedelta(seconds=30)),
             ("a", sh(0.1, 30), T0 + timedelta(seconds=60)),
             ("b", sh(1.0, 30_000), T0 + timedelta(seconds=30)),
             ("b", sh(1.0, 30_000), T0 + timedelta(seconds=60))]
    h = health(sorted(beats, key=lambda x: x[2]), {"a", "b"}, stage=shadow)
    assert h.verdict == "fail" and h.failing_devices == ["a"]
    assert any("shadow agreement" in r for r in h.reasons)


# =========================================================================== plausibility
@pytest.mark.parametrize(("over", "field"), [
    ({"errors": -1}, "errors"),
    ({"frames_processed": -5}, "frames_processed"),
    ({"frames_processed": 10, "errors": 11}, "errors"),
    ({"errors": 3}, "errors"),  # frames_processed absent: 0
    ({"error_count": 3, "frames_processed": 1}, "error_count"),
    ({"frames_processed": 30_002, "window_s": 30}, "frames_processed"),
    ({"frames_processed": 10**12}, "frames_processed"),  # no window: the longest bounds it
    ({"frames_processed": True}, "frames_processed"),
    ({"frames_processed": 10.5}, "frames_processed"),
    ({"frames_processed": "10"}, "frames_processed"),
    ({"dropped_frames": -1}, "dropped_frames"),
    ({"outbox_depth": 2**40}, "outbox_depth"),
    ({"window_s": -1}, "window_s"),
    ({"window_s": 86_400}, "window_s"),
    ({"fps": 1e6, "window_s": 30}, "fps"),
    ({"frames_per_s": -5.0}, "frames_per_s"),  # the other name of the fps column
    ({"frames_per_s": 1e14}, "frames_per_s"),
    ({"latency_p95_ms": -3.0}, "latency_p95_ms"),
    ({"latency_p50_ms": 50.0, "latency_p95_ms": 40.0}, "latency_p50_ms"),
    ({"latency_p95_ms": 50.0, "latency_p99_ms": 40.0}, "latency_p95_ms"),
    ({"latency_ms": {"p50": 30.0, "p95": 10.0}}, "latency_ms.p50"),
    ({"latency_ms": {"p95": 1e12}}, "latency_ms.p95"),
    ({"latency_ms": 5}, "latency_ms"),
    ({"shadow": {"frames": 0, "errors": 4}}, "shadow.errors"),
    ({"shadow": {"frames": -1}}, "shadow.frames"),
    ({"shadow": {"frames": 10, "agreement_f1": 1.5}}, "shadow.agreement_f1"),
    ({"shadow": {"frames": 10, "latency_p95_ms": -1}}, "shadow.latency_p95_ms"),
    ({"shadow": "fast"}, "shadow"),
])
def test_implausible_heartbeats_are_named(over: dict[str, Any], field: str) -> None:
    problems = heartbeat_problems(over)
    assert problems and problems[0].startswith(field + " "), problems


def test_plausible_heartbeats_pass_including_the_bounds() -> None:
    for ok in ({}, hb(), hb(frames_processed=30_001, window_s=30.0, fps=1000.0),
               hb(frames_processed=0, errors=0, latency_p50_ms=None, latency_p95_ms=None),
               hb(frames_processed=5, errors=5), {"latency_ms": {"p50": 20.0, "p95": 41.0}},
               {"errors": 0, "fps": 9.5}, {"shadow": None}, hb(window_s=0.0, frames_processed=1),
               {"shadow": {"frames": 4, "errors": 4, "agreement_f1": None, "tp": 0}}):
        assert heartbeat_problems(ok) == [], ok


# =========================================================================== gateway
def canary(env: Env, devices: int, cohort: int) -> tuple[str, list[dict[str, Any]]]:
    """A serving canary over ``cohort`` devices (of ``devices`` enrolled) and its cohort."""
    env.enroll(devices)
    pct = 100 * cohort / devices
    ro = env.rollout("7", hold=60, stages=[{"name": "canary", "percent": pct},
                                           {"name": "100%", "percent": 100}],
                     budgets={"min_cohort_devices": cohort})
    members = env.cohort(ro)
    assert len(members) >= cohort
    return ro["rollout_id"], members


def post_heartbeat(env: Env, dev: dict[str, Any], body: dict[str, Any] | bytes) -> Any:
    if isinstance(body, bytes):
        return env.client.post("/v1/heartbeats", content=body, headers={
            "Authorization": f"Bearer {dev['access_token']}",
            "Content-Type": "application/json"})
    return env.post("/v1/heartbeats", dev["access_token"], json=body)


def stored(env: Env, dev: dict[str, Any]) -> list[dict[str, Any]]:
    r = env.get(f"/v1/cameras/{dev['camera_id']}/heartbeats", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()


def envelope(env: Env, dev: dict[str, Any], **payload: Any) -> dict[str, Any]:
    env.clock.advance(0.001)
    return {"schema_version": 1, "camera_id": dev["camera_id"],
            "sent_at": env.clock.now.isoformat(), **payload}


def test_lying_device_cannot_save_a_failing_canary(env: Env) -> None:
    rid, (bad, liar, *_) = canary(env, devices=6, cohort=2)
    for _ in range(2):
        env.heartbeat(bad, **serving(rid, "7", window_s=30.0, frames_processed=300,
                                     errors=150, latency_p95_ms=900.0))
    implausible = [
        {"errors": -500}, {"errors": 10_000, "frames_processed": 300},
        {"frames_processed": 10**9, "window_s": 30.0}, {"frames_processed": -1},
        {"latency_p50_ms": 5.0, "latency_p95_ms": 1.0},
    ]
    for lie in implausible:
        r = post_heartbeat(env, liar, envelope(env, liar, **serving(rid, "7", **lie)))
        assert r.status_code == 422, (lie, r.text)
        assert next(iter(lie)) in r.json()["detail"], r.json()
    assert stored(env, liar) == []
    for _ in range(2):  # perfect, plausible, many frames: its own good numbers only
        env.heartbeat(liar, **serving(rid, "7", window_s=30.0, frames_processed=30_000,
                                      latency_p95_ms=0.5))
    out = env.evaluate(rid)
    assert out["decision"] == "rollback" and out["status"] == "rolled_back", out["health"]
    reason = out["rollout"]["reason"]
    assert f"device {bad['device_id']}: error rate 50.00%" in reason
    assert f"device {bad['device_id']}: P95 latency 900.0 ms" in reason
    assert out["health"]["failing_devices"] == [bad["device_id"]]


def test_burst_of_tiny_latency_heartbeats_does_not_save_a_canary(env: Env) -> None:
    rid, (bad, other, *_) = canary(env, devices=6, cohort=2)
    env.heartbeat(bad, **serving(rid, "7", window_s=30.0, frames_processed=300, errors=150,
                                 latency_p95_ms=900.0))
    for dev in (bad, other):  # both devices burst: 40 perfect heartbeats each, ms apart
        for _ in range(40):
            env.heartbeat(dev, **serving(rid, "7", window_s=30.0, frames_processed=300,
                                         latency_p95_ms=0.1))
    out = env.evaluate(rid)
    assert out["decision"] == "rollback", out["health"]
    assert out["health"]["failing_devices"] == [bad["device_id"]]
    assert out["health"]["heartbeats_ignored"] >= 70
    assert len(stored(env, bad)) == 41  # stored, only not counted for health


@pytest.mark.parametrize(("flaky", "decision"), [(1, "advance"), (2, "rollback")])
def test_one_flaky_device_does_not_roll_back_a_healthy_cohort(env: Env, flaky: int,
                                                              decision: str) -> None:
    rid, members = canary(env, devices=12, cohort=10)
    assert len(members) < 20  # one failing device tolerated, not two
    for _ in range(2):
        for i, d in enumerate(members):
            env.clock.advance(1.0)
            if i < flaky:
                env.heartbeat(d, **serving(rid, "7", window_s=30.0, frames_processed=300,
                                           errors=90, latency_p95_ms=900.0))
            else:
                env.heartbeat(d, **serving(rid, "7", window_s=30.0, frames_processed=300))
    env.clock.advance(61)
    out = env.evaluate(rid)
    assert out["decision"] == decision, out["health"]
    assert out["health"]["devices_failing"] == flaky
    assert out["health"]["tolerated_failing_devices"] == 1


IMPLAUSIBLE = [
    ({"errors": -1, "frames_processed": 10}, "errors"),
    ({"frames_processed": -10}, "frames_processed"),
    ({"frames_processed": 10, "errors": 20}, "errors"),
    ({"frames_processed": 100_000, "window_s": 30.0}, "frames_processed"),
    ({"frames_processed": 10**30}, "frames_processed"),
    ({"window_s": 1e9}, "window_s"),
    ({"dropped_frames": -3}, "dropped_frames"),
    ({"latency_ms": {"p50": 90.0, "p95": 10.0}}, "latency_ms.p50"),
    ({"latency_p95_ms": -1.0}, "latency_p95_ms"),
    ({"shadow": {"frames": 5, "errors": 9}}, "shadow.errors"),
    ({"frames_per_s": -5.0}, "frames_per_s"),  # was stored in the fps column and exported
]


@pytest.mark.parametrize(("bad_numbers", "field"), IMPLAUSIBLE)
def test_implausible_heartbeat_is_refused_and_not_stored(env: Env, bad_numbers: dict[str, Any],
                                                          field: str) -> None:
    (dev,) = env.enroll(1)
    r = post_heartbeat(env, dev, envelope(env, dev, model_version="7", **bad_numbers))
    assert r.status_code == 422 and field in r.json()["detail"], r.text
    assert stored(env, dev) == []
    assert env.get("/v1/devices").json()[0]["last_seen_at"] is None


def test_non_finite_latency_in_raw_json_is_refused(env: Env) -> None:
    (dev,) = env.enroll(1)
    body = envelope(env, dev, model_version="7", frames_processed=10)
    raw = json.dumps(body)[:-1] + ', "latency_p95_ms": NaN}'
    r = post_heartbeat(env, dev, raw.encode())
    # Refused as the body is parsed (fleet.bodies: JSON has no NaN), before any schema.
    assert r.status_code == 422 and "NaN" in r.json()["detail"], r.text
    assert stored(env, dev) == []


def test_implausible_rows_already_stored_are_skipped(env: Env) -> None:
    """Rows written before the checks existed: health ignores them instead of summing."""
    rid, (bad, liar, *_) = canary(env, devices=6, cohort=2)
    for _ in range(2):
        env.heartbeat(bad, **serving(rid, "7", window_s=30.0, frames_processed=300,
                                     errors=150, latency_p95_ms=900.0))
    gw = env.client.app.state.gateway  # type: ignore[attr-defined]
    with gw.db.write() as s:
        for i in range(2):
            payload = serving(rid, "7", frames_processed=10**7, errors=-(10**6),
                              latency_p95_ms=-1.0)
            s.add(HeartbeatRow(camera_id=liar["camera_id"], device_id=liar["device_id"],
                               sent_at=env.clock.now + timedelta(seconds=i),
                               received_at=env.clock.now + timedelta(seconds=i),
                               schema_version=1, model_version="7", payload=payload))
        s.commit()
    env.clock.advance(5)
    out = env.evaluate(rid)
    assert out["decision"] == "rollback" and out["health"]["heartbeats_ignored"] == 2


# =========================================================================== honest agents
def test_an_honest_agents_heartbeats_pass_the_checks_even_when_everything_fails() -> None:
    """A model failing on every frame, rejected uploads in an idle window, a crashing shadow
    candidate: the agent's heartbeats still describe what happened and are accepted, so the
    failure reaches rollout health instead of a 422."""
    import numpy as np

    from edge_agent.heartbeat import TelemetryWindow
    from edge_agent.shadow import ShadowRunner

    class Crashing:
        def detect(self, image: Any) -> list[Any]:
            raise RuntimeError("candidate crashed")

    tw = TelemetryWindow("cam-1", "a" * 64, ["car"])
    tw._start -= 30.0  # a 30 s window
    for _ in range(5):
        tw.record_frame_error()
    tw.record_error(3)  # rejected uploads / heartbeats: not frames
    shadow = ShadowRunner(Crashing(), model_version="b" * 64, sample_rate=1.0, background=False)
    for _ in range(4):
        shadow.offer(np.zeros((8, 8, 3), np.uint8), [])
    beat = tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0,
                    rollout={"shadow": shadow.take_window()}).to_dict()
    assert (beat["frames_processed"], beat["errors"], beat["other_errors"]) == (5, 5, 3)
    assert (beat["shadow"]["frames"], beat["shadow"]["errors"]) == (4, 4)
    assert beat["shadow"]["agreement_f1"] is None
    assert heartbeat_problems(beat) == []
    idle = tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0).to_dict()
    tw.record_error()  # e.g. the previous heartbeat was refused: the next is still plausible
    assert heartbeat_problems(idle) == []
    assert heartbeat_problems(
        tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0).to_dict()) == []
    h = health([("d", {**beat, "model_version": "7", "rollout_id": "ro-1",
                       "update_status": "serving"}, T0 + timedelta(seconds=30))], {"d"})
    assert h.verdict == "fail" and h.error_rate == 1.0


# =========================================================================== failure reports
def test_only_cohort_devices_final_refusals_count() -> None:
    devices = {"d0", "d1"}
    beats = [b for d in sorted(devices) for b in windows(d, 2, 30, 30)]
    outsider = [("zz", {"update_status": "rejected", "update_reason": "made up"})]
    assert health(beats, devices, failure_reports=outsider).verdict == "pass"
    retrying = [("d0", {"update_status": "retrying", "update_reason": "sha256 mismatch "
                        "(attempt 1 of 3; retried on the next poll)"})]
    assert health(beats, devices, failure_reports=retrying).verdict == "pass"


def test_a_device_outside_the_cohort_cannot_roll_a_rollout_back(env: Env) -> None:
    env.enroll(20)
    ro = env.rollout("9", hold=60)
    rid = ro["rollout_id"]
    cohort = env.cohort(ro)
    ids = {d["device_id"] for d in cohort}
    outsider = next(d for d in env.devices if d["device_id"] not in ids)
    env.heartbeat(outsider, rollout_id=rid, update_status="rejected", update_reason="made up",
                  frames_processed=10, errors=0)
    for d in cohort:  # the real cohort is healthy
        for _ in range(3):
            env.clock.advance(30)
            env.heartbeat(d, **shadowing(rid, "9"))
    env.clock.advance(61)
    out = env.evaluate(rid)
    assert out["decision"] == "advance", out["health"]
    assert out["health"]["devices_failing"] == 0


@pytest.mark.parametrize(("then", "decision"), [
    ("serving", "advance"),  # an older agent's retried corrupt transfer: it recovered
    ("retrying", "hold"),  # a newer agent's retry: not a failure, not on the new model yet
    ("rejected", "rollback"),  # refused for good: its latest report says so
])
def test_a_device_is_judged_by_its_latest_report(env: Env, then: str, decision: str) -> None:
    # Cohorts are drawn by device-id hash: at 25 % of 4 devices it may hold more than one.
    # The others serve the new model healthily, so the verdict is ``dev``'s alone.
    rid, (dev, *others) = canary(env, devices=4, cohort=1)
    env.clock.advance(1)
    env.heartbeat(dev, model_version="old", rollout_id=rid, update_status="rejected",
                  update_reason="sha256 mismatch: the downloaded file hashes to 03fc…",
                  window_s=30.0, frames_processed=300)
    for _ in range(3):
        env.clock.advance(30)
        for other in others:
            env.heartbeat(other, **serving(rid, "7", window_s=30.0, frames_processed=300))
        if then == "serving":
            env.heartbeat(dev, **serving(rid, "7", window_s=30.0, frames_processed=300))
        else:
            env.heartbeat(dev, model_version="old", rollout_id=rid, update_status=then,
                          update_reason="sha256 mismatch (attempt 2 of 3)", window_s=30.0,
                          frames_processed=300)
    env.clock.advance(61)
    out = env.evaluate(rid)
    assert out["decision"] == decision, out["health"]
