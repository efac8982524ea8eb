"""The gateway's Prometheus metrics (fleet/metrics.py): access, bounded labels, and that what
the gateway does shows up in ``GET /metrics``. In-process (TestClient); the real Prometheus
and Alertmanager are in tests/test_monitoring_e2e.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

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
    for path in ("/", "/v1", "/v1/cameras/a/b/c/d", "/" + "x" * 500):
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
        "outbox_depth": 4})
    assert r.status_code == 202, r.text
    found = samples(env)
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
