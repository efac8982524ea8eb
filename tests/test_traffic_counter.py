"""edge_agent.traffic: geometry checks, tracking, line/zone counting, speeds, events, records.

Detections are written by hand along known paths (no detector), so each expectation is the
counting rule itself: a car that crosses once counts once, whatever its box does on the line.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_agent.camera_config import CameraConfigChannel
from edge_agent.counting import DensityState
from edge_agent.record_outbox import RecordOutbox
from edge_agent.traffic import parse_traffic_section
from edge_agent.traffic.counter import TrafficCounter
from edge_agent.traffic.intervals import IntervalAccumulator
from edge_agent.traffic.stage import TrafficStage

FPS = 10.0


@dataclass(frozen=True)
class Det:
    class_id: int
    class_name: str
    confidence: float
    box: tuple[float, float, float, float]

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return self.box


def car(x: float, y_bottom: float, cls: str = "car", conf: float = 0.8, h: float = 40) -> Det:
    return Det(0, cls, conf, (x - 20, y_bottom - h, x + 20, y_bottom))


# 1 px = 0.1 m on a top-down view: speeds are exact.
TOP_DOWN = {"image_points": [[0, 0], [640, 0], [640, 360], [0, 360]],
            "world_points": [[0, 0], [64, 0], [64, 36], [0, 36]]}


def geometry(**extra) -> dict:
    return {"frame_size": [640, 360],
            "lines": [{"name": "L", "start": [0, 200], "end": [640, 200]}], **extra}


def run(counter: TrafficCounter, frames: list[list[Det]]):
    outs = [counter.update(dets, i / FPS) for i, dets in enumerate(frames)]
    outs.append(counter.close())
    return outs


def crossings(outs):
    return [c for o in outs for c in o.crossings]


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(("section", "message"), [
    (geometry(lines=[{"name": "L", "start": [0, 200], "end": [700, 200]}]),
     "lies outside the 640x360 image"),
    (geometry(zones=[{"name": "Z", "polygon": [[0, 0], [100, 100], [100, 0], [0, 100]]}]),
     "self-intersecting"),
    (geometry(homography={"image_points": [[0, 0], [10, 10], [20, 20], [40, 10]],
                          "world_points": [[0, 0], [1, 0], [1, 4], [0, 4]]}), "degenerate"),
    (geometry(homography={"image_points": [[0, 0], [640, 0], [640, 360], [0, 360], [320, 180]],
                          "world_points": [[0, 0], [64, 0], [64, 36], [0, 36], [60, 2]]}),
     "inconsistent"),
    (geometry(lines=[{"name": "L", "start": [0, 1], "end": [9, 9]},
                     {"name": "L", "start": [0, 5], "end": [9, 5]}]), "used twice"),
    (geometry(lines=[{"name": "L", "start": [5, 5], "end": [5.5, 5]}]), "shorter than 2"),
    (geometry(interval_s=7), "interval_s"),
    (geometry(interval_s=60.0), "interval_s"),
    ({"frame_size": [1e12, 360]}, "frame_size"),
    ({"frame_size": [640, float("nan")]}, "frame_size"),
    (geometry(lines=[{"name": "L", "start": [0, 1e300], "end": [9, 9]}]), "must be between"),
    (geometry(lines=[{"name": "L", "start": [[0, 1]], "end": [9, 9]}]), "list of 2"),
    (geometry(zones=[{"name": "Z", "polygon": [[0, 0]] * 65}]), "list of 3-64"),
    (geometry(zones=[{"name": "Z", "polygon": [[0, 0], [9, 0], [9, 9]], "capacity": -1}]),
     "capacity"),
    (geometry(events={"jam_min_s": 1e9}), "jam_min_s"),
    (geometry(pcu={"car": True}), "pcu"),
    ({"frame_size": [640, 360], "lanes": []}, "unknown key"),
])
def test_bad_geometry_is_refused_with_a_clear_error(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_traffic_section(section)


def test_geometry_scales_to_the_stream_size_with_its_homography() -> None:
    cfg = parse_traffic_section(geometry(homography=TOP_DOWN))
    big = cfg.scaled_to(1280, 720)
    assert big.lines[0].end == (1280.0, 400.0)
    # the same ground point seen at twice the resolution maps to the same metres
    assert big.homography.to_world([[640, 400]]) == pytest.approx(
        cfg.homography.to_world([[320, 200]]))


# --------------------------------------------------------------------------- lines
def test_a_car_crossing_once_counts_once_with_direction_class_pcu_and_speed() -> None:
    counter = TrafficCounter(parse_traffic_section(geometry(homography=TOP_DOWN)), ["car"])
    # 100 px/s = 10 m/s = 36 km/h downwards: from the left of start→end to its right = "in".
    found = crossings(run(counter, [[car(300, 100 + 10 * i, "truck")] for i in range(25)]))
    assert [(c.line, c.direction, c.class_name, c.pcu) for c in found] == [
        ("L", "in", "truck", 2.5)]
    assert found[0].speed_kmh == pytest.approx(36.0, abs=0.5)
    up = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    found = crossings(run(up, [[car(300, 340 - 10 * i)] for i in range(25)]))
    assert [(c.direction, c.speed_kmh) for c in found] == [("out", None)]  # no homography


def test_a_box_flickering_across_the_line_and_a_car_stopping_on_it_count_once() -> None:
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    path = [150 + 5 * i for i in range(10)]  # approach to 195
    path += [198, 203, 197, 204, 196, 203] * 10  # jitter of the box's bottom across y=200
    path += [205 + 8 * i for i in range(10)]  # drives on
    frames = [[car(300, y)] for y in path]
    assert len(crossings(run(counter, frames))) == 1


def test_passing_beside_the_line_is_not_a_crossing() -> None:
    short = geometry(lines=[{"name": "L", "start": [0, 200], "end": [200, 200]}])
    counter = TrafficCounter(parse_traffic_section(short), ["car"])
    assert crossings(run(counter, [[car(500, 100 + 10 * i)] for i in range(25)])) == []


def test_an_unconfirmed_track_never_counts() -> None:
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    # Seen in every other frame only: the tracker never confirms it (3 consecutive hits).
    frames = [[car(300, 150 + 10 * i)] if i % 2 == 0 else [] for i in range(12)]
    outs = run(counter, frames)
    assert crossings(outs) == []
    assert all(t.track_id == -1 for o in outs for t in o.tracks)


def test_a_short_miss_keeps_the_track_and_its_count() -> None:
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    frames = [[car(300, 120 + 10 * i)] for i in range(20)]
    frames[7] = frames[8] = []  # two missed frames right at the line (0.2 s < lost_s)
    outs = run(counter, frames)
    assert len(crossings(outs)) == 1
    assert {t.track_id for o in outs for t in o.confirmed} == {0}


def test_a_car_first_seen_beyond_the_line_does_not_count() -> None:
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    assert crossings(run(counter, [[car(300, 250 + 10 * i)] for i in range(10)])) == []


def test_a_fast_car_that_crosses_before_its_track_is_confirmed_counts() -> None:
    # 25 px a frame (a car near the camera at 10 fps): its first three boxes — the frames the
    # tracker needs to confirm it — already take it from 175 to 225, across y=200.
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    outs = run(counter, [[car(300, 175 + 25 * i)] for i in range(6)])
    assert [(c.line, c.direction) for c in crossings(outs)] == [("L", "in")]
    assert crossings(outs)[0].stream_time == pytest.approx(0.2)  # counted at confirmation


def test_a_second_partial_box_on_a_counted_car_does_not_count_it_again() -> None:
    # A weak detector's second box on the same car (its lower part), first seen before the
    # line and confirmed beyond it, while the car's own track counted the crossing.
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    frames = []
    for i in range(12):
        y = 150 + 10 * i
        dets = [car(300, y)]
        if 4 <= i <= 9:  # the partial box's bottom 188 … 238, confirmed at 208 (i = 6), the
            # frame in which the car's own track counts (210): checked after it, not before
            dets.insert(0, Det(0, "car", 0.8, (282, y - 25, 318, y - 2)))  # listed first
        frames.append(dets)
    outs = run(counter, frames)
    assert len({t.track_id for o in outs for t in o.confirmed}) == 2  # two tracks, …
    assert len(crossings(outs)) == 1  # … one vehicle counted once


def test_class_is_voted_over_the_track_and_wrong_way_is_an_event() -> None:
    g = geometry(lines=[{"name": "L", "start": [0, 200], "end": [640, 200], "allowed": "out"}])
    counter = TrafficCounter(parse_traffic_section(g), ["car", "van"])
    frames = [[car(300, 100 + 10 * i, "van" if i == 9 else "car")] for i in range(25)]
    outs = run(counter, frames)
    assert [(c.class_name, c.wrong_way) for c in crossings(outs)] == [("car", True)]
    assert [e.kind for o in outs for e in o.events] == ["wrong_way"]


# --------------------------------------------------------------------------- zones
def test_zone_entries_exits_dwell_occupancy_and_jam_events() -> None:
    zone = {"name": "Z", "polygon": [[0, 150], [640, 150], [640, 300], [0, 300]], "capacity": 2}
    g = geometry(zones=[zone], events={"jam_min_s": 10})
    counter = TrafficCounter(parse_traffic_section(g), ["car"])
    # Two cars drive into the zone and stand there (occupancy 2 of capacity 2: jam) for 15 s,
    # then leave downwards.
    frames = []
    for i in range(220):
        y = 100 + 10 * i if i < 12 else 220 if i < 170 else 220 + 10 * (i - 170)
        frames.append([car(150, y), car(450, y)])
    outs = run(counter, frames)
    entries = [e for o in outs for e in o.entries]
    exits = [x for o in outs for x in o.exits]
    assert len(entries) == 2 and len(exits) == 2
    assert all(x.dwell_s == pytest.approx(17.2, abs=0.5) for x in exits)
    assert max(z.occupancy for o in outs for z in o.zones) == 2
    assert any(z.state == DensityState.JAM for o in outs for z in o.zones)
    kinds = [e.kind for o in outs for e in o.events]
    assert kinds == ["jam", "jam_cleared"]  # standing in a jam is congestion, not an incident


def test_a_vehicle_standing_alone_in_a_lane_is_a_stopped_vehicle_event() -> None:
    lane = {"name": "lane", "polygon": [[200, 0], [400, 0], [400, 360], [200, 360]]}
    g = geometry(homography=TOP_DOWN, zones=[lane], events={"stopped_min_s": 5})
    counter = TrafficCounter(parse_traffic_section(g), ["car"])
    # one car stops in the lane after 1 s; another stands beside the road (parked) all along
    frames = [[car(300, 100 + 5 * min(i, 10)), car(550, 300)] for i in range(120)]
    events = [e for o in run(counter, frames) for e in o.events]
    assert [(e.kind, e.zone) for e in events] == [("stopped_vehicle", "lane")]
    assert events[0].duration_s >= 5


# --------------------------------------------------------------------------- records
def test_interval_records_sum_roll_over_and_cover_only_watched_time() -> None:
    counter = TrafficCounter(parse_traffic_section(geometry()), ["car"])
    acc = IntervalAccumulator("cam", interval_s=60, zones=[], segment_started_at=1030.0,
                              config_version=2, model_version="m")
    records = []
    # Two cars, one crossing in the minute starting at 1020, one in the next (1080).
    for i in range(700):
        t = 1030.0 + i / FPS
        dets = []
        if i < 30:
            dets.append(car(200, 100 + 10 * i))
        if 600 <= i < 630:
            dets.append(car(400, 100 + 10 * (i - 600)))
        records += acc.add(counter.update(dets, t - 1030.0), t)
    records += acc.close()
    assert [r["interval_start"][-14:-6] for r in records] == ["00:17:00", "00:18:00"]
    assert records[0]["record_id"] == "cam.1020.1030000"
    assert records[0]["covered_s"] == pytest.approx(50.0)  # started 10 s into the minute
    assert records[1]["covered_s"] == pytest.approx(19.9, abs=0.01)  # stopped at 1099.9
    assert [row["count"] for r in records for row in r["lines"]] == [1, 1]
    assert records[0]["frames"] + records[1]["frames"] == 700


def test_record_outbox_survives_a_restart_and_never_queues_an_id_twice(tmp_path) -> None:
    body = {"record_id": "cam.60.1", "lines": []}
    with RecordOutbox(tmp_path) as box:
        assert box.put("cam.60.1", body)
        assert not box.put("cam.60.1", body)
        box.fail("cam.60.1", "gateway down", now=100.0)
    with RecordOutbox(tmp_path) as box:  # restarted agent
        assert box.depth() == 1
        (item,) = box.due(now=1e12)
        assert item.attempts == 1 and item.body == '{"record_id":"cam.60.1","lines":[]}'
        box.ack("cam.60.1", duplicate=True)
        assert box.depth() == 0 and not box.put("cam.60.1", body)
        assert box.journal() == {"cam.60.1": "duplicate"}


def test_record_outbox_is_bounded_and_counts_what_it_dropped(tmp_path) -> None:
    with RecordOutbox(tmp_path, max_records=3) as box:
        for i in range(5):
            box.put(f"r{i}", {"i": i}, now=float(i))
        assert [r.record_id for r in box.due(now=1e12)] == ["r2", "r3", "r4"]
        assert box.counter("evicted") == 2


@dataclass
class _Frame:
    image: object
    captured_at: float
    media_time: float

    @property
    def stream_time(self) -> float:
        return self.media_time


class _Image:
    shape = (360, 640, 3)


def test_stage_closes_the_segment_when_the_geometry_changes() -> None:
    stage = TrafficStage("cam")
    first = parse_traffic_section(geometry())
    second = parse_traffic_section(geometry(interval_s=300))
    records = []
    for i in range(40):
        frame = _Frame(_Image(), 5000.0 + i / FPS, i / FPS)
        geo, version = (first, 1) if i < 20 else (second, 2)
        traffic = stage.process([car(300, 100 + 10 * i)], frame, geo, version, ["car"], "m")
        records += stage.commit(traffic, frame, None)
    records += stage.close()
    assert [(r["config_version"], r["interval_s"]) for r in records] == [(1, 60), (2, 300)]
    assert len({r["record_id"] for r in records}) == 2
    assert stage.crossings_total == 1  # the car crossed under the first geometry


def test_camera_config_channel_refuses_a_bad_geometry_and_keeps_the_last_good(tmp_path) -> None:
    channel = CameraConfigChannel("cam", tmp_path, base_rate=0.1, hourly_budget=None)
    assert channel.apply({"version": 1, "config": {"traffic": geometry()}})
    good, version = channel.traffic_geometry()
    assert version == 1 and good.lines[0].name == "L"
    bad = geometry(zones=[{"name": "Z", "polygon": [[0, 0], [100, 100], [100, 0], [0, 100]]}])
    assert not channel.apply({"version": 2, "config": {"traffic": bad}})
    assert channel.traffic_geometry() == (good, 1)
    assert "self-intersecting" in channel.error["reason"]
    restarted = CameraConfigChannel("cam", tmp_path, base_rate=0.1, hourly_budget=None)
    assert restarted.load() and restarted.traffic_geometry()[0].lines[0].name == "L"


def test_a_crash_loses_at_most_the_counts_since_the_last_checkpoint(tmp_path) -> None:
    checkpoint = tmp_path / "traffic_checkpoint.json"
    geo = parse_traffic_section(geometry())
    stage = TrafficStage("cam", checkpoint_path=checkpoint, checkpoint_s=1.0)
    queued = []
    # 40 s of video from 09:59:40: one car crosses at ~1 s, one at ~31 s (next minute)
    for i in range(400):
        frame = _Frame(_Image(), 1_764_237_580.0 + i / FPS, i / FPS)
        dets = [car(300, 100 + 10 * (i % 300))] if i % 300 < 30 else []
        traffic = stage.process(dets, frame, geo, 1, ["car"], "m")
        closed = stage.commit(traffic, frame, None)
        if closed:  # the minute's record; the file still holds its snapshot until queued
            assert TrafficStage.recover_checkpoint(checkpoint)["record_id"] == \
                closed[0]["record_id"]
        queued += closed
    # SIGKILL here: nothing closed the running minute. The restarted agent finds its checkpoint.
    (first,) = queued
    left = TrafficStage.recover_checkpoint(checkpoint)
    assert left["record_id"] != first["record_id"]
    assert left["interval_start"] > first["interval_start"]
    assert sum(row["count"] for row in left["lines"]) == 1  # the second car, kept
    assert 19.0 <= left["covered_s"] <= 20.0  # watched up to the last checkpoint (< 1 s ago)
    with RecordOutbox(tmp_path / "outbox") as box:
        assert box.put(first["record_id"], first) and box.put(left["record_id"], left)
        assert not box.put(left["record_id"], left)  # a second recovery queues nothing
    stage.close()
    stage.clear_checkpoint()
    assert TrafficStage.recover_checkpoint(checkpoint) is None


@pytest.mark.parametrize("content", ["{not json", "[]", '{"record_id": 7}', ""])
def test_an_unusable_checkpoint_is_ignored_not_queued(tmp_path, content: str) -> None:
    path = tmp_path / "traffic_checkpoint.json"
    path.write_text(content)
    assert TrafficStage.recover_checkpoint(path) is None
