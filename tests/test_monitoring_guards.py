"""What the monitoring audit found, pinned down (docs/monitoring.md):

- the per-camera gauges come from the heartbeat the gateway received last, not the one with
  the latest ``sent_at`` (an agent clock up to a day ahead is accepted), and the silence
  series is the gateway's own ``Device.last_seen_at``: kept through heartbeat retention;
- a camera whose device is in maintenance or revoked exports no per-camera series (so no
  CameraSilent, CameraProblem or CameraDrift);
- CameraDrift fires on two drifted 15-minute windows in a row, not on one, and does not race
  the third report;
- the Alertmanager inhibit rule pairs a critical alert with the warning of its own family
  only (on the YAML; against a real Alertmanager when it is installed);
- the drift window sensor skips a malformed gateway answer like an unreachable gateway, and
  the sensors start over from a safe default when their cursor does not read;
- new_camera_sensor's run key changes when retention brings a frame count back to an
  earlier value (Dagster drops a run key a sensor used before).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import yaml

from resources.fleet_resource import FleetError, FleetResource

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import Env, bearer
from .test_metrics import TOKEN, samples, series

make_env = gateway_tests.make_env

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "prometheus"
LAST = "roadloop_camera_last_heartbeat_timestamp_seconds"


# =========================================================================== gateway /metrics
@pytest.fixture()
def env(make_env: Any) -> Env:
    return make_env(metrics_token=TOKEN)


def heartbeat(env: Env, dev: dict[str, Any], camera: str, sent: datetime, **fields: Any) -> None:
    r = env.client.post("/v1/heartbeats", headers=bearer(dev["access_token"]), json={
        "schema_version": 1, "camera_id": camera, "sent_at": sent.isoformat(),
        "model_version": "m1", "outbox_depth": 0, **fields})
    assert r.status_code == 202, r.text


def per_camera(env: Env, name: str) -> dict[str, float]:
    return {dict(labels)["camera_id"]: v for labels, v in series(samples(env), name).items()}


def test_a_heartbeat_dated_ahead_does_not_freeze_the_gauges(env: Env) -> None:
    from fleet.rollout_shapes import camera_frame_size

    dev = env.enroll("cam-a")
    t0 = env.clock.now
    # The device clock is 14 h fast (local time labelled UTC): accepted (up to a day ahead).
    heartbeat(env, dev, "cam-a", t0 + timedelta(hours=14), fps=10.0, latency_p95_ms=300.0,
              frame_width=640, frame_height=480)
    # NTP fixes it; the agent heartbeats every 30 s for 10 minutes.
    for _ in range(20):
        env.clock.advance(30)
        heartbeat(env, dev, "cam-a", env.clock.now, fps=2.0, latency_p95_ms=60.0,
                  frame_width=1280, frame_height=720)
    now = env.clock.now.timestamp()
    assert per_camera(env, LAST) == {"cam-a": pytest.approx(now)}  # not 600 s old
    assert per_camera(env, "roadloop_camera_fps") == {"cam-a": 2.0}
    assert per_camera(env, "roadloop_camera_detector_latency_p95_seconds") == {
        "cam-a": pytest.approx(0.06)}
    with env.gw.db.read() as session:  # the rollout's input shape follows the same heartbeat
        assert camera_frame_size(session, "cam-a") == (1280, 720)


def test_an_agent_clock_hours_behind_still_gives_the_latest_heartbeat(env: Env) -> None:
    """An agent clock hours slow: the gauges still follow the heartbeat received last."""
    dev = env.enroll("cam-a")
    for i in range(4):
        env.clock.advance(30)
        heartbeat(env, dev, "cam-a", env.clock.now - timedelta(hours=5), fps=float(i + 1))
    assert per_camera(env, "roadloop_camera_fps") == {"cam-a": 4.0}
    assert per_camera(env, LAST) == {"cam-a": pytest.approx(env.clock.now.timestamp())}


def test_cameras_in_maintenance_or_revoked_export_no_series(env: Env) -> None:
    from .test_drift_reports import report as drift_report

    admin = bearer(env.admin)
    devs = {c: env.enroll(c) for c in ("cam-maint", "cam-revoked", "cam-dead", "cam-live")}
    for camera, dev in devs.items():
        heartbeat(env, dev, camera, env.clock.now, fps=5.0, traffic_error="geometry off")
        r = env.client.put(f"/v1/cameras/{camera}/drift", json=drift_report(), headers=admin)
        assert r.status_code == 200, r.text
    r = env.client.post(f"/v1/devices/{devs['cam-maint']['device_id']}/status",
                        json={"status": "maintenance"}, headers=admin)
    assert r.status_code == 200, r.text
    r = env.client.post(f"/v1/devices/{devs['cam-revoked']['device_id']}/revoke", headers=admin)
    assert r.status_code == 200, r.text
    for _ in range(20):  # 50 min; only cam-live keeps heartbeating
        env.clock.advance(150)
        heartbeat(env, devs["cam-live"], "cam-live", env.clock.now, fps=5.0)
    now = env.clock.now.timestamp()
    ages = {c: round(now - t) for c, t in per_camera(env, LAST).items()}
    assert ages == {"cam-dead": 3000, "cam-live": 0}  # cam-dead stays CameraSilent
    live = {"cam-dead", "cam-live"}
    for name in ("roadloop_camera_fps", "roadloop_camera_drifted",
                 "roadloop_camera_drift_window_end_timestamp_seconds"):
        assert set(per_camera(env, name)) == live, name
    problems = series(samples(env), "roadloop_camera_problem")
    assert {dict(labels)["camera_id"] for labels in problems} == {"cam-dead"}

    # Back from maintenance: its series (and its silence) are back.
    r = env.client.post(f"/v1/devices/{devs['cam-maint']['device_id']}/status",
                        json={"status": "active"}, headers=admin)
    assert r.status_code == 200, r.text
    assert set(per_camera(env, LAST)) == live | {"cam-maint"}


def test_heartbeat_retention_keeps_a_dead_camera_silent(env: Env) -> None:
    admin = bearer(env.admin)
    dead, live = env.enroll("cam-dead"), env.enroll("cam-live")
    heartbeat(env, dead, "cam-dead", env.clock.now, fps=5.0)
    for _ in range(20):
        env.clock.advance(150)
        heartbeat(env, live, "cam-live", env.clock.now, fps=5.0)
    r = env.client.post("/v1/privacy/expire", headers=admin, json={
        "frames": [], "heartbeats_before": (env.clock.now - timedelta(minutes=10)).isoformat()})
    assert r.status_code == 200 and r.json()["heartbeats_deleted"] > 1, r.text
    now = env.clock.now.timestamp()
    ages = {c: round(now - t) for c, t in per_camera(env, LAST).items()}
    assert ages == {"cam-dead": 3000, "cam-live": 0}
    assert set(per_camera(env, "roadloop_camera_fps")) == {"cam-live"}  # no heartbeat left


# =========================================================================== alert rules
def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "rules.yml").read_text())
    return [dict(r, group=g["name"]) for g in doc["groups"] for r in g["rules"]]


def minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1, "h": 60}
    parts = re.findall(r"(\d+)([smh])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_camera_drift_for_lies_between_one_and_two_windows() -> None:
    (drift,) = [r for r in rules() if r["alert"] == "CameraDrift"]
    assert 15 < minutes(drift["for"]) < 30


DRIFT_CADENCE = f"""
rule_files: [{DEPLOY / "rules.yml"}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      # W1 reported drifted at 5m, W2 drifted at 20m, W3 ok at 35m (on time)
      - series: roadloop_camera_drifted{{camera_id="two"}}
        values: "0x19 1x119 0x80"
      # W1 drifted, W2 ok reported at 24m (4 min late)
      - series: roadloop_camera_drifted{{camera_id="one"}}
        values: "0x19 1x75 0x124"
      - series: roadloop_camera_drift_window_end_timestamp_seconds{{camera_id="two"}}
        values: "0+15x219"
      - series: roadloop_camera_drift_window_end_timestamp_seconds{{camera_id="one"}}
        values: "0+15x219"
    alert_rule_test:
      - eval_time: 34m45s
        alertname: CameraDrift
        exp_alerts:
          - exp_labels: {{severity: warning, camera_id: two}}
            exp_annotations:
              summary: "Camera two: its frames drifted from its reference for 30 min (roadloop_camera_drift_score has the scores)"
"""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_camera_drift_fires_on_two_windows_at_the_real_cadence(tmp_path: Path) -> None:
    (tmp_path / "drift_test.yml").write_text(DRIFT_CADENCE)
    r = subprocess.run(["promtool", "test", "rules", "drift_test.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# --------------------------------------------------------------------------- inhibition
def sample_alerts() -> dict[str, dict[str, str]]:
    """Each rule's alert as Alertmanager gets it: its labels, plus cam-a for camera alerts
    (and the labels their series carry)."""
    out = {}
    for r in rules():
        labels = {"alertname": r["alert"], **r.get("labels", {})}
        if r["group"] == "roadloop-cameras":
            labels["camera_id"] = "cam-a"
        if r["alert"] == "CameraProblem":
            labels["kind"] = "redaction_gap"
        if r["alert"] == "RolloutStageFailing":
            labels.update(rollout_id="r1", stage="canary", verdict="fail")
        if r["alert"] == "RolloutRolledBack":
            labels["status"] = "rolled_back"
        out[r["alert"]] = labels
    return out


def matches(matcher: str, labels: dict[str, str]) -> bool:
    """One Alertmanager matcher (``name="v"``, ``!=``, ``=~``, ``!~``; regexes anchored)."""
    m = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', matcher)
    assert m, matcher
    name, op, value = m.groups()
    got = labels.get(name, "")
    if op in ("=~", "!~"):
        hit = re.fullmatch(value, got) is not None
        return hit if op == "=~" else not hit
    return (got == value) if op == "=" else (got != value)


def inhibits(rule: dict[str, Any], source: dict[str, str], target: dict[str, str]) -> bool:
    """Alertmanager's inhibition: a label in ``equal`` that both lack counts as equal."""
    return (all(matches(m, source) for m in rule.get("source_matchers", []))
            and all(matches(m, target) for m in rule.get("target_matchers", []))
            and all(source.get(k, "") == target.get(k, "") for k in rule.get("equal", [])))


WANTED = {("DetectorLatencyP95Critical", "DetectorLatencyP95High"),
          ("GatewayErrorRateCritical", "GatewayErrorRateHigh")}


def test_the_inhibit_rule_pairs_only_alerts_of_one_family() -> None:
    am = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    alerts = sample_alerts()
    pairs = {(s, t) for s in alerts for t in alerts if s != t
             for rule in am["inhibit_rules"] if inhibits(rule, alerts[s], alerts[t])}
    assert pairs == WANTED
    # on another camera, the critical latency alert silences nothing of cam-a's
    other = dict(alerts["DetectorLatencyP95Critical"], camera_id="cam-b")
    assert not any(inhibits(rule, other, alerts["DetectorLatencyP95High"])
                   for rule in am["inhibit_rules"])


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("prometheus-alertmanager") is None,
                    reason="prometheus-alertmanager not installed")
def test_a_real_alertmanager_inhibits_only_within_a_family(tmp_path: Path) -> None:
    from launch.localfleet import free_port

    port = free_port()
    config = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    config["receivers"][0]["webhook_configs"][0]["url"] = "http://127.0.0.1:9/unused"
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "am.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([
        "prometheus-alertmanager", f"--config.file={tmp_path / 'am.yml'}",
        f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address="], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v2"
    try:
        def poll(what: str, probe: Any) -> Any:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if (value := probe()):
                        return value
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            raise AssertionError(f"{what} not seen in 30 s\n" +
                                 (tmp_path / "am.log").read_text(errors="replace")[-3000:])

        poll("Alertmanager ready",
             lambda: httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200)
        alerts = sample_alerts()
        now = datetime.now(UTC).isoformat()
        # The critical alerts first, DetectorLatencyP95Critical last of them: once its warning
        # shows as inhibited, Alertmanager has taken in every critical alert.
        critical = [a for a in alerts if alerts[a]["severity"] == "critical"]
        critical.sort(key=lambda a: a == "DetectorLatencyP95Critical")
        order = critical + [a for a in alerts if a not in critical]
        body = [{"labels": alerts[a], "startsAt": now} for a in order]
        r = httpx.post(f"{api}/alerts", json=body, timeout=5)
        assert r.status_code == 200, r.text

        def state() -> dict[str, bool] | None:
            got = {a["labels"]["alertname"]: bool(a["status"]["inhibitedBy"])
                   for a in httpx.get(f"{api}/alerts", timeout=2).json()}
            return got if got.get("DetectorLatencyP95High") and len(got) == len(alerts) else None

        inhibited = poll("DetectorLatencyP95High inhibited", state)
        assert {a for a, muted in inhibited.items() if muted} == {t for _, t in WANTED}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


# =========================================================================== sensors
MALFORMED: dict[str, tuple[str, bytes]] = {
    "html": ("text/html", b"<html>maintenance page</html>"),
    "object": ("application/json", b'{"detail": "ok"}'),
    "string": ("application/json", b'"ok"'),
    "no camera_id": ("application/json", b'[{"device_id": "d1", "last_seen_at": null}]'),
    "bad last_seen_at": ("application/json",
                         b'[{"camera_id": "cam-a", "last_seen_at": "yesterday"}]'),
}


def answering(monkeypatch: pytest.MonkeyPatch, content_type: str, body: bytes) -> None:
    """Every gateway call answers 200 with this body (no network)."""
    def fake(method: str, url: str, **kw: Any) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type},
                              request=httpx.Request(method, url))

    monkeypatch.setattr(httpx, "request", fake)


def test_the_window_sensor_skips_a_malformed_gateway_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sensors.drift import drift_window_sensor

    fleet = FleetResource(gateway_url="http://gateway.invalid", admin_token="x" * 32)
    with dg.DagsterInstance.ephemeral() as instance:
        for kind, (content_type, body) in MALFORMED.items():
            answering(monkeypatch, content_type, body)
            with pytest.raises(FleetError):
                fleet.live_cameras()
            ctx = dg.build_sensor_context(instance=instance, resources={"fleet": fleet})
            out = drift_window_sensor(ctx)
            assert isinstance(out, dg.SkipReason), (kind, out)
            assert "gateway unavailable" in out.skip_message, kind


def test_a_well_formed_device_list_still_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    answering(monkeypatch, "application/json", json.dumps([
        {"camera_id": "cam-b", "last_seen_at": None},
        {"camera_id": "cam-a", "last_seen_at": "2026-05-04T12:00:00"},  # naive: UTC
        {"camera_id": "cam-a", "last_seen_at": "2026-05-04T11:00:00+00:00"},
    ]).encode())
    fleet = FleetResource(gateway_url="http://gateway.invalid", admin_token="x" * 32)
    assert fleet.live_cameras() == {"cam-a": datetime(2026, 5, 4, 12, tzinfo=UTC),
                                    "cam-b": None}
    assert fleet.cameras() == {"cam-a", "cam-b"}


def test_the_window_sensor_starts_over_from_an_unreadable_cursor() -> None:
    from sensors.drift import drift_window_sensor

    from .test_drift_sensors import StubFleet

    fleet = StubFleet(probe="guards-window", cameras=["cam-a"])
    ahead = (datetime.now(UTC) + timedelta(days=3)).isoformat()  # no window would ever close
    with dg.DagsterInstance.ephemeral() as instance:
        for cursor in ("not a time", ahead):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"fleet": fleet})
            out = drift_window_sensor(ctx)
            assert isinstance(out, dg.SensorResult), (cursor, out)
            assert out.run_requests and datetime.fromisoformat(out.cursor) < datetime.now(UTC)


def test_the_drift_sensor_starts_over_after_the_newest_verdict() -> None:
    """An unreadable cursor does not fail every tick, nor replay the old verdicts."""
    from sensors.drift import drift_sensor

    from .test_drift_sensors import CALLS, StubFleet, report_drift

    fleet = StubFleet(probe="guards-drift")
    CALLS.pop("guards-drift", None)
    with dg.DagsterInstance.ephemeral() as instance:
        report_drift(instance, "cam-a", datetime(2026, 5, 4, 11, 0, tzinfo=UTC), "significant",
                     score=0.4)
        newest = instance.fetch_materializations(dg.AssetKey("camera_drift"), limit=1).records
        broken = json.dumps({"after": "x", "boosted": {"cam-a": "soon"}, "fired": [],
                             "owed": {"cam-a": {"tags": 1}}})
        for cursor in ("{not json", "[1]", broken):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"fleet": fleet})
            out = drift_sensor(ctx)
            assert isinstance(out, dg.SensorResult), (cursor, out)
            assert not out.run_requests  # the old significant verdict is not acted on again
            state = json.loads(out.cursor)
            assert state["after"] == newest[0].storage_id
            assert state["boosted"] == {} and state["fired"] == {} and state["owed"] == {}
        assert CALLS["guards-drift"] == []  # and no sampling boost for it


def test_the_new_camera_and_accuracy_sensors_start_over_from_an_unreadable_cursor(
        tmp_path: Path) -> None:
    from resources import ArtifactStoreResource, FrameStoreResource
    from roadloop.data.frames import FrameStore
    from sensors.camera_accuracy import camera_accuracy_sensor
    from sensors.new_camera import new_camera_sensor

    from .test_active_learning_assets import _textured, _write_frame

    _write_frame(FrameStore(tmp_path / "frames"), "cam_a", "a0", 0, _textured(0))
    frames = FrameStoreResource(root=str(tmp_path / "frames"))
    artifacts = ArtifactStoreResource(root=str(tmp_path / "artifacts"))
    with dg.DagsterInstance.ephemeral() as instance:
        for cursor in ("{not json", "[3]", '{"cam_a": "many"}'):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"frame_store": frames})
            out = new_camera_sensor(ctx)  # as on a first tick
            assert [str(r.partition_key) for r in out.run_requests] == ["cam_a"], cursor
            assert json.loads(out.cursor) == {"cam_a": 1}
        ctx = dg.build_sensor_context(instance=instance, cursor="not a storage id",
                                      resources={"artifacts": artifacts})
        out = camera_accuracy_sensor(ctx)
        assert isinstance(out, dg.SkipReason) and "no finished review import" in out.skip_message


def test_a_frame_count_seen_before_gets_a_new_run_key(tmp_path: Path) -> None:
    """Retention lowering a camera's frame count to an earlier value is a refresh Dagster
    must not drop as a duplicate run key."""
    from resources import FrameStoreResource
    from roadloop.data.frames import FrameStore
    from sensors.new_camera import new_camera_sensor

    from .test_active_learning_assets import _textured, _write_frame

    store = FrameStore(tmp_path / "frames")
    resource = FrameStoreResource(root=str(tmp_path / "frames"))
    key = dg.AssetKey("sampled_edge_frames")
    used: list[str] = []

    def tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"frame_store": resource})
        return new_camera_sensor(ctx)

    def refreshed(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
        """The requested run ran: its key is used, the partition materialized."""
        (request,) = result.run_requests
        assert request.run_key not in used, (request.run_key, used)
        used.append(request.run_key)
        instance.report_runless_asset_event(dg.AssetMaterialization(
            key, partition="cam_a", metadata={"store_frames": store.count("cam_a")}))

    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("cameras", ["cam_a"])
        for i in range(2):
            _write_frame(store, "cam_a", f"a{i}", i * 60, _textured(i))
        first = tick(instance, None)
        again = tick(instance, None)  # the same tick evaluated again: the same key
        assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
        refreshed(instance, first)
        assert not tick(instance, first.cursor).run_requests  # nothing changed
        _write_frame(store, "cam_a", "a2", 120, _textured(2))
        grown = tick(instance, first.cursor)
        refreshed(instance, grown)
        oldest = next(p for _, p in store.iter_frames("cam_a"))
        store.remove_frame(oldest)  # retention: back to 2 frames, other ones
        shrunk = tick(instance, grown.cursor)
        assert [str(r.partition_key) for r in shrunk.run_requests] == ["cam_a"]
        refreshed(instance, shrunk)  # a new key: not dropped as a duplicate
