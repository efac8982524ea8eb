"""``PUT /v1/cameras/{camera_id}/drift`` (fleet/drift.py): who may report, what is refused,
and the drift gauges ``GET /metrics`` exports after a report. In-process (TestClient); the
asset reporting to a real gateway is in tests/test_camera_drift_asset.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet.drift import DriftReportIn
from roadloop.monitoring.models import SCORE_NAMES, DriftVerdict, MetricResult, gateway_report

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import Env, bearer
from .test_metrics import TOKEN, samples, series

make_env = gateway_tests.make_env

END = datetime(2026, 5, 4, 11, 45, tzinfo=UTC)
CAM = "cam-a"


def report(end: datetime = END, verdict: str = "significant", **scores: float) -> dict[str, Any]:
    return {"window_start": (end - timedelta(minutes=15)).isoformat(),
            "window_end": end.isoformat(), "verdict": verdict,
            "drifted": verdict in ("minor", "significant"),
            "scores": scores or {"brightness": 0.31, "embeddings": -0.02},
            "model_version": "m1"}


@pytest.fixture()
def env(make_env: Any) -> Env:
    e = make_env(metrics_token=TOKEN)
    e.device = e.enroll(CAM)  # type: ignore[attr-defined]
    return e


def put(env: Env, body: Any, camera: str = CAM, token: str | None = None) -> Any:
    headers = bearer(token or env.admin)
    if isinstance(body, str):
        return env.client.put(f"/v1/cameras/{camera}/drift", content=body,
                              headers={**headers, "Content-Type": "application/json"})
    return env.client.put(f"/v1/cameras/{camera}/drift", json=body, headers=headers)


def drift_series(env: Env) -> dict[str, dict[Any, float]]:
    found = samples(env)
    return {name: series(found, name) for name in (
        "roadloop_camera_drift_score", "roadloop_camera_drifted",
        "roadloop_camera_drift_window_end_timestamp_seconds")}


def test_only_an_operator_may_report(env: Env) -> None:
    r = env.client.put(f"/v1/cameras/{CAM}/drift", json=report())
    assert r.status_code == 401
    device = env.device["access_token"]  # type: ignore[attr-defined]
    r = put(env, report(), token=device)
    assert r.status_code == 403, r.text
    assert all(not s for s in drift_series(env).values())  # nothing was stored
    r = put(env, report())
    assert r.status_code == 200, r.text
    assert r.json()["current"] is True and r.json()["drifted"] is True


RAW = ('{"window_start": "2026-05-04T11:30:00+00:00", "window_end": "2026-05-04T11:45:00+00:00",'
       ' "verdict": "ok", "drifted": false, "scores": {"brightness": SCORE}}')
HOSTILE: list[Any] = [
    report(speed=0.1),  # not a metric the drift monitor has
    report(brightness=1.5),  # scores lie in [-1, 1]
    RAW.replace("SCORE", "1e400"),  # parses to inf
    report(model_version="m" * 5000),
    {**report(), "drifted": False},  # contradicts "significant"
    {**report(), "window_end": (END - timedelta(hours=1)).isoformat()},  # before its start
    {**report(), "comment": "extra fields are refused"},
    {**report(), "scores": {f"f{i}": 0.0 for i in range(1000)}},
    RAW.replace("SCORE", "NaN"),
    RAW.replace("SCORE", "Infinity"),
]


def test_hostile_bodies_are_422_and_store_nothing(env: Env) -> None:
    for body in HOSTILE:
        r = put(env, body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"].startswith("invalid request")
    assert all(not s for s in drift_series(env).values())
    assert put(env, RAW.replace("SCORE", "0.1")).status_code == 200  # the template itself is fine


def test_unknown_or_absurd_camera(env: Env) -> None:
    r = put(env, report(), camera="cam-never-enrolled")
    assert r.status_code == 404 and "cam-never-enrolled" in r.json()["detail"]
    assert put(env, report(), camera="c" * 5000).status_code == 422
    assert all(not s for s in drift_series(env).values())


def test_metrics_export_the_latest_window(env: Env) -> None:
    assert put(env, report(brightness=0.31, embeddings=-0.02)).status_code == 200
    found = drift_series(env)
    cam = (("camera_id", CAM),)
    assert found["roadloop_camera_drifted"] == {cam: 1.0}
    assert found["roadloop_camera_drift_score"] == {
        (("camera_id", CAM), ("feature", "brightness")): 0.31,
        (("camera_id", CAM), ("feature", "embeddings")): -0.02}
    assert found["roadloop_camera_drift_window_end_timestamp_seconds"] == {cam: END.timestamp()}

    # an older window (a backfill) changes nothing
    old = put(env, report(END - timedelta(hours=2), "ok", brightness=0.01))
    assert old.status_code == 200 and old.json()["current"] is False
    assert old.json()["window_end"].startswith(END.isoformat()[:19])
    assert drift_series(env) == found

    # the next window, no drift: the gauge drops and only its own scores remain
    later = END + timedelta(minutes=15)
    assert put(env, report(later, "ok", confidence=0.02)).json()["current"] is True
    found = drift_series(env)
    assert found["roadloop_camera_drifted"] == {cam: 0.0}
    assert found["roadloop_camera_drift_score"] == {
        (("camera_id", CAM), ("feature", "confidence")): 0.02}
    assert found["roadloop_camera_drift_window_end_timestamp_seconds"] == {
        cam: later.timestamp()}


def test_gateway_report_of_a_verdict_is_a_valid_body() -> None:
    """What the asset sends passes the gateway's validation: unjudged metrics are left out."""
    start = END - timedelta(minutes=15)
    metrics = [MetricResult(name=n, family="heartbeats", kind="input", test="t",
                            verdict="ok", value=0.05 if i % 2 else None)
               for i, n in enumerate(SCORE_NAMES)]
    verdict = DriftVerdict(camera_id=CAM, window_start=start, window_end=END,
                           features="heartbeats", verdict="minor", metrics=metrics,
                           model_version="m7")
    body = gateway_report(verdict)
    parsed = DriftReportIn.model_validate(body)
    assert parsed.drifted is True and parsed.verdict == "minor"
    assert parsed.scores == {n: 0.05 for i, n in enumerate(SCORE_NAMES) if i % 2}
    assert parsed.window_end == END and parsed.model_version == "m7"
