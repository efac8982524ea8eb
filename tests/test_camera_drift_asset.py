"""``camera_drift`` materialized for one camera × window: its metadata, its two checks, the
verdict file, the HTML reports and the drift events, with no model in MLflow (heartbeat
metrics only) and an empty frame store; once against the real gateway."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import httpx
import pytest

from assets.drift import DRIFT_CHECK, OPERATIONS_CHECK, camera_drift
from resources import (
    ArtifactStoreResource,
    DvcResource,
    FleetResource,
    FrameStoreResource,
    MlflowResource,
)
from roadloop.monitoring.events import DriftEventStore
from roadloop.monitoring.windows import DRIFT_WINDOW_FORMAT

from .drift_factories import NIGHT, in_window, window_heartbeats

CAM = "cam-drift"
WINDOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)  # a closed window of the partition grid
LENGTH = timedelta(minutes=15)
HISTORY = [WINDOW - (i + 1) * LENGTH for i in reversed(range(4))]  # reference windows

PAYLOADS: dict[str, list[dict[str, Any]]] = {}
REPORTS: dict[str, list[tuple[str, dict[str, Any]]]] = {}


class HeartbeatFleet(FleetResource):
    """The gateway's heartbeat listing, served from ``PAYLOADS[probe]``; drift reports are
    kept in ``REPORTS[probe]``."""

    gateway_url: str = "http://gateway.invalid"
    probe: str = "fleet"

    def heartbeats(self, camera_id: str, start: datetime, end: datetime,
                   page: int = 1000) -> list[dict[str, Any]]:
        mine = [p for p in PAYLOADS.get(self.probe, []) if p["camera_id"] == camera_id]
        return in_window(mine, start, end)

    def report_drift(self, camera_id: str, report: dict[str, Any]) -> dict[str, Any]:
        REPORTS.setdefault(self.probe, []).append((camera_id, report))
        return {"current": True}


class UnreachableFleet(HeartbeatFleet):
    """Heartbeats as above; drift reports go to a loopback port nobody listens on."""

    def report_drift(self, camera_id: str, report: dict[str, Any]) -> dict[str, Any]:
        return FleetResource.report_drift(self, camera_id, report)


def window_key(start: datetime) -> str:
    return start.strftime(DRIFT_WINDOW_FORMAT)


def history(camera: str) -> list[dict[str, Any]]:
    return [hb for i, ws in enumerate(HISTORY) for hb in window_heartbeats(camera, ws, seed=i)]


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> MlflowResource:
    """An MLflow registry without any model (one database for the module: creating one
    takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowResource(tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                          artifact_root=str(root / "artifacts"),
                          registered_model_name="no-such-model")


@pytest.fixture()
def world(roadloop_home: Path, tmp_path: Path, mlflow: MlflowResource) -> dict[str, Any]:
    """Resources over temporary folders; MLflow without any registered model."""
    artifacts = tmp_path / "artifacts"
    resources = {
        "frame_store": FrameStoreResource(root=str(tmp_path / "frames")),
        "artifacts": ArtifactStoreResource(root=str(artifacts)),
        "mlflow": mlflow,
        "dvc": DvcResource(repo_dir=str(tmp_path / "dvc"), remote_url=str(tmp_path / "remote")),
    }
    return {"resources": resources, "artifacts": artifacts,
            "instance": dg.DagsterInstance.ephemeral()}


def materialize(world: dict[str, Any], fleet: FleetResource, camera: str = CAM,
                start: datetime = WINDOW) -> dg.ExecuteInProcessResult:
    instance = world["instance"]
    if camera not in instance.get_dynamic_partitions("cameras"):
        instance.add_dynamic_partitions("cameras", [camera])
    key = dg.MultiPartitionKey({"camera": camera, "window": window_key(start)})
    result = dg.materialize([camera_drift], partition_key=str(key),
                            resources={**world["resources"], "fleet": fleet},
                            instance=instance, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def metadata_of(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node("camera_drift")
    return {k: v.value for k, v in mat.metadata.items()}


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def warnings_of(result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance) -> list[str]:
    return [r.user_message for r in instance.all_logs(result.run_id)
            if r.level == 30 and r.user_message]  # logging.WARNING


def test_stable_window_passes_drift_and_warns_on_latency(world: dict[str, Any]) -> None:
    probe = "stable"
    current = window_heartbeats(CAM, WINDOW, seed=99)
    current[1]["latency_p95_ms"] = 150.0  # one slow minute: P95 over the 120 ms line
    PAYLOADS[probe] = history(CAM) + current
    result = materialize(world, HeartbeatFleet(probe=probe))
    meta = metadata_of(result)

    assert meta["verdict"] == "ok" and meta["alarm"] is False
    assert meta["camera_id"] == CAM and meta["window_start"] == WINDOW.isoformat()
    assert meta["heartbeats"] == 4 and meta["frames_embedded"] == 0
    assert meta["model_version"] == "model-a"
    assert meta["reference_status"].startswith("built reference")
    ref = meta["reference"]
    assert ref["reference_id"] == meta["reference_id"] and ref["windows"] == 4
    assert ref["first_window"] == HISTORY[0].isoformat()
    scores = {k.removeprefix("score/"): v for k, v in meta.items() if k.startswith("score/")}
    assert set(scores) == {"brightness", "sharpness", "detections_per_frame", "confidence",
                           "class_mix", "low_confidence_share"}
    assert all(isinstance(v, float) and 0.0 <= v < 0.1 for v in scores.values())
    assert meta["metric"] in scores and meta["score"] == scores[meta["metric"]]
    assert meta["metrics"].startswith("| metric | kind | test |")
    assert "| brightness | input | unit_wasserstein |" in meta["metrics"]
    assert "embeddings" in meta["metrics"]  # the metric is listed, unjudged

    reports = {k: v for k, v in meta.items() if k.startswith("report/")}
    assert list(reports) == ["report/heartbeat_drift"]
    html = Path(urlparse(reports["report/heartbeat_drift"]).path)
    assert html.is_file() and html.stat().st_size > 1000

    verdict_file = Path(meta["verdict_json"])
    assert verdict_file == world["artifacts"] / "drift" / "verdicts" / CAM / "2026-11-26-1000.json"
    doc = json.loads(verdict_file.read_text())
    assert doc["verdict"]["verdict"] == "ok" and doc["heartbeats"] == 4
    assert doc["verdict"]["reference"]["reference_id"] == meta["reference_id"]

    checks = checks_of(result)
    assert checks[DRIFT_CHECK].passed is True
    assert checks[DRIFT_CHECK].metadata["verdict"].value == "ok"
    ops = checks[OPERATIONS_CHECK]
    assert ops.passed is False and ops.severity == dg.AssetCheckSeverity.WARN
    assert ops.metadata["p95_latency"].value == "warn"
    assert ops.metadata["silent"].value == "ok" and ops.metadata["error_rate"].value == "ok"
    assert "p95_latency warn" in ops.description

    # no model registered: frame embeddings are skipped with a warning, the run goes on
    warned = warnings_of(result, world["instance"])
    assert any("frame embeddings skipped" in m and "no-such-model" in m for m in warned), warned

    db = world["artifacts"] / "drift" / "events.db"
    store = DriftEventStore(db)
    assert store.events(CAM) == []
    assert store.verdict(CAM, WINDOW).verdict == "ok"
    refs = world["artifacts"] / "drift" / "references" / CAM
    assert (refs / f"{meta['reference_id']}.json").is_file()


def test_night_window_fails_the_drift_check_with_error(world: dict[str, Any]) -> None:
    probe = "night"
    PAYLOADS[probe] = history(CAM) + window_heartbeats(CAM, WINDOW, seed=99, scene=NIGHT)
    result = materialize(world, HeartbeatFleet(probe=probe))
    meta = metadata_of(result)

    assert meta["verdict"] == "significant" and meta["alarm"] is True
    assert meta["metric"] == "brightness" and meta["score"] >= 0.2
    assert meta["score/brightness"] == meta["score"]
    assert meta["threshold"] == pytest.approx(0.1) and meta["events"] >= 2
    assert meta["gateway_reported"] is True
    ((camera, sent),) = REPORTS[probe]
    assert camera == CAM and sent["drifted"] is True and sent["verdict"] == "significant"
    assert sent["window_start"] == WINDOW.isoformat()
    assert sent["scores"]["brightness"] == meta["score/brightness"]

    drift = checks_of(result)[DRIFT_CHECK]
    assert drift.passed is False and drift.severity == dg.AssetCheckSeverity.ERROR
    assert drift.description.startswith("significant: brightness = ")
    assert drift.metadata["metric"].value == "brightness"
    assert checks_of(result)[OPERATIONS_CHECK].passed is True

    store = DriftEventStore(world["artifacts"] / "drift" / "events.db")
    events = store.events(CAM)
    assert len(events) == meta["events"]
    assert {e.reference_id for e in events} == {meta["reference_id"]}
    assert ("brightness", "significant") in {(e.metric, e.severity) for e in events}

    # the partition run again: the same events, not twice as many
    again = metadata_of(materialize(world, HeartbeatFleet(probe=probe)))
    assert again["reference_status"] == f"reference {meta['reference_id']}"
    assert len(store.events(CAM)) == meta["events"]


def test_silent_camera_is_an_operational_error(world: dict[str, Any]) -> None:
    """...and with the gateway down for the drift report, the asset still materializes."""
    from launch.localfleet import free_port

    PAYLOADS["silent"] = history(CAM)  # nothing in the window itself
    fleet = UnreachableFleet(probe="silent", gateway_url=f"http://127.0.0.1:{free_port()}",
                             admin_token="operator-token")
    result = materialize(world, fleet)
    meta = metadata_of(result)
    assert meta["gateway_reported"] is False
    assert "unreachable" in meta["gateway_report_error"]
    warned = warnings_of(result, world["instance"])
    assert any("not reported to the gateway" in m for m in warned), warned
    assert meta["verdict"] == "not_enough_data" and meta["heartbeats"] == 0
    assert "no heartbeat" in meta["reason"]
    checks = checks_of(result)
    assert checks[DRIFT_CHECK].passed is True
    ops = checks[OPERATIONS_CHECK]
    assert ops.passed is False and ops.severity == dg.AssetCheckSeverity.ERROR
    assert "silent critical" in ops.description


def test_against_the_real_gateway(world: dict[str, Any], tmp_path: Path) -> None:
    """Heartbeats posted by an enrolled device; the real FleetResource pages through them."""
    from launch.localfleet import GatewayProcess

    camera = "cam-gw"
    with GatewayProcess(tmp_path / "gw") as gateway:
        admin = gateway.admin_token()
        enroll = httpx.post(f"{gateway.url}/v1/enroll", timeout=30, json={
            "enrollment_token": gateway.enrollment_token(camera), "camera_id": camera,
            "agent_version": "test"})
        assert enroll.status_code == 201, enroll.text
        device = {"Authorization": f"Bearer {enroll.json()['access_token']}"}
        posted = history(camera) + window_heartbeats(camera, WINDOW, seed=99)
        with httpx.Client(base_url=gateway.url, headers=device, timeout=30) as client:
            for hb in posted:
                r = client.post("/v1/heartbeats", json=hb)
                assert r.status_code == 202, r.text

        fleet = FleetResource(gateway_url=gateway.url, admin_token=admin)
        assert list(fleet.live_cameras()) == [camera]
        window = fleet.heartbeats(camera, WINDOW, WINDOW + LENGTH)
        assert [p["window_end"] for p in window] == [
            p["window_end"] for p in in_window(posted, WINDOW, WINDOW + LENGTH)]
        # pages of 3 give the same heartbeats as one page of 1000
        span = (HISTORY[0], WINDOW + LENGTH)
        paged = fleet.heartbeats(camera, *span, page=3)
        assert [p["window_end"] for p in paged] == [p["window_end"] for p in posted]
        assert paged == fleet.heartbeats(camera, *span)

        result = materialize(world, fleet, camera=camera)
        scraped = httpx.get(f"{gateway.url}/metrics", timeout=30)  # loopback: no token needed
    assert scraped.status_code == 200, scraped.text
    assert f'roadloop_camera_drifted{{camera_id="{camera}"}} 0.0' in scraped.text
    assert f'roadloop_camera_drift_score{{camera_id="{camera}",feature="brightness"}}' in (
        scraped.text)
    meta = metadata_of(result)
    assert meta["gateway_reported"] is True
    assert meta["heartbeats"] == 4 and meta["verdict"] == "ok"
    assert meta["reference_status"].startswith("built reference") and meta["reference"][
        "windows"] == 4
    assert checks_of(result)[DRIFT_CHECK].passed is True
