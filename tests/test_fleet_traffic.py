"""Gateway side of traffic analytics: interval intake (idempotent, own camera, bounded), the
camera config's ``traffic`` section, the query routes and the geometry preview.

``TestClient`` against a real SQLite file (the fixtures of tests/test_fleet_gateway.py).
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from fleet.db import TrafficIntervalRow, TrafficLineCountRow

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import T0, Env, assert_clear_4xx, bearer, meta, post_frame

make_env = gateway_tests.make_env
env = gateway_tests.env
frame_jpeg = gateway_tests.frame_jpeg

START = T0 - timedelta(minutes=2)  # aligned to 60 s
URL = "/v1/traffic/intervals"
GEOMETRY = {
    "frame_size": [320, 240],
    "lines": [{"name": "northbound", "start": [20, 120], "end": [300, 120]}],
    "zones": [{"name": "lane_1", "polygon": [[10, 10], [150, 10], [150, 100], [10, 100]]}],
}


def record(run: int = 1, start: Any = START, camera: str = "cam-a", **over: Any
           ) -> dict[str, Any]:
    ts = int(start.timestamp())
    body = {
        "record_id": f"{camera}.{ts}.{run}", "camera_id": camera,
        "interval_start": start.isoformat(), "interval_s": 60, "covered_s": 60.0,
        "frames": 598, "config_version": 1, "model_version": "sha256:abc",
        "lines": [{"line": "northbound", "direction": "in", "class_name": "car", "count": 3,
                   "pcu": 3.0, "speeds_kmh": [41.0 + run, 50.0 + run]},
                  {"line": "northbound", "direction": "in", "class_name": "truck", "count": 1,
                   "pcu": 2.5, "speeds_kmh": []}],
        "zones": [{"zone": "lane_1", "entries": {"car": 2}, "exits": 2, "dwell_s": [7.0, 5.0],
                   "occupancy_mean": 1.0, "occupancy_max": 2, "pcu_in": 2.0, "state": "normal",
                   "state_s": {"normal": 60.0}}],
        "events": [{"event_id": f"{camera}.ev.{run}.{ts}", "kind": "stopped_vehicle",
                    "at": (start + timedelta(seconds=20)).isoformat(), "zone": "lane_1",
                    "track_id": 7, "class_name": "car", "duration_s": 31.0, "frame_id": None,
                    "detail": "car 7 stopped in lane_1"}],
    }
    body.update(over)
    return body


def stored(env: Env) -> tuple[int, int]:
    with env.gw.db.read() as s:
        return (s.scalar(select(func.count()).select_from(TrafficIntervalRow)),
                s.scalar(select(func.count()).select_from(TrafficLineCountRow)))


def test_intake_is_idempotent_own_camera_only_and_lists_as_posted(env: Env) -> None:
    device = env.enroll("cam-a")["access_token"]
    first = env.client.post(URL, json=record(1), headers=bearer(device))
    assert first.status_code == 201, first.text
    assert first.json() == {"record_id": record(1)["record_id"], "stored": True}
    assert_clear_4xx(env.client.post(URL, json=record(1), headers=bearer(device)), 409,
                     "already stored")
    assert stored(env) == (1, 2)
    other = record(1, camera="cam-b")
    assert_clear_4xx(env.client.post(URL, json=other, headers=bearer(device)), 403, "cam-b")
    # a record id of another camera cannot be taken (it would block that camera's record)
    squat = record(2, record_id="cam-b.1.2")
    assert_clear_4xx(env.client.post(URL, json=squat, headers=bearer(device)), 422, "record_id")
    for run, minutes in ((2, 0), (3, -1)):  # another run of the same minute, an earlier one
        r = env.client.post(URL, json=record(run, START + timedelta(minutes=minutes)),
                            headers=bearer(device))
        assert r.status_code == 201, r.text
    assert stored(env) == (3, 6)

    assert env.client.get(URL, headers=bearer(device)).status_code == 403  # camera:admin only
    pages, cursor = [], None
    while True:
        params = {"camera_id": "cam-a", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = env.client.get(URL, params=params, headers=bearer(env.admin))
        assert page.status_code == 200, page.text
        pages.append(page.json()["items"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    items = [i for p in pages for i in p]
    assert [len(p) for p in pages] == [2, 1]
    assert [i["record_id"].rsplit(".", 1)[1] for i in items] == ["3", "1", "2"]
    posted = record(1)
    got = items[1]
    assert got.pop("received_at").startswith("2026-05-04T12:00:00")
    assert got["lines"] == posted["lines"] and got["zones"][0]["dwell_s"] == [7.0, 5.0]
    assert got["events"][0]["at"] == "2026-05-04T11:58:20Z"
    window = env.client.get(URL, params={"since": START.isoformat(),
                                         "until": (START + timedelta(minutes=1)).isoformat()},
                            headers=bearer(env.admin))
    assert len(window.json()["items"]) == 2
    assert_clear_4xx(env.client.get(URL, params={"cursor": "bm9wZQ"}, headers=bearer(env.admin)),
                     422, "cursor")


def _many_lines(n: int) -> list[dict[str, Any]]:
    return [{"line": f"l{i // 64}", "direction": "in" if i % 2 else "out",
             "class_name": f"c{i % 64 // 2}", "count": 1, "pcu": 1.0} for i in range(n)]


@pytest.mark.parametrize(("over", "words"), [
    ({"covered_s": 61.0}, ["covered_s", "interval_s"]),
    ({"frames": -1}, ["frames"]),
    ({"surprise": 1}, ["surprise"]),
    ({"interval_start": (START + timedelta(seconds=30)).isoformat()}, ["aligned"]),
    ({"lines": [{"line": "n", "direction": "in", "class_name": "car", "count": 1, "pcu": 1.0,
                 "speeds_kmh": [401.0]}]}, ["speeds_kmh"]),
    ({"lines": [{"line": "n", "direction": "in", "class_name": "car", "count": 1, "pcu": 1.0,
                 "speeds_kmh": [30.0, 40.0]}]}, ["one speed per counted vehicle"]),
    ({"lines": _many_lines(4097)}, ["lines"]),
    ({"events": record()["events"] * 201}, ["events"]),
    ({"zones": [{"zone": "lane_1", "entries": {"car": 1}, "exits": 1, "dwell_s": [-2.0]}]},
     ["dwell_s"]),
])
def test_hostile_records_are_422_and_store_nothing(env: Env, over: dict[str, Any],
                                                   words: list[str]) -> None:
    device = env.enroll("cam-a")["access_token"]
    r = env.client.post(URL, json=record(**over), headers=bearer(device))
    assert_clear_4xx(r, 422, *words)
    assert stored(env) == (0, 0)


def test_nan_is_422(env: Env) -> None:
    device = env.enroll("cam-a")["access_token"]
    text = json.dumps(record()).replace('"covered_s": 60.0', '"covered_s": NaN')
    r = env.client.post(URL, content=text, headers={**bearer(device),
                                                     "Content-Type": "application/json"})
    assert_clear_4xx(r, 422, "NaN")
    assert stored(env) == (0, 0)


def _put(env: Env, config: dict[str, Any], expected: int) -> Any:
    return env.client.put("/v1/cameras/cam-a/config", headers=bearer(env.admin),
                          json={"config": config, "expected_version": expected, "reason": "t"})


@pytest.mark.parametrize(("change", "words"), [
    ({"lines": [{"name": "n", "start": [20, 120], "end": [400, 120]}]},
     ["traffic.lines[0].end", "outside"]),
    ({"zones": [{"name": "bow", "polygon": [[10, 10], [100, 100], [100, 10], [10, 100]]}]},
     ["traffic.zones[0]", "self-intersecting"]),
    ({"homography": {"image_points": [[10, 10], [20, 20], [30, 30], [40, 40]],
                     "world_points": [[0, 0], [1, 0], [1, 1], [0, 1]]}},
     ["traffic.homography"]),
])
def test_bad_geometry_is_422_and_the_previous_version_stays(
        env: Env, change: dict[str, Any], words: list[str]) -> None:
    good = _put(env, {"traffic": GEOMETRY}, 0)
    assert good.status_code == 200 and good.json()["config"]["traffic"] == GEOMETRY, good.text
    assert_clear_4xx(_put(env, {"traffic": {**GEOMETRY, **change}}, 1), 422, *words)
    now = env.client.get("/v1/cameras/cam-a/config", headers=bearer(env.admin)).json()
    assert now["version"] == 1 and now["config"]["traffic"] == GEOMETRY


def test_counts_zones_and_events_sum_the_runs_of_one_interval(env: Env) -> None:
    device = env.enroll("cam-a")["access_token"]
    later = START + timedelta(hours=1)
    for body in (record(1), record(2), record(3, later)):
        assert env.client.post(URL, json=body, headers=bearer(device)).status_code == 201
    params = {"camera_id": "cam-a", "line": "northbound", "direction": "in",
              "class_name": "car", "since": (START - timedelta(minutes=5)).isoformat(),
              "until": (START + timedelta(minutes=5)).isoformat(), "bucket_s": 900}
    r = env.client.get("/v1/traffic/counts", params=params, headers=bearer(env.admin))
    assert r.status_code == 200, r.text
    (row,) = r.json()
    runs = [record(1)["lines"][0], record(2)["lines"][0]]
    pooled = [s for line in runs for s in line["speeds_kmh"]]
    assert row["count"] == sum(line["count"] for line in runs)
    assert row["pcu"] == pytest.approx(sum(line["pcu"] for line in runs))
    assert row["speeds_n"] == len(pooled)
    assert row["speed_median_kmh"] == pytest.approx(float(np.median(pooled)))
    assert row["speed_p85_kmh"] == pytest.approx(float(np.percentile(pooled, 85)))
    assert row["bucket_start"].startswith("2026-05-04T11:45:00")
    everything = env.client.get("/v1/traffic/counts", params={"bucket_s": 3600},
                                headers=bearer(env.admin)).json()
    assert {(v["class_name"], v["count"]) for v in everything} >= {("car", 3), ("truck", 1)}
    assert sum(v["count"] for v in everything) == 3 * 4
    assert_clear_4xx(env.client.get("/v1/traffic/counts", params={"bucket_s": 120},
                                    headers=bearer(env.admin)), 422, "bucket_s")

    zones = env.client.get("/v1/traffic/zones", params={"zone": "lane_1", "bucket_s": 60,
                                                        "until": later.isoformat()},
                           headers=bearer(env.admin))
    assert zones.status_code == 200, zones.text
    (z,) = zones.json()
    assert (z["entries"], z["exits"], z["dwell_n"]) == ({"car": 4}, 4, 4)
    events = env.client.get("/v1/traffic/events", params={"kind": "stopped_vehicle"},
                            headers=bearer(env.admin))
    assert [e["event_id"] for e in events.json()] == [
        record(r, s)["events"][0]["event_id"] for r, s in ((1, START), (2, START), (3, later))]
    assert env.client.get("/v1/traffic/events", params={"kind": "jam"},
                          headers=bearer(env.admin)).json() == []


def test_preview_draws_the_geometry_on_the_latest_frame(env: Env, frame_jpeg: bytes) -> None:
    device = env.enroll("cam-a")["access_token"]
    preview = "/v1/cameras/cam-a/preview.jpg"
    assert_clear_4xx(env.client.get(preview, headers=bearer(env.admin)), 404, "no stored frame")
    assert env.client.get(preview, headers=bearer(device)).status_code == 403
    assert post_frame(env.client, device, meta("f-1"), frame_jpeg).status_code == 201
    assert _put(env, {"traffic": GEOMETRY}, 0).status_code == 200
    assert env.client.post(URL, json=record(1), headers=bearer(device)).status_code == 201
    r = env.client.get(preview, headers=bearer(env.admin))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
    drawn = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)
    plain = np.asarray(Image.open(io.BytesIO(frame_jpeg)).convert("RGB"), dtype=np.int16)
    assert drawn.shape == plain.shape  # the stored frame's size (the geometry is scaled to it)
    h, w = plain.shape[:2]
    # the line runs at y = 120/240 of the frame from x = 20/320 to 300/320; away from it
    # (the zone is above, the label below) the frame is unchanged but for JPEG noise
    y, xs = round(h * 0.5), slice(round(w * 0.1), round(w * 0.2))
    on_line = np.abs(drawn[y, xs] - plain[y, xs]).mean()
    corner = np.abs(drawn[-8:, -8:] - plain[-8:, -8:]).mean()
    assert on_line > 40 > corner * 4, (on_line, corner)
