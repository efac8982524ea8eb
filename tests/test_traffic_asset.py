"""``traffic_counts`` materialized for one day, and ``FleetResource.traffic_intervals``
paging through ``GET /v1/traffic/intervals``.

The endpoint lives on the gateway (fleet/traffic.py, another branch at the time of writing):
the resource is tested against a fake of its contract (``{items, next_cursor}`` pages, keyset
cursor), the asset with the resource's method serving synthetic records.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import httpx
import pytest

from assets.traffic import traffic_counts
from resources import ArtifactStoreResource, FleetResource
from resources.fleet_resource import FleetError
from roadloop.traffic.report import MARKDOWN_NAME

from .traffic_factories import DAY, synthetic_records

RECORDS: dict[str, list[dict[str, Any]]] = {}


class TrafficFleet(FleetResource):
    """The gateway's traffic records, served from ``RECORDS[probe]``."""

    gateway_url: str = "http://gateway.invalid"
    probe: str = "fleet"

    def traffic_intervals(self, camera_id: str | None, since: datetime, until: datetime,
                          page: int = 1000) -> list[dict[str, Any]]:
        return [r for r in RECORDS[self.probe]
                if camera_id in (None, r["camera_id"])
                and since <= datetime.fromisoformat(r["interval_start"]) < until]


def _materialize(tmp_path: Path, fleet: FleetResource, day: str = DAY.isoformat(),
                 config: dict[str, Any] | None = None) -> dict[str, Any]:
    result = dg.materialize(
        [traffic_counts], partition_key=day,
        resources={"fleet": fleet, "artifacts": ArtifactStoreResource(root=str(tmp_path / "a"))},
        run_config={"ops": {"traffic_counts": {"config": config or {}}}},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    (mat,) = result.asset_materializations_for_node("traffic_counts")
    return {k: v.value for k, v in mat.metadata.items()}


def test_materialize_one_day(roadloop_home: Path, tmp_path: Path) -> None:
    cam1 = synthetic_records(minutes=40)
    cam2 = synthetic_records(minutes=35, seed=1, camera="cam-2")  # jam at 07:32
    yesterday = synthetic_records(day=DAY - timedelta(days=1), minutes=5)
    RECORDS["day"] = cam1 + cam2 + yesterday
    meta = _materialize(tmp_path, TrafficFleet(probe="day"))

    def vehicles(records: list[dict[str, Any]], direction: str | None = None) -> int:
        return sum(row["count"] for r in records for row in r["lines"]
                   if direction in (None, row["direction"]))

    assert meta["total_vehicles"] == vehicles(cam1 + cam2)
    assert meta["records"] == 75 and meta["cameras"] == ["cam-1", "cam-2"]
    assert meta["line_totals"]["cam-2/north/in"] == vehicles(cam2, "in")
    assert meta["vehicles/cam-1/north/out"] == vehicles(cam1, "out")
    assert meta["events"] == 2
    report = Path(meta["report_path"])
    assert report.name == MARKDOWN_NAME and report.parent.name == DAY.isoformat()
    assert report.is_file() and "## Events (2)" in report.read_text()
    assert meta["volumes"].startswith("| camera | line | direction |")
    assert f"| {meta['total_vehicles']} |" in meta["volumes"]

    # one camera only, by configuration
    meta = _materialize(tmp_path, TrafficFleet(probe="day"), config={"camera_ids": ["cam-2"]})
    assert meta["total_vehicles"] == vehicles(cam2) and meta["cameras"] == ["cam-2"]


def test_a_quiet_day_materializes_and_says_so(roadloop_home: Path, tmp_path: Path) -> None:
    RECORDS["quiet"] = []
    meta = _materialize(tmp_path, TrafficFleet(probe="quiet"), day="2026-11-19")
    assert meta["total_vehicles"] == 0 and meta["records"] == 0 and meta["plots"] == 0
    assert "No traffic records" in Path(meta["report_path"]).read_text()


# --------------------------------------------------------------------------- the resource
def _fake_gateway(records: list[dict[str, Any]], calls: list[dict[str, Any]]) -> Any:
    """``GET /v1/traffic/intervals`` as the gateway answers it: records in
    ``(interval_start, record_id)`` order, pages of ``limit``, an opaque keyset cursor."""

    def key(r: dict[str, Any]) -> tuple[datetime, str]:
        return datetime.fromisoformat(r["interval_start"]), r["record_id"]

    def request(method: str, url: str, **kw: Any) -> httpx.Response:
        assert method == "GET" and urlparse(url).path == "/v1/traffic/intervals"
        assert kw["headers"]["Authorization"] == "Bearer admin-token"
        params = dict(kw["params"])
        calls.append(params)
        since, until = (datetime.fromisoformat(params[k]) for k in ("since", "until"))
        rows = sorted((r for r in records if since <= key(r)[0] < until
                       and params.get("camera_id") in (None, r["camera_id"])), key=key)
        if "cursor" in params:
            at, rid = base64.urlsafe_b64decode(params["cursor"]).decode().split("|")
            rows = [r for r in rows if key(r) > (datetime.fromisoformat(at), rid)]
        page, more = rows[: params["limit"]], len(rows) > params["limit"]
        last = page[-1] if page else None
        cursor = (base64.urlsafe_b64encode(f"{last['interval_start']}|{last['record_id']}"
                                           .encode()).decode() if more and last else None)
        items = [{**r, "received_at": "2026-11-28T00:00:00+00:00"} for r in page]
        return httpx.Response(200, json={"items": items, "next_cursor": cursor},
                              request=httpx.Request(method, url))

    return request


def test_traffic_intervals_follows_the_cursor(monkeypatch: pytest.MonkeyPatch) -> None:
    from roadloop import fleet_admin

    records = synthetic_records(minutes=7) + synthetic_records(minutes=3, camera="cam-2")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(fleet_admin.httpx, "request", _fake_gateway(records, calls))
    fleet = FleetResource(gateway_url="http://gw.test", admin_token="admin-token")
    since = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC)
    until = since + timedelta(days=1)

    got = fleet.traffic_intervals("cam-1", since, until, page=3)
    assert [r["record_id"] for r in got] == [r["record_id"] for r in records[:7]]
    assert len(calls) == 3 and "cursor" not in calls[0] and calls[1]["cursor"]
    assert all(c["camera_id"] == "cam-1" and c["limit"] == 3 for c in calls)
    assert calls[0]["since"] == since.isoformat() and calls[0]["until"] == until.isoformat()

    calls.clear()
    everyone = fleet.traffic_intervals(None, since, until)
    assert len(everyone) == 10 and len(calls) == 1 and "camera_id" not in calls[0]
    starts = [r["interval_start"] for r in everyone]
    assert starts == sorted(starts)

    with pytest.raises(ValueError, match="timezone-aware"):
        fleet.traffic_intervals(None, since.replace(tzinfo=None), until)


def test_traffic_intervals_refuses_a_cursor_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from roadloop import fleet_admin

    def request(method: str, url: str, **kw: Any) -> httpx.Response:
        return httpx.Response(200, json={"items": [], "next_cursor": "same"},
                              request=httpx.Request(method, url))

    monkeypatch.setattr(fleet_admin.httpx, "request", request)
    fleet = FleetResource(gateway_url="http://gw.test", admin_token="t")
    since = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC)
    with pytest.raises(FleetError, match="twice"):
        fleet.traffic_intervals(None, since, since + timedelta(days=1))
