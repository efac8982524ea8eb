"""The drift sensors: which windows are closed, a camera_drift run per live camera × window,
and what drift_sensor does with camera_drift verdicts (sampling boost, focused review queue,
an owed learning_loop run)."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pytest
from pydantic import Field

from resources.fleet_resource import FleetError, FleetResource, FleetUnavailable
from roadloop.monitoring.windows import DRIFT_WINDOW_FORMAT
from roadloop.settings import get_settings
from sensors import drift as drift_sensors
from sensors.drift import MAX_WINDOWS_PER_TICK, closed_windows, drift_sensor, drift_window_sensor

# What each stub fleet was asked, by its probe name (a resource may be copied on its way into
# the sensor's context, so the calls are kept outside it).
CALLS: dict[str, list[dict[str, Any]]] = defaultdict(list)


class StubFleet(FleetResource):
    """The gateway as the sensors see it: live cameras and sampling boosts, recorded."""

    gateway_url: str = "http://gateway.invalid"
    probe: str = "fleet"
    cameras: list[str] = Field(default_factory=list)
    silent: dict[str, str | None] = Field(default_factory=dict)  # camera -> last seen (ISO)
    unreachable: bool = False
    boost_fails: bool = False

    def live_cameras(self) -> dict[str, datetime | None]:
        CALLS[self.probe].append({"call": "live_cameras"})
        if self.unreachable:
            raise FleetUnavailable("fleet gateway unreachable at http://gateway.invalid")
        heard_now = datetime.max.replace(tzinfo=UTC)  # whatever the test's clock says
        seen: dict[str, datetime | None] = dict.fromkeys(sorted(self.cameras), heard_now)
        for camera, last in self.silent.items():
            seen[camera] = datetime.fromisoformat(last) if last else None
        return seen

    def boost_sampling(self, camera_id: str, *, factor: float, until: datetime,
                       reason: str) -> dict[str, Any]:
        CALLS[self.probe].append({"call": "boost", "camera": camera_id, "factor": factor,
                                  "until": until, "reason": reason})
        if self.boost_fails:
            raise FleetError(f"POST /v1/cameras/{camera_id}/sampling -> 503: database busy")
        return {"camera_id": camera_id, "factor": factor, "until": until.isoformat()}


@pytest.fixture()
def probe(request: pytest.FixtureRequest) -> str:
    name = request.node.name
    CALLS.pop(name, None)
    return name


def boosts(probe: str) -> list[dict[str, Any]]:
    return [c for c in CALLS[probe] if c["call"] == "boost"]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The sensors' ``datetime.now``, moved by the test (starts at the real time: the
    instance stamps events with it)."""
    c = Clock(datetime.now(UTC))

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return c.now if tz is None else c.now.astimezone(tz)

    monkeypatch.setattr(drift_sensors, "datetime", FrozenDatetime)
    return c


@pytest.fixture()
def instance() -> dg.DagsterInstance:
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def key(window: datetime) -> str:
    return window.strftime(DRIFT_WINDOW_FORMAT)


# --------------------------------------------------------------------------- closed_windows
M15 = timedelta(minutes=15)
GRACE = timedelta(seconds=90)


def at(hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(2026, 11, 27, hh, mm, ss, tzinfo=UTC)


def test_a_window_closes_only_once_its_grace_has_passed() -> None:
    # 05:15-05:30 ends at 05:30; its last heartbeat may come until 05:31:30
    assert closed_windows(at(5, 31, 29), at(5, 0), 15, GRACE) == []
    assert closed_windows(at(5, 31, 30), at(5, 0), 15, GRACE) == [at(5, 15)]
    assert closed_windows(at(5, 44), at(5, 0), 15, timedelta(0)) == [at(5, 15)]
    assert closed_windows(at(5, 45), at(5, 0), 15, timedelta(0)) == [at(5, 15), at(5, 30)]


def test_closed_windows_follow_the_cursor_backfill_and_cap() -> None:
    now = at(5, 44)  # 05:15-05:30 closed at 05:31:30, 05:30-05:45 is open
    # the cursor is the last window asked for: the next ones follow it, once
    assert closed_windows(now, at(4, 30), 15, GRACE) == [at(4, 45), at(5, 0), at(5, 15)]
    assert closed_windows(now, at(5, 15), 15, GRACE) == []
    # no cursor: the last `backfill` closed windows, oldest first
    assert closed_windows(now, None, 15, GRACE) == [at(5, 0), at(5, 15)]
    assert closed_windows(now, None, 15, GRACE, backfill=4) == [
        at(4, 30), at(4, 45), at(5, 0), at(5, 15)]
    # a sensor that was off for two days catches up a few windows per tick, in order
    behind = closed_windows(now, at(5, 30) - timedelta(days=2), 15, GRACE)
    assert len(behind) == MAX_WINDOWS_PER_TICK
    assert behind[0] == at(5, 45) - timedelta(days=2) and behind[-1] - behind[0] == 7 * M15
    # hour windows
    assert closed_windows(at(8, 1, 30), None, 60, GRACE, backfill=1) == [at(7, 0)]


# --------------------------------------------------------------------------- drift_window_sensor


def window_tick(instance: dg.DagsterInstance, fleet: StubFleet, cursor: str | None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"fleet": fleet})
    return drift_window_sensor(ctx)


def test_window_sensor_requests_each_live_camera_and_closed_window_once(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    grace = timedelta(seconds=get_settings().drift_grace_s)
    minutes = get_settings().drift_window_minutes
    clock.now = at(5, 20) + grace  # windows 05:00 and earlier are closed
    expected = closed_windows(clock.now, None, minutes, grace)
    assert minutes != 15 or expected == [at(4, 45), at(5, 0)]
    instance.add_dynamic_partitions("cameras", ["cam-a"])
    fleet = StubFleet(probe=probe, cameras=["cam-b", "cam-a"])

    result = window_tick(instance, fleet, None)
    assert isinstance(result, dg.SensorResult)
    got = {(r.run_key, str(r.partition_key)) for r in result.run_requests}
    want = {(f"{c}|{key(w)}", f"{c}|{key(w)}") for c in ("cam-a", "cam-b") for w in expected}
    assert got == want
    for r in result.run_requests:
        camera, window = r.run_key.split("|")
        assert r.partition_key.keys_by_dimension == {"camera": camera, "window": window}
        assert r.tags == {"roadloop/drift_camera": camera, "roadloop/drift_window": window}
    # cam-b is new to the instance: the sensor adds it as a camera partition
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "cameras" and list(add.partition_keys) == ["cam-b"]
    assert result.cursor == expected[-1].isoformat()

    # every request names a partition of camera_drift_job's grid once cam-b is added
    instance.add_dynamic_partitions("cameras", ["cam-b"])
    from assets.partitions import drift_window_partitions
    from jobs import camera_drift_job

    assert camera_drift_job.partitions_def.partitions_defs[1].partitions_def is (
        drift_window_partitions)
    for r in result.run_requests:
        keys = r.partition_key.keys_by_dimension
        assert drift_window_partitions.has_partition_key(keys["window"])
        assert keys["camera"] in instance.get_dynamic_partitions("cameras")

    # the same tick again: nothing new closed
    again = window_tick(instance, fleet, result.cursor)
    assert isinstance(again, dg.SkipReason) and "no drift window closed" in again.skip_message

    # one window later: one request per camera, no partition to add
    clock.advance(minutes=minutes)
    nxt = window_tick(instance, fleet, result.cursor)
    assert isinstance(nxt, dg.SensorResult)
    w_next = expected[-1] + timedelta(minutes=minutes)
    assert sorted(r.run_key for r in nxt.run_requests) == [
        f"cam-a|{key(w_next)}", f"cam-b|{key(w_next)}"]
    assert nxt.dynamic_partitions_requests == []


def test_a_silent_camera_is_scored_once_then_left_alone(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    grace = timedelta(seconds=get_settings().drift_grace_s)
    minutes = get_settings().drift_window_minutes
    length = timedelta(minutes=minutes)
    clock.now = at(5, 20) + grace
    (w,) = closed_windows(clock.now, at(5, 0) - 2 * length, minutes, grace)[-1:]
    fleet = StubFleet(probe=probe, cameras=["cam-live"], silent={
        "cam-just-went-quiet": (w - length / 2).isoformat(),  # heard in the previous window
        "cam-unplugged": (w - 3 * length).isoformat(),  # its silent window was scored already
        "cam-never-seen": None,
    })
    result = window_tick(instance, fleet, (w - length).isoformat())
    assert isinstance(result, dg.SensorResult)
    assert sorted(r.run_key for r in result.run_requests) == [
        f"cam-just-went-quiet|{key(w)}", f"cam-live|{key(w)}"]


def test_window_sensor_waits_while_the_gateway_is_unreachable(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    minutes = get_settings().drift_window_minutes
    cursor = (at(5, 0) - timedelta(minutes=minutes)).isoformat()
    clock.now = at(5, 20) + timedelta(seconds=get_settings().drift_grace_s)
    down = window_tick(instance, StubFleet(probe=probe, unreachable=True), cursor)
    assert isinstance(down, dg.SkipReason)
    assert "gateway unavailable" in down.skip_message and "unreachable" in down.skip_message
    assert CALLS[probe] == [{"call": "live_cameras"}]

    # back up: the window that waited is asked for (the cursor did not move past it)
    up = window_tick(instance, StubFleet(probe=probe, cameras=["cam-a"]), cursor)
    assert isinstance(up, dg.SensorResult)
    assert [r.run_key for r in up.run_requests] == [f"cam-a|{key(at(5, 0))}"]


# --------------------------------------------------------------------------- drift_sensor


def report_drift(instance: dg.DagsterInstance, camera: str, window: datetime, verdict: str,
                 score: float = 0.0, metric: str = "brightness", reference_id: str = "ref0001",
                 threshold: float = 0.1) -> None:
    """A camera_drift materialization with the metadata assets/drift.py writes."""
    if camera not in instance.get_dynamic_partitions("cameras"):
        instance.add_dynamic_partitions("cameras", [camera])
    alarm = verdict in ("minor", "significant")
    partition = dg.MultiPartitionKey({"camera": camera, "window": key(window)})
    reference = {"reference_id": reference_id, "kind": "camera_windows",
                 "model_version": "model-a", "windows": 4} if reference_id else {}
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="camera_drift", partition=str(partition),
        metadata={
            "camera_id": camera,
            "window_start": window.isoformat(),
            "verdict": verdict,
            "alarm": alarm,
            "score": score if alarm else 0.0,
            "metric": metric if alarm else "",
            "threshold": threshold if alarm else 0.0,
            "drift_share": 0.5 if alarm else 0.0,
            "reason": "" if alarm else f"{verdict}: test",
            "model_version": "model-a",
            "reference_id": reference_id,
            "reference": dg.MetadataValue.json(reference),
            "reference_status": f"reference {reference_id}",
            "heartbeats": 30,
            "frames_embedded": 0,
            "events": 2 if alarm else 0,
            "metrics": dg.MetadataValue.md("| metric |\n|---|"),
            "verdict_json": dg.MetadataValue.path("/tmp/verdict.json"),
            "cpu_s": 0.5,
            f"score/{metric}": score,
        },
    ))


def drift_tick(instance: dg.DagsterInstance, fleet: StubFleet, cursor: str | None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"fleet": fleet})
    return drift_sensor(ctx)


class Ticker:
    """drift_sensor ticks that carry the cursor from one to the next."""

    def __init__(self, instance: dg.DagsterInstance, fleet: StubFleet) -> None:
        self.instance, self.fleet, self.cursor = instance, fleet, None

    def __call__(self) -> list[dg.RunRequest]:
        result = drift_tick(self.instance, self.fleet, self.cursor)
        if isinstance(result, dg.SkipReason):
            return []
        assert isinstance(result, dg.SensorResult)
        self.cursor = result.cursor
        return list(result.run_requests or [])

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.cursor) if self.cursor else {}


W = [at(3, 0) + i * M15 for i in range(40)]


def test_minor_drift_boosts_sampling_once_while_the_boost_lasts(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    s = get_settings()
    boost = timedelta(minutes=s.drift_boost_minutes)
    tick = Ticker(instance, StubFleet(probe=probe))
    start = clock.now

    report_drift(instance, "cam-a", W[0], "minor", 0.13)
    assert tick() == []
    (first,) = boosts(probe)
    assert first["camera"] == "cam-a" and first["factor"] == s.drift_boost_factor
    assert first["until"] == start + boost
    assert "brightness 0.130" in first["reason"] and W[0].isoformat() in first["reason"]

    # the drift persists, window after window: the boost is not written again while more
    # than half of it remains
    for i in range(1, 5):
        clock.now = start + boost / 2 * i / 4  # up to exactly half of the boost used
        report_drift(instance, "cam-a", W[i], "minor", 0.14)
        assert tick() == []
    assert len(boosts(probe)) == 1
    # once less than half remains, the next drifting window renews it
    clock.now = start + boost / 2 + timedelta(minutes=1)
    report_drift(instance, "cam-a", W[5], "minor", 0.12)
    assert tick() == []
    assert [b["until"] for b in boosts(probe)] == [start + boost, clock.now + boost]
    # a minor drift never queues reviews or owes a learning loop
    assert tick.state["fired"] == {} and tick.state["owed"] == {}


def test_significant_drift_queues_that_cameras_frames_then_cools_down(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    s = get_settings()
    tick = Ticker(instance, StubFleet(probe=probe))
    start = clock.now

    report_drift(instance, "cam-b", W[0], "minor", 0.11)  # another camera: boost only
    report_drift(instance, "cam-a", W[1], "significant", 0.3812, reference_id="refA")
    (req,) = tick()
    assert req.job_name == "review_queue"
    assert req.run_config == {"ops": {"frame_embeddings": {"config": {"cameras": ["cam-a"]}}}}
    assert req.run_key == f"drift-queue|cam-a|{W[1].isoformat()}"
    assert req.tags == {
        "roadloop/drift_camera": "cam-a", "roadloop/drift_window": W[1].isoformat(),
        "roadloop/drift_metric": "brightness", "roadloop/drift_score": "0.3812",
        "roadloop/drift_threshold": "0.1000", "roadloop/drift_reference": "refA",
        "roadloop/drift_verdict": "significant"}
    assert sorted(b["camera"] for b in boosts(probe)) == ["cam-a", "cam-b"]

    # the run config is one the review_queue job accepts
    from definitions import defs

    job = defs.resolve_job_def("review_queue")
    assert dg.validate_run_config(job, req.run_config)["ops"]["frame_embeddings"][
        "config"]["cameras"] == ["cam-a"]

    # significant again inside the cooldown: no second queue
    clock.now = start + timedelta(minutes=s.drift_cooldown_minutes) - timedelta(minutes=1)
    report_drift(instance, "cam-a", W[2], "significant", 0.41)
    assert tick() == []
    # after the cooldown the camera's next significant window queues again
    clock.now = start + timedelta(minutes=s.drift_cooldown_minutes) + timedelta(minutes=1)
    report_drift(instance, "cam-a", W[3], "significant", 0.35)
    (again,) = tick()
    assert again.job_name == "review_queue"
    assert again.run_key == f"drift-queue|cam-a|{W[3].isoformat()}"
    assert again.tags["roadloop/drift_window"] == W[3].isoformat()


def test_learning_loop_waits_for_the_reviews_imported_after_the_drift(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    tick = Ticker(instance, StubFleet(probe=probe))
    # a review import before the drift does not hold its frames' reviews
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="reviewed_labels"))
    clock.now = datetime.now(UTC)
    report_drift(instance, "cam-a", W[0], "significant", 0.5, metric="embeddings",
                 reference_id="refA")
    assert [r.job_name for r in tick()] == ["review_queue"]
    assert set(tick.state["owed"]) == {"cam-a"}
    waiting = drift_tick(instance, tick.fleet, tick.cursor)
    assert isinstance(waiting, dg.SkipReason)
    assert "owed learning_loop for ['cam-a']" in waiting.skip_message

    # the reviews are imported (reviewed_labels materialized): the loop starts, once
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="reviewed_labels"))
    (loop,) = tick()
    assert loop.job_name == "learning_loop"
    assert loop.run_key.startswith("drift-loop|cam-a|")
    assert loop.tags["roadloop/drift_camera"] == "cam-a"
    assert loop.tags["roadloop/drift_cameras"] == "cam-a"
    assert loop.tags["roadloop/drift_metric"] == "embeddings"
    assert loop.tags["roadloop/drift_score"] == "0.5000"
    assert loop.tags["roadloop/drift_reference"] == "refA"
    assert loop.tags["roadloop/drift_window"] == W[0].isoformat()
    assert tick.state["owed"] == {}
    assert tick() == []


@pytest.mark.parametrize("verdict", ["ok", "not_enough_data", "no_reference"])
def test_quiet_verdicts_never_act(instance: dg.DagsterInstance, clock: Clock, probe: str,
                                  verdict: str) -> None:
    tick = Ticker(instance, StubFleet(probe=probe))
    for i in range(3):
        report_drift(instance, "cam-a", W[i], verdict, reference_id="" if
                     verdict == "no_reference" else "ref0001")
    assert tick() == []
    assert boosts(probe) == []
    assert tick.state["boosted"] == {} and tick.state["fired"] == {}
    assert tick.state["owed"] == {}
    # the materializations were read: the next tick has nothing new
    quiet = drift_tick(instance, tick.fleet, tick.cursor)
    assert isinstance(quiet, dg.SkipReason) and quiet.skip_message == "no new drift"


def test_a_failing_boost_does_not_lose_the_significant_response(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    tick = Ticker(instance, StubFleet(probe=probe, boost_fails=True))
    report_drift(instance, "cam-a", W[0], "significant", 0.3)
    (req,) = tick()
    assert req.job_name == "review_queue" and req.tags["roadloop/drift_camera"] == "cam-a"
    assert len(boosts(probe)) == 1
    assert tick.state["boosted"] == {}  # not recorded as boosted ...
    assert set(tick.state["owed"]) == {"cam-a"}
    # ... so the next drifting window tries again
    clock.advance(minutes=15)
    report_drift(instance, "cam-a", W[1], "minor", 0.15)
    assert tick() == []
    assert [b["camera"] for b in boosts(probe)] == ["cam-a", "cam-a"]
