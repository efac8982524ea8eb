"""Counts from a real agent on real video reach the gateway once each, through an outage.

The real gateway process and three runs of the real agent (its CLI, the ONNX detector, the
shared highway video) on one camera with a counting line set through the gateway:

1. gateway up: the agent takes the geometry before its first frame, counts, and its interval
   records are stored;
2. gateway down: the agent counts again; its records stay in the record outbox;
3. gateway back: a restarted agent sends what was left.

Every vehicle the agents counted is in the gateway exactly once (the records' sum equals the
agents' own totals, no record twice), the aggregated query agrees, and so does the operator's
report: ``traffic_counts`` materialized for the day through ``FleetResource`` (paging).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from launch.localfleet import GatewayProcess, child_env
from resources import FleetResource

from .helpers import SHARED_DIR, require_shared
from .test_traffic_asset import _materialize

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
VIDEO = SHARED_DIR / "videos" / "highway_overpass.mp4"
MODEL = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"
CAMERA = "cam-traffic"
# A line across the carriageway that comes toward the camera (1280x720 video).
GEOMETRY = {"frame_size": [1280, 720],
            "lines": [{"name": "toward", "start": [100, 500], "end": [1000, 500],
                       "in_label": "toward", "out_label": "away"}]}

require_shared(VIDEO, MODEL)


def _agent(gw_url: str, state: Path, frames: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "edge_agent", "run", "--gateway", gw_url, "--camera-id", CAMERA,
           "--source", str(VIDEO), "--model", str(MODEL), "--state-dir", str(state),
           "--threads", "1", "--max-frames", str(frames), "--no-realtime",
           "--heartbeat-interval", "30", "--retry-base", "0.2", "--retry-max-delay", "1",
           "--update-interval", "0",
           # Counting, not privacy, is under test: people are still redacted from the model's
           # boxes, but CenterFace (~0.1-1.8 s per sampled frame here; all 121 are sampled)
           # is skipped. Privacy: tests/test_edge_redaction.py.
           "--redaction-faces", "none", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_counts_reach_the_gateway_and_the_report_once_through_an_outage_and_a_restart(
        roadloop_home: Path, tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw").start()
    state = tmp_path / "agent"
    try:
        admin = {"Authorization": f"Bearer {gw.admin_token()}"}
        put = httpx.put(f"{gw.url}/v1/cameras/{CAMERA}/config", headers=admin, json={
            "config": {"traffic": GEOMETRY}, "expected_version": 0, "reason": "e2e line"})
        assert put.status_code == 200, put.text

        first = _agent(gw.url, state, 60, "--enroll-token", gw.enrollment_token())
        assert first["traffic_crossings"] > 0  # by hand: vehicles cross it at frames 20, 30, 44
        assert first["traffic_records_left"] == 0
        assert first["traffic_records_sent"] == first["traffic_records_queued"] >= 1

        gw.stop()
        second = _agent(gw.url, state, 60, "--drain-timeout", "0.5")
        assert second["traffic_crossings"] > 0
        assert second["traffic_records_left"] == second["traffic_records_queued"] >= 1

        gw.start()
        third = _agent(gw.url, state, 1)
        assert third["traffic_records_left"] == 0
        assert third["traffic_records_sent"] == second["traffic_records_left"] + \
            third["traffic_records_queued"]

        listed = httpx.get(f"{gw.url}/v1/traffic/intervals", headers=admin,
                           params={"camera_id": CAMERA, "limit": 1000}).json()["items"]
        ids = [r["record_id"] for r in listed]
        assert len(ids) == len(set(ids))
        assert {r["config_version"] for r in listed} == {1}
        stored = sum(row["count"] for r in listed for row in r["lines"])
        counted = sum(s["traffic_crossings"] for s in (first, second, third))
        assert stored == counted
        assert {row["direction"] for r in listed for row in r["lines"]} <= {"toward", "away"}
        volumes = httpx.get(f"{gw.url}/v1/traffic/counts", headers=admin,
                            params={"camera_id": CAMERA, "bucket_s": 3600}).json()
        assert sum(v["count"] for v in volumes) == counted

        fleet = FleetResource(gateway_url=gw.url, admin_token=admin["Authorization"][7:])
        day = min(r["interval_start"] for r in listed)[:10]
        assert len(fleet.traffic_intervals(CAMERA, *_day(day), page=1)) == len(listed)
        meta = _materialize(tmp_path, fleet, day=day)
        assert meta["total_vehicles"] == counted
        assert meta["records"] == len(listed)
    finally:
        gw.stop()


def _day(day: str) -> tuple[datetime, datetime]:
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    return start, start + timedelta(days=1)
