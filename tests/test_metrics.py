"""The gateway's Prometheus metrics (fleet/metrics.py): access, bounded labels, and that what
the gateway does shows up in ``GET /metrics``. In-process (TestClient); the real Prometheus
and Alertmanager are in tests/test_monitoring_e2e.py."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from edge_agent.heartbeat import TelemetryWindow
from edge_agent.metrics import MetricsServer
from fleet.metrics import UNMATCHED, RouteTemplates, is_loopback, method_label, route_label

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import Env, bearer, meta, post_frame

make_env = gateway_tests.make_env
frame_jpeg = gateway_tests.frame_jpeg

TOKEN = "scrape-secret-0123456789"


def samples(env: Env) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = env.client.get("/metrics", headers=bearer(TOKEN))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def series(found: dict[Any, float], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


@pytest.fixture()
def env(make_env: Any) -> Env:
    return make_env(metrics_token=TOKEN)


def test_metrics_need_the_token_or_loopback(env: Env, make_env: Any) -> None:
    assert env.client.get("/metrics").status_code == 401
    assert env.client.get("/metrics", headers=bearer("wrong-secret-0123456789")).status_code == 401
    assert env.client.get("/metrics", headers=bearer(TOKEN)).status_code == 200
    open_env = make_env("open")  # no token: loopback clients only
    assert open_env.client.get("/metrics").status_code == 403  # TestClient's host: "testclient"
    with TestClient(open_env.client.app, client=("127.0.0.1", 40000)) as local:
        r = local.get("/metrics")
    assert r.status_code == 200 and "roadloop_gateway_requests_total" in r.text
    assert is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("10.0.0.1") and not is_loopback("testclient") and not is_loopback(None)
    disabled = make_env("off", metrics_enabled=False)
    assert disabled.client.get("/metrics").status_code == 404


def test_request_labels_are_route_templates_never_raw_paths(env: Env) -> None:
    admin = bearer(env.admin)
    for i in range(3):  # three ids, one series
        env.client.get(f"/v1/cameras/cam-{i}/heartbeats", headers=admin)
    for i in range(3):  # unknown paths, one label
        env.client.get(f"/no/such/path/{i}")
    env.client.request("BREW", "/healthz")
    found = series(samples(env), "roadloop_gateway_requests_total")
    hb = {lab: v for lab, v in found.items() if ("route", "/v1/cameras/{camera_id}/heartbeats")
          in lab}
    assert hb == {(("method", "GET"), ("route", "/v1/cameras/{camera_id}/heartbeats"),
                   ("status", "200")): 3.0}
    assert found[(("method", "GET"), ("route", UNMATCHED), ("status", "404"))] == 3.0
    assert found[(("method", "OTHER"), ("route", "/healthz"), ("status", "405"))] == 1.0
    routes = {dict(lab)["route"] for lab in found}
    assert not any("cam-" in r or "/no/such" in r for r in routes)


def test_route_and_method_label_functions_are_bounded(env: Env) -> None:
    routes = RouteTemplates.of_app(env.client.app)
    scope = {"type": "http", "method": "GET", "path": "/v1/cameras/cam-x/heartbeats",
             "root_path": ""}
    assert route_label(scope, routes) == "/v1/cameras/{camera_id}/heartbeats"
    assert route_label({**scope, "path": "/"}, routes) == "/"  # the landing page
    for path in ("/v1", "/v1/cameras/a/b/c/d", "/" + "x" * 500):
        assert route_label({**scope, "path": path}, routes) == UNMATCHED
    assert route_label({**scope, "path": "/x"}) == UNMATCHED
    assert [method_label(m) for m in ("GET", "POST", "get", "PROPFIND", "")] == [
        "GET", "POST", "OTHER", "OTHER", "OTHER"]


def test_intake_heartbeats_and_refusals_show_up(env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll("cam-a")
    env.enroll("cam-b")  # enrolled, never heartbeated: no per-camera series
    for i in range(2):
        r = post_frame(env.client, dev["access_token"], meta(f"f{i}"), frame_jpeg)
        assert r.status_code == 201, r.text
    assert post_frame(env.client, dev["access_token"], meta("f0"), frame_jpeg).status_code == 409
    assert post_frame(env.client, "bogus", meta("f9"), frame_jpeg).status_code == 401
    sent = env.clock.now - timedelta(seconds=5)
    r = env.client.post("/v1/heartbeats", headers=bearer(dev["access_token"]), json={
        "schema_version": 1, "camera_id": "cam-a", "sent_at": sent.isoformat(),
        "model_version": "m1", "fps": 9.5, "latency_p50_ms": 40.0, "latency_p95_ms": 130.0,
        "outbox_depth": 4, "config_error": None, "redaction_error": None,
        "traffic_error": {"version": 3, "reason": "the traffic geometry was drawn on 1280x720 "
                          "frames (aspect 1.78) but the stream is 720x1280 (0.56)"}})
    assert r.status_code == 202, r.text
    found = samples(env)
    # one series per problem the latest heartbeat reports; none for a null field
    assert series(found, "roadloop_camera_problem") == {
        (("camera_id", "cam-a"), ("kind", "traffic_error")): 1.0}
    assert found[("roadloop_gateway_intake_frames_total", ())] == 2.0
    assert found[("roadloop_gateway_intake_bytes_total", ())] == 2.0 * len(frame_jpeg)
    reqs = series(found, "roadloop_gateway_requests_total")
    assert reqs[(("method", "POST"), ("route", "/v1/frames"), ("status", "201"))] == 2.0
    assert reqs[(("method", "POST"), ("route", "/v1/frames"), ("status", "409"))] == 1.0
    assert reqs[(("method", "POST"), ("route", "/v1/frames"), ("status", "401"))] == 1.0
    hist = series(found, "roadloop_gateway_request_duration_seconds_count")
    assert hist[(("method", "POST"), ("route", "/v1/frames"))] == 4.0
    assert found[("roadloop_gateway_events_total", (("event", "frames_duplicate"),))] == 1.0
    cam = (("camera_id", "cam-a"),)
    assert found[("roadloop_camera_last_heartbeat_timestamp_seconds", cam)] == pytest.approx(
        env.clock.now.timestamp())  # the gateway's receive time, not the agent's clock
    assert found[("roadloop_camera_fps", cam)] == 9.5
    assert found[("roadloop_camera_detector_latency_p95_seconds", cam)] == pytest.approx(0.13)
    assert found[("roadloop_camera_outbox_depth", cam)] == 4.0
    assert ("roadloop_camera_fps", (("camera_id", "cam-b"),)) not in found
    assert found[("roadloop_devices", (("status", "active"),))] == 2.0
    assert found[("roadloop_rollouts", (("status", "rolled_back"),))] == 0.0
    assert found[("roadloop_fleet_metrics_up", ())] == 1.0


def agent_metrics_text() -> str:
    """The agent's endpoint, served for real, over a fake agent with every part built."""
    t = TelemetryWindow("cam-a", "m1", ["car"])
    for inference_ms in (8.0, 150.0, 2500.0):
        t.record_frame(latency_ms=inference_ms + 5, inference_ms=inference_ms,
                       class_counts={"car": 1}, confidences=[0.8], brightness=0.5,
                       sharpness=50.0, occupancy=0.1, density_state="normal")
    t.record_upload(True)
    t.record_upload(False)
    t.record_upload(False)
    agent = SimpleNamespace(
        config=SimpleNamespace(camera_id="cam-a"), telemetry=t,
        outbox=SimpleNamespace(depth=lambda: 7, total_bytes=lambda: 7000),
        records=SimpleNamespace(depth=lambda: 2), traffic=SimpleNamespace(crossings_total=11))
    server = MetricsServer(agent, 0)
    try:
        return httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    finally:
        server.close()


def test_agent_endpoint_serves_its_totals_and_latency_histogram() -> None:
    found = {}
    for family in text_string_to_metric_families(agent_metrics_text()):
        for s in family.samples:
            assert s.labels.get("camera_id") == "cam-a", s  # the one label
            found[(s.name, s.labels.get("le"))] = s.value
    assert found[("roadloop_agent_frames_total", None)] == 3
    assert found[("roadloop_agent_uploads_ok_total", None)] == 1
    assert found[("roadloop_agent_uploads_failed_total", None)] == 2
    assert found[("roadloop_agent_outbox_depth", None)] == 7
    assert found[("roadloop_agent_record_outbox_depth", None)] == 2
    assert found[("roadloop_agent_traffic_crossings_total", None)] == 11
    bucket = "roadloop_agent_detector_latency_seconds_bucket"
    assert found[(bucket, "0.01")] == 1  # 8 ms
    assert found[(bucket, "0.12")] == 1  # 150 ms is over 120 ms
    assert found[(bucket, "0.16")] == 2
    assert found[(bucket, "1.0")] == 2 and found[(bucket, "+Inf")] == 3  # 2.5 s
    assert found[("roadloop_agent_detector_latency_seconds_sum", None)] == pytest.approx(2.658)


def test_rules_and_dashboard_name_only_exported_metrics(env: Env) -> None:
    """Every ``roadloop_*`` series the alert rules and the Grafana dashboard query is one
    the gateway or the agent exports (a renamed metric would silently never alert)."""
    repo = Path(__file__).resolve().parents[1]
    text = env.client.get("/metrics", headers=bearer(TOKEN)).text + agent_metrics_text()
    exported = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(family.name + s for s in ("_total", "_bucket", "_count", "_sum"))
        exported.update(s.name for s in family.samples)
    rules = (repo / "deploy" / "prometheus" / "rules.yml").read_text()
    dashboard = json.loads((repo / "deploy" / "grafana" / "roadloop-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"roadloop_[a-z0-9_]+", rules + "\n".join(exprs)))
    assert len(used) > 15
    assert used <= exported, sorted(used - exported)
