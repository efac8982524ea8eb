"""End to end on the platform side: records posted by an enrolled device to the real gateway,
read back by ``FleetResource.traffic_intervals`` (pages), reported by ``traffic_counts``; the
report's totals equal the gateway's own ``/v1/traffic/counts``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from resources import FleetResource

from .test_traffic_asset import _materialize
from .traffic_factories import DAY, synthetic_records

# The endpoints come from the gateway's branch (fleet/traffic.py); until it is merged: skipped.
pytest.importorskip("fleet.traffic", reason="the gateway's traffic endpoints are not here yet")


def test_report_from_the_real_gateway(roadloop_home: Path, tmp_path: Path) -> None:
    from launch.localfleet import GatewayProcess

    camera = "cam-1"
    records = synthetic_records(minutes=40)
    records.append(dict(records[0], record_id=f"{camera}.restart", events=[]))  # sums
    with GatewayProcess(tmp_path / "gw") as gateway:
        admin = gateway.admin_token()
        enroll = httpx.post(f"{gateway.url}/v1/enroll", timeout=30, json={
            "enrollment_token": gateway.enrollment_token(camera), "camera_id": camera,
            "agent_version": "test"})
        assert enroll.status_code == 201, enroll.text
        device = {"Authorization": f"Bearer {enroll.json()['access_token']}"}
        with httpx.Client(base_url=gateway.url, headers=device, timeout=30) as client:
            for record in records:
                r = client.post("/v1/traffic/intervals", json=record)
                assert r.status_code == 201, r.text
            assert client.post("/v1/traffic/intervals", json=records[1]).status_code == 409

        fleet = FleetResource(gateway_url=gateway.url, admin_token=admin)
        since = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC)
        until = since + timedelta(days=1)
        paged = fleet.traffic_intervals(camera, since, until, page=7)
        assert sorted(r["record_id"] for r in paged) == sorted(r["record_id"] for r in records)
        assert paged == fleet.traffic_intervals(None, since, until)

        counts = httpx.get(f"{gateway.url}/v1/traffic/counts", timeout=30,
                           headers={"Authorization": f"Bearer {admin}"},
                           params={"camera_id": camera, "since": since.isoformat(),
                                   "until": until.isoformat(), "bucket_s": 900})
        assert counts.status_code == 200, counts.text
        meta = _materialize(tmp_path, fleet)
    rows = counts.json()
    want = sum(row["count"] for rec in records for row in rec["lines"])
    assert meta["total_vehicles"] == want == sum(r["count"] for r in rows)
    assert meta["events"] == 1 and meta["records"] == len(records)
