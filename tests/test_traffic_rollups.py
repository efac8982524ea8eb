"""roadloop.traffic.rollups against hand-computed expectations."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from roadloop.traffic import (
    bucket_start,
    check_bucket,
    congestion_timeline,
    events,
    line_volumes,
    zone_stats,
)


def _record(start, record_id, *, covered_s=60.0, lines=(), zones=(), evs=(), camera="cam-1"):
    return {
        "record_id": record_id,
        "camera_id": camera,
        "interval_start": start,
        "interval_s": 60,
        "covered_s": covered_s,
        "frames": 600,
        "config_version": 1,
        "model_version": "m",
        "lines": list(lines),
        "zones": list(zones),
        "events": list(evs),
    }


def _line(count, pcu, speeds, cls="car", line="north", direction="in"):
    return {"line": line, "direction": direction, "class_name": cls, "count": count,
            "pcu": pcu, "speeds_kmh": list(speeds)}


def _zone(occ_mean, occ_max, pcu_in, state_s, state="normal", entries=None, dwell=(), name="z1"):
    return {"zone": name, "entries": entries or {}, "exits": len(dwell), "dwell_s": list(dwell),
            "occupancy_mean": occ_mean, "occupancy_max": occ_max, "pcu_in": pcu_in,
            "state": state, "state_s": {"normal": 0.0, "warning": 0.0, "heavy": 0.0,
                                        "jam": 0.0, **state_s}}


def test_records_of_one_interval_sum_and_speeds_pool():
    records = [
        # two agent runs in the same minute: they sum
        _record("2026-11-27T11:00:00+00:00", "cam-1.a.1", covered_s=30.0,
                lines=[_line(3, 3.0, [40.0, 50.0]), _line(1, 2.5, [], cls="truck")]),
        _record("2026-11-27T11:00:00+00:00", "cam-1.a.2", covered_s=30.0,
                lines=[_line(2, 2.0, [60.0])]),
        _record("2026-11-27T11:14:00+00:00", "cam-1.b.1", lines=[_line(1, 1.0, [70.0])]),
        # next 15-minute bucket
        _record("2026-11-27T11:15:00+00:00", "cam-1.c.1", lines=[_line(5, 5.0, [])]),
    ]
    vols = line_volumes(records)
    first = {v.class_name: v for v in vols if v.bucket_start.minute == 0}
    car = first["car"]
    assert (car.count, car.pcu, car.speeds_n) == (6, 6.0, 4)
    assert car.speed_median_kmh == pytest.approx(55.0)
    # p85 of [40, 50, 60, 70], linear interpolation: rank 0.85 * 3 = 2.55 -> 60 + 0.55 * 10
    assert car.speed_p85_kmh == pytest.approx(65.5)
    truck = first["truck"]
    assert (truck.count, truck.pcu, truck.speed_median_kmh, truck.speed_p85_kmh) == (
        1, 2.5, None, None)
    later = [v for v in vols if v.bucket_start.minute == 15]
    assert [(v.count, v.speeds_n) for v in later] == [(5, 0)]
    # hourly bucket holds everything; a filter keeps one class
    hourly = line_volumes(records, 3600, class_name="car")
    assert [(v.count, v.pcu) for v in hourly] == [(11, 11.0)]
    d = car.to_dict()
    assert d["bucket_start"] == "2026-11-27T11:00:00+00:00" and d["count"] == 6


def test_a_record_seen_twice_counts_once_and_cameras_stay_apart():
    rec = _record("2026-11-27T11:00:00+00:00", "cam-1.x", lines=[_line(4, 4.0, [])])
    other = _record("2026-11-27T11:00:00+00:00", "cam-2.x", camera="cam-2",
                    lines=[_line(7, 7.0, [])])
    vols = line_volumes([rec, dict(rec), other])
    assert [(v.camera_id, v.count) for v in vols] == [("cam-1", 4), ("cam-2", 7)]
    assert [v.count for v in line_volumes([rec, other], camera_id="cam-2")] == [7]


def test_buckets_align_to_utc():
    # 11:29 at +01:00 is 10:29 UTC -> the 10:15 UTC quarter
    assert bucket_start("2026-11-27T11:29:00+01:00", 900) == datetime(
        2026, 11, 27, 10, 15, tzinfo=UTC)
    assert bucket_start("2026-11-27T10:59:59+00:00", 3600).hour == 10


@pytest.mark.parametrize("bad", [0, -60, 45, 90, 420, 7200 * 5, 900.0, True])
def test_bucket_must_be_whole_minutes_dividing_a_day(bad):
    with pytest.raises(ValueError, match="bucket_s"):
        check_bucket(bad)
    with pytest.raises(ValueError, match="bucket_s"):
        line_volumes([], bad)


@pytest.mark.parametrize("good", [60, 300, 900, 3600, 86400])
def test_valid_buckets(good):
    assert check_bucket(good) == good


def test_zone_occupancy_is_weighted_by_covered_seconds():
    records = [
        _record("2026-11-27T08:00:00+00:00", "r1", covered_s=60.0,
                zones=[_zone(1.0, 2, 6.5, {"normal": 60.0}, entries={"car": 4, "truck": 1},
                             dwell=[6.0, 8.0])]),
        _record("2026-11-27T08:01:00+00:00", "r2", covered_s=30.0,
                zones=[_zone(4.0, 6, 3.0, {"normal": 10.0, "heavy": 20.0}, state="heavy",
                             entries={"car": 2}, dwell=[10.0])]),
    ]
    [zb] = zone_stats(records)
    # (1.0 * 60 + 4.0 * 30) / 90, not the plain mean 2.5
    assert zb.occupancy_mean == pytest.approx(2.0)
    assert zb.occupancy_max == 6
    assert zb.entries == {"car": 6, "truck": 1} and zb.entries_total == 7
    assert zb.exits == 3 and zb.dwell_mean_s == pytest.approx(8.0) and zb.dwell_n == 3
    assert zb.pcu_in == pytest.approx(9.5)
    # 9.5 PCU in 90 watched seconds
    assert zb.covered_s == 90.0 and zb.pcu_flow_per_h == pytest.approx(380.0)
    assert zb.state_s == {"normal": 70.0, "warning": 0.0, "heavy": 20.0, "jam": 0.0}
    assert zb.worst_state == "heavy"
    assert zb.to_dict()["bucket_start"] == "2026-11-27T08:00:00+00:00"
    assert zone_stats(records, zone="other") == []


def test_congestion_timeline_merges_runs_and_breaks_at_gaps():
    def rec(minute, rid, state_s, state="normal"):
        return _record(f"2026-11-27T09:{minute:02d}:00+00:00", rid,
                       zones=[_zone(0, 0, 0, state_s, state=state)])

    records = [
        rec(0, "a", {"normal": 60.0}),
        rec(1, "b", {"normal": 20.0, "warning": 40.0}),
        rec(2, "c1", {"warning": 15.0, "normal": 15.0}),  # two runs in minute 2 sum:
        rec(2, "c2", {"warning": 25.0, "normal": 5.0}),   # warning 40 s, normal 20 s
        # minute 3 missing: a gap
        rec(4, "e", {"jam": 30.0, "heavy": 30.0}, state="jam"),  # tie -> the worse state
    ]
    [tl] = congestion_timeline(records)
    got = [(s.start.minute, s.end.minute, s.state) for s in tl.segments]
    assert got == [(0, 1, "normal"), (1, 3, "warning"), (4, 5, "jam")]
    assert tl.to_dict()["segments"][1]["start"] == "2026-11-27T09:01:00+00:00"


def test_events_once_each_in_time_order_and_by_kind():
    def ev(eid, kind, at):
        return {"event_id": eid, "kind": kind, "at": at, "zone": "z1", "line": None,
                "track_id": None, "class_name": None, "duration_s": 121.0,
                "frame_id": None, "detail": "d"}

    late = ev("e2", "jam_cleared", "2026-11-27T09:05:10+00:00")
    early = ev("e1", "jam", "2026-11-27T09:02:41.2+00:00")
    records = [
        _record("2026-11-27T09:05:00+00:00", "r2", evs=[late]),
        _record("2026-11-27T09:02:00+00:00", "r1", evs=[early]),
        _record("2026-11-27T09:02:00+00:00", "r1-resent-as-other-run", evs=[early]),
    ]
    got = events(records)
    assert [e.event_id for e in got] == ["e1", "e2"]
    assert [e.event_id for e in events(records, "jam_cleared")] == ["e2"]
    assert got[0].to_dict()["at"] == "2026-11-27T09:02:41.200000+00:00"
