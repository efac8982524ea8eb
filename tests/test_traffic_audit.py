"""Defects a traffic audit reproduced, each pinned by the scene that showed it: a live clock
stepping back, a vehicle re-identified while stopped on a line, an underdetermined
homography, buckets shorter than the records, a stalled source's gap counted as watched,
and a density state that flapped with one vehicle."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.counting import DensityState, DensityTracker
from edge_agent.sources import Frame, StreamSource, VideoFileSource
from edge_agent.traffic import parse_traffic_section
from edge_agent.traffic.counter import TrafficCounter
from edge_agent.traffic.events import Crossing, FrameTraffic, ZoneState
from edge_agent.traffic.geometry import fit_homography
from edge_agent.traffic.intervals import IntervalAccumulator
from edge_agent.traffic.stage import TrafficStage
from roadloop.traffic import rollups

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import Env, assert_clear_4xx, bearer
from .test_fleet_traffic import START, URL, record
from .test_traffic_counter import car, crossings, geometry, run

make_env = gateway_tests.make_env
env = gateway_tests.env
T0 = 1_764_237_630.0  # 10:00:30 UTC


# --------------------------------------------------------------------------- 1. clock steps
def test_a_live_clock_stepping_back_loses_no_count_and_repeats_no_record_id() -> None:
    """240 s of a live camera at 10 fps, a car every 5 s; after 60 s NTP sets the wall
    clock back 90 s. Every car counts, and the minutes seen twice get a second record of
    their own id (the gateway refuses a repeated id: its counts were lost)."""
    geo = parse_traffic_section(geometry())
    stage = TrafficStage("cam")
    image = np.zeros((360, 640, 3), np.uint8)
    records, expected = [], 0
    for i in range(2400):
        wall = T0 + i / 10 - (90.0 if i >= 600 else 0.0)
        k = i % 50
        dets = [car(300, 100 + 10 * k)] if k < 30 else []
        expected += k == 10
        frame = Frame(image, i, wall, "stream:test", monotonic_time=5000.0 + i / 10)
        traffic = stage.process(dets, frame, geo, 1, ["car"], "m")
        records += stage.commit(traffic, frame, None)
    records += stage.close()
    assert stage.crossings_total == expected == 48
    assert sum(row["count"] for r in records for row in r["lines"]) == expected
    ids = [r["record_id"] for r in records]
    assert len(ids) == len(set(ids))
    assert sum(r["covered_s"] for r in records) == pytest.approx(239.9, abs=0.2)


def test_the_accumulator_starts_a_new_segment_when_the_wall_clock_goes_back() -> None:
    acc = IntervalAccumulator("cam", interval_s=60, zones=[], segment_started_at=T0,
                              config_version=1, model_version="m")
    cross = Crossing("L", "in", "car", 1, 0.0, None, 1.0, False)
    records = []
    for i in range(1200):  # a crossing every 10 s; the clock goes back 90 s after 60 s
        wall = T0 + i / 10 - (90.0 if i >= 600 else 0.0)
        frame = FrameTraffic([], crossings=[cross] if i % 100 == 0 else [])
        records += acc.add(frame, wall, stream_time_to_wall=wall - i / 10)
    records += acc.close()
    ids = [r["record_id"] for r in records]
    assert len(ids) == len(set(ids)), ids
    assert sum(row["count"] for r in records for row in r["lines"]) == 12
    starts = [r["interval_start"][11:19] for r in records]
    assert starts == ["10:00:00", "10:01:00", "10:00:00"]  # 10:00 twice, two segments


def test_a_clock_step_back_does_not_blind_the_tracker() -> None:
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    ids = []
    for i in range(30):
        t = i / 10 - (90.0 if i >= 10 else 0.0)
        ids.append([b.track_id for b in counter.update([car(300, 100 + 5 * i)], t).tracks])
    assert all(tid >= 0 for frame in ids[5:] for tid in frame), ids


def _write_video(path: Path, n: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    for i in range(n):
        writer.write(np.full((48, 64, 3), i * 20, np.uint8))
    writer.release()


def test_live_frames_carry_a_monotonic_media_time_and_files_keep_theirs(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "v.avi"
    _write_video(path, 6)
    stop = threading.Event()
    live = []
    for frame in StreamSource(str(path), max_reconnects=0).frames(stop):
        live.append(frame)
        if len(live) == 5:
            stop.set()
            break
    assert all(f.is_live and f.media_time is None and f.monotonic_time is not None
               for f in live)
    assert [f.stream_time for f in live] == [f.monotonic_time for f in live]
    assert all(b.stream_time >= a.stream_time for a, b in itertools.pairwise(live))
    files = list(VideoFileSource(path, realtime=False).frames(threading.Event()))
    assert not any(f.is_live for f in files)
    assert [f.stream_time for f in files] == pytest.approx([i / 25 for i in range(6)])


# --------------------------------------------------------------------------- 2. re-ID on a line
def test_a_vehicle_reidentified_while_stopped_on_the_line_counts_once() -> None:
    geo = parse_traffic_section(geometry())  # line y = 200, band 4 px for 40 px boxes
    frames = [[car(300, 100 + 10 * i)] for i in range(10)]  # firm side above the line
    frames += [[car(300, 201)] for _ in range(20)]  # stops on the line
    frames += [[] for _ in range(20)]  # hidden 2 s: longer than lost_s, a new ID after
    frames += [[car(300, 201)] for _ in range(20)]  # seen again, still on the line
    frames += [[car(300, 201 + 10 * i)] for i in range(1, 10)]  # drives off
    found = crossings(run(TrafficCounter(geo, ["car"]), frames))
    assert [c.direction for c in found] == ["in"]
    assert found[0].track_id != 0  # counted by the successor, which took the side over


def test_a_vehicle_that_already_crossed_does_not_count_again_through_its_successor() -> None:
    geo = parse_traffic_section(geometry())
    frames = [[car(300, 100 + 10 * i)] for i in range(12)]  # crosses: counted at y = 210
    frames += [[car(300, 202)] for _ in range(20)]  # settles back into the band
    frames += [[] for _ in range(20)]  # hidden: a new ID after
    frames += [[car(300, 202)] for _ in range(20)]
    frames += [[car(300, 202 - 10 * i)] for i in range(1, 10)]  # backs off over the line
    found = crossings(run(TrafficCounter(geo, ["car"]), frames))
    assert [(c.track_id, c.direction) for c in found] == [(0, "in")]


def test_a_track_born_on_the_line_far_from_the_lost_one_takes_no_side() -> None:
    geo = parse_traffic_section(geometry())
    frames = [[car(100, 100 + 10 * i)] for i in range(10)] + [[car(100, 201)]] * 20
    frames += [[] for _ in range(20)]
    frames += [[car(500, 201)] for _ in range(20)]  # another vehicle, 400 px away
    frames += [[car(500, 201 + 10 * i)] for i in range(1, 10)]
    assert crossings(run(TrafficCounter(geo, ["car"]), frames)) == []


# --------------------------------------------------------------------------- 3. homography
def test_a_homography_with_all_but_one_point_on_a_line_is_refused() -> None:
    image = [(100, 300), (200, 300), (300, 300), (400, 300), (250, 100)]
    world = [(x / 10, y / 10) for x, y in image]
    with pytest.raises(ValueError, match="degenerate: no four"):
        fit_homography(image, world)
    # the same line plus two points off it determine it: accepted, and exact
    image.append((120, 40))
    world.append((12.0, 4.0))
    h = fit_homography(image, world)
    assert h.to_world(np.array([[500.0, 50.0]]))[0] == pytest.approx([50.0, 5.0], abs=1e-6)


# --------------------------------------------------------------------------- 4. buckets
def _record_900() -> dict:
    return {"record_id": "cam.1764237600.1", "camera_id": "cam",
            "interval_start": "2025-11-27T10:00:00+00:00", "interval_s": 900, "covered_s": 900.0,
            "lines": [{"line": "L", "direction": "in", "class_name": "car", "count": 150,
                       "pcu": 150.0, "speeds_kmh": []}],
            "zones": [{"zone": "Z", "entries": {"car": 150}, "exits": 150, "dwell_s": [],
                       "occupancy_mean": 2.0, "occupancy_max": 5, "pcu_in": 150.0,
                       "state": "normal", "state_s": {"normal": 900.0}}]}


def test_a_bucket_shorter_than_the_records_is_refused_not_inflated() -> None:
    rec = _record_900()
    for fn in (rollups.line_volumes, rollups.zone_stats, rollups.coverage):
        with pytest.raises(ValueError, match="multiple of 900"):
            fn([rec], 60)
    (zone,) = rollups.zone_stats([rec], 900)
    assert zone.pcu_flow_per_h == pytest.approx(600.0)
    (hour,) = rollups.zone_stats([rec], 3600)
    assert hour.pcu_flow_per_h == pytest.approx(600.0)
    assert rollups.line_volumes([rec], 60, camera_id="other") == []  # not its records
    assert rollups.fitting_bucket([rec], 900) == 900
    assert rollups.fitting_bucket([{**rec, "interval_s": 3600}], 900) == 3600


def test_the_gateway_answers_a_bucket_shorter_than_the_records_with_a_422(env: Env) -> None:
    device = env.enroll("cam-a")["access_token"]
    start = datetime.fromtimestamp(int(START.timestamp()) // 900 * 900 - 900, UTC)
    body = record(1, start, interval_s=900, covered_s=900.0)
    body["zones"][0]["pcu_in"] = 150.0
    body["zones"][0]["state_s"] = {"normal": 900.0}
    body["events"][0]["at"] = (start + timedelta(seconds=20)).isoformat()
    assert env.client.post(URL, json=body, headers=bearer(device)).status_code == 201
    admin = bearer(env.admin)
    for path in ("/v1/traffic/zones", "/v1/traffic/counts"):
        r = env.client.get(path, params={"bucket_s": 60}, headers=admin)
        assert_clear_4xx(r, 422, "bucket_s 60", "900 s intervals")
    (zone,) = env.client.get("/v1/traffic/zones", params={"bucket_s": 900},
                             headers=admin).json()
    assert zone["pcu_flow_per_h"] == pytest.approx(600.0)


# --------------------------------------------------------------------------- 5. coverage
def test_a_stalled_source_is_not_watched_time() -> None:
    acc = IntervalAccumulator("cam", interval_s=60, zones=["Z"], segment_started_at=T0 - 30,
                              config_version=1, model_version="m")
    t0 = T0 - 30  # 10:00:00
    times = [t0 + i / 10 for i in range(100)] + [t0 + 50 + i / 10 for i in range(100)]
    records = []
    for t in [*times, t0 + 60.05]:  # frames 0-10 s, nothing for 40 s, frames 50-60 s
        frame = FrameTraffic([], zones=[ZoneState("Z", 4, DensityState.HEAVY)])
        records += acc.add(frame, t)
    (rec,) = records
    # 9.9 + 9.9 s of frames, the stall capped at 5 s, 0.1 s up to the minute's end
    assert rec["covered_s"] == pytest.approx(24.9)
    assert rec["zones"][0]["occupancy_mean"] == pytest.approx(4.0)
    assert rec["zones"][0]["state_s"]["heavy"] == pytest.approx(rec["covered_s"])


# --------------------------------------------------------------------------- 6. hysteresis
def test_one_vehicle_coming_and_going_does_not_flap_the_density_state() -> None:
    d = DensityTracker(10)  # the default zone capacity
    labels = [d.update(n)[0].label for n in (8, 7, 8, 7, 8, 7, 6, 5, 6, 5, 4)]
    assert labels == ["jam"] * 6 + ["heavy"] * 4 + ["warning"]
    small = DensityTracker(4)
    labels = [small.update(n)[0].label for n in (4, 3, 4, 3, 2, 3, 2, 1, 2, 1, 0)]
    assert labels == ["jam"] * 4 + ["heavy"] * 3 + ["warning"] * 3 + ["normal"]


@pytest.mark.parametrize("capacity", [2, 3, 4, 5, 7, 10, 13, 20, 30.0])
def test_every_level_has_a_dead_band_of_at_least_one_vehicle(capacity: float) -> None:
    for enter_n, leave_n in DensityTracker(capacity).level_counts():
        assert leave_n <= max(enter_n - 2, 0)


def test_a_jam_is_reported_and_cleared_once_while_one_vehicle_comes_and_goes() -> None:
    geo = parse_traffic_section({
        "frame_size": [640, 360], "events": {"jam_min_s": 10},
        "zones": [{"name": "Z", "polygon": [[0, 0], [640, 0], [640, 360], [0, 360]]}]})
    counter = TrafficCounter(geo, ["car"])
    parked = [car(40 + 75 * k, 300) for k in range(7)]  # 7 vehicles stand in the zone
    kinds = []
    for i in range(900):  # an 8th comes and goes every 3 s; after 60 s all leave
        extra = [car(600, 100)] if (i // 30) % 2 == 0 else []
        dets = parked + extra if i < 600 else []
        kinds += [e.kind for e in counter.update(dets, i / 10).events]
    assert kinds == ["jam", "jam_cleared"]
