"""Traffic counting across mid-run changes: a new configuration version, an edited geometry,
a stream of another resolution, a detector swap. What is in progress (a vehicle standing on
a line or in a zone, a jam, a standing vehicle) goes on: counted once, entered once,
reported once; records say which configuration and model their counts come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from edge_agent.sources import Frame
from edge_agent.traffic import parse_traffic_section
from edge_agent.traffic.stage import TrafficStage

from .test_traffic_counter import Det

FPS = 10.0
T0 = 1_764_237_600.0  # 10:00:00 UTC, a minute boundary
SMALL = np.zeros((360, 640, 3), np.uint8)
BIG = np.zeros((720, 1280, 3), np.uint8)
LINE = {"name": "L", "start": [0, 200], "end": [640, 200]}
ZONE = {"name": "Z", "polygon": [[0, 250], [640, 250], [640, 360], [0, 360]], "capacity": 10}
EV = {"jam_min_s": 10, "stopped_min_s": 5}


def car(x: float, yb: float, cls: str = "car", h: float = 40, scale: float = 1.0) -> Det:
    return Det(0, cls, 0.8, ((x - 20) * scale, (yb - h) * scale, (x + 20) * scale, yb * scale))


def geo(lines=(LINE,), zones=(), **extra):
    return parse_traffic_section({"frame_size": [640, 360], "lines": list(lines),
                                  "zones": list(zones), **extra})


@dataclass
class Step:
    dets: list
    geometry: object
    version: int = 1
    model: str = "m"
    names: tuple = ("car",)
    image: np.ndarray | None = None  # SMALL


def drive(n: int, step: Callable[[int], Step]) -> tuple[TrafficStage, list[dict]]:
    stage, records = TrafficStage("cam"), []
    for i in range(n):
        s = step(i)
        frame = Frame(SMALL if s.image is None else s.image, i, T0 + i / FPS, "stream:test", monotonic_time=5000.0 + i / FPS)
        traffic = stage.process(s.dets, frame, s.geometry, s.version, list(s.names), s.model)
        records += stage.commit(traffic, frame, None)
    records += stage.close()
    return stage, records


def zone_totals(records: list[dict]) -> tuple[int, int, list[float]]:
    entries = sum(sum(z["entries"].values()) for r in records for z in r["zones"])
    exits = sum(z["exits"] for r in records for z in r["zones"])
    dwell = [d for r in records for z in r["zones"] for d in z["dwell_s"]]
    return entries, exits, dwell


def events(records: list[dict]) -> list[tuple[str, float]]:
    return [(e["kind"], e["duration_s"]) for r in records for e in r["events"]]


# A vehicle drives down to the line, stands on it (inside its band) for 20 s, then drives on.
STAND_ON_LINE = [100 + 10 * i for i in range(10)] + [201] * 200 + \
    [201 + 10 * i for i in range(1, 12)]
OTHER_LINE = {"name": "M", "start": [0, 50], "end": [640, 50]}


@pytest.mark.parametrize("change", ["same_section", "line_added", "resolution",
                                    "resolution_and_line_added"])
def test_a_vehicle_standing_on_a_line_counts_once_across_a_change(change: str) -> None:
    before = geo()
    after = geo(lines=(LINE, OTHER_LINE)) if "line_added" in change else geo()
    big_first = change.startswith("resolution")

    def step(i: int) -> Step:
        late = i >= 150  # the change comes while the vehicle stands on the line
        y = STAND_ON_LINE[i]
        if big_first and not late:  # the same view at 1280x720
            return Step([car(300, y, h=40, scale=2.0)], before, image=BIG)
        return Step([car(300, y)], after if late else before,
                    version=2 if late and change != "resolution" else 1)

    stage, records = drive(len(STAND_ON_LINE), step)
    assert stage.crossings_total == 1
    assert [(row["line"], row["count"]) for r in records for row in r["lines"]] == [("L", 1)]
    assert records[-1]["config_version"] == (1 if change == "resolution" else 2)


def test_a_vehicle_that_counted_does_not_count_again_on_its_line_moved_ahead_of_it() -> None:
    moved = dict(LINE, start=[0, 280], end=[640, 280])  # further along the vehicle's path
    before, after = geo(), geo(lines=(moved,))

    def step(i: int) -> Step:  # 100 → 330 at 5 px a frame; line moved at y = 240
        g, v = (before, 1) if i < 28 else (after, 2)
        return Step([car(300, 100 + 5 * i)], g, v)

    stage, _ = drive(47, step)
    assert stage.crossings_total == 1


@pytest.mark.parametrize("change", ["same_section", "pcu_only", "zone_added", "resolution"])
def test_vehicles_standing_in_a_zone_enter_once_and_keep_their_dwell(change: str) -> None:
    other = {"name": "Y", "polygon": [[0, 0], [640, 0], [640, 100], [0, 100]]}
    before = geo(zones=(ZONE,))
    after = {"same_section": geo(zones=(ZONE,)), "resolution": before,
             "pcu_only": geo(zones=(ZONE,), pcu={"car": 1.2}),
             "zone_added": geo(zones=(ZONE, other))}[change]

    def step(i: int) -> Step:  # 3 cars stand in Z for 60 s; the change at 30 s
        late = i >= 300
        if change == "resolution" and not late:
            return Step([car(100 + 150 * j, 300, scale=2.0) for j in range(3)], before,
                        image=BIG)
        return Step([car(100 + 150 * j, 300) for j in range(3)], after if late else before,
                    version=2 if late and change != "resolution" else 1)

    _, records = drive(600, step)
    entries, exits, dwell = zone_totals(records)
    assert (entries, exits) == (3, 3), (entries, exits, dwell)
    assert min(dwell) > 59
    if change == "pcu_only":  # the new weights apply from the change on
        assert {r["config_version"] for r in records} == {1, 2}


def test_a_zone_removed_under_standing_vehicles_gets_their_exits_once() -> None:
    kept = {"name": "K", "polygon": [[0, 0], [640, 0], [640, 100], [0, 100]]}
    before, after = geo(zones=(ZONE, kept)), geo(zones=(kept,))

    def step(i: int) -> Step:  # 2 cars stand in Z for 40 s; Z is removed at 20 s
        g, v = (before, 1) if i < 200 else (after, 2)
        return Step([car(100 + 200 * j, 300) for j in range(2)], g, v)

    _, records = drive(400, step)
    z = [(r["config_version"], zr["exits"], zr["dwell_s"]) for r in records
         for zr in r["zones"] if zr["zone"] == "Z" and zr["exits"]]
    assert [(v, n) for v, n, _ in z] == [(1, 2)]  # left when the zone went, in its segment
    assert all(19 < d < 21 for d in z[0][2])
    assert zone_totals(records)[:2] == (2, 2)


@pytest.mark.parametrize("change", ["same_section", "line_added", "resolution"])
def test_a_jam_across_a_change_is_reported_once_and_cleared_once(change: str) -> None:
    zone = dict(ZONE, capacity=4)
    before = geo(zones=(zone,), events=EV)
    after = geo(lines=(LINE, OTHER_LINE), zones=(zone,), events=EV) if change == "line_added" \
        else before if change == "resolution" else geo(zones=(zone,), events=EV)

    def step(i: int) -> Step:  # 4 cars jam Z for 60 s; the change at 30 s
        late = i >= 300
        cars = [(80 + 150 * j, 300) for j in range(4)] if i < 600 else []
        if change == "resolution" and not late:
            return Step([car(x, y, scale=2.0) for x, y in cars], before, image=BIG)
        return Step([car(x, y) for x, y in cars], after if late else before,
                    version=2 if late and change != "resolution" else 1)

    _, records = drive(700, step)
    got = events(records)
    assert [k for k, _ in got] == ["jam", "jam_cleared"], got
    assert dict(got)["jam_cleared"] >= 59


@pytest.mark.parametrize("change", ["same_section", "zone_added", "resolution"])
def test_a_standing_vehicle_across_a_change_is_one_event(change: str) -> None:
    other = {"name": "Y", "polygon": [[0, 0], [640, 0], [640, 100], [0, 100]]}
    before = geo(zones=(ZONE,), events=EV)
    after = {"same_section": geo(zones=(ZONE,), events=EV), "resolution": before,
             "zone_added": geo(zones=(ZONE, other), events=EV)}[change]

    def step(i: int) -> Step:  # one car stands in Z for 40 s; the change at 30 s
        late = i >= 300
        if change == "resolution" and not late:
            return Step([car(80, 300, scale=2.0)], before, image=BIG)
        return Step([car(80, 300)], after if late else before,
                    version=2 if late and change != "resolution" else 1)

    _, records = drive(400, step)
    assert [k for k, _ in events(records)] == ["stopped_vehicle"], events(records)


def test_a_zone_removed_during_a_reported_jam_clears_it() -> None:
    zone = dict(ZONE, capacity=4)
    before, after = geo(zones=(zone,), events=EV), geo(events=EV)

    def step(i: int) -> Step:  # 4 cars jam Z; Z is removed at 30 s
        g, v = (before, 1) if i < 300 else (after, 2)
        return Step([car(80 + 150 * j, 300) for j in range(4)], g, v)

    _, records = drive(400, step)
    got = [(k, d, r["config_version"]) for r in records for e in r["events"]
           for k, d in [(e["kind"], e["duration_s"])]]
    assert [(k, v) for k, _, v in got] == [("jam", 1), ("jam_cleared", 1)], got


def test_the_end_of_the_stream_clears_a_reported_jam() -> None:
    g = geo(zones=(dict(ZONE, capacity=4),), events=EV)
    _, records = drive(300, lambda i: Step([car(80 + 150 * j, 300) for j in range(4)], g))
    assert [k for k, _ in events(records)] == ["jam", "jam_cleared"]


def test_a_vehicle_gone_at_a_geometry_change_still_leaves_its_zone() -> None:
    other = {"name": "Y", "polygon": [[0, 0], [640, 0], [640, 100], [0, 100]]}
    before, after = geo(zones=(ZONE,)), geo(zones=(ZONE, other))

    def step(i: int) -> Step:  # a car stands in Z 20 s, gone when the zone Y is added
        g, v = (before, 1) if i < 200 else (after, 2)
        return Step([car(300, 300)] if i < 200 else [], g, v)

    _, records = drive(260, step)
    entries, exits, dwell = zone_totals(records)
    assert (entries, exits) == (1, 1) and 19 < dwell[0] < 21


def test_a_model_swap_splits_the_interval_and_classes_follow_the_new_model() -> None:
    g = geo()

    def step(i: int) -> Step:  # 40 s, one car every 5 s; the model is swapped at 22 s
        k = i % 50
        old = i < 220
        names, model, cls = (("car", "truck"), "modelA", "car") if old else \
            (("Vehicle",), "modelB", "Vehicle")
        return Step([car(300, 100 + 10 * k, cls=cls)] if k < 30 else [], g, 1, model, names)

    stage, records = drive(400, step)
    by_model: dict[str, set[str]] = {}
    for r in records:
        for row in r["lines"]:
            by_model.setdefault(r["model_version"], set()).add(row["class_name"])
    # the car of 20-23 s crosses at 21 s (modelA) and is still tracked after the swap at
    # 22 s (modelB's boxes): no count; the cars from 25 s on are modelB's
    assert by_model == {"modelA": {"car"}, "modelB": {"Vehicle"}}, by_model
    assert stage.crossings_total == 8
    assert len({r["record_id"] for r in records}) == len(records)


def test_a_track_spanning_a_model_swap_counts_under_the_new_models_class() -> None:
    g = geo()

    def step(i: int) -> Step:  # one car, 100 → 290; the swap at frame 5 (before the line)
        names, model, cls = (("car",), "modelA", "car") if i < 5 else \
            (("Vehicle",), "modelB", "Vehicle")
        return Step([car(300, 100 + 10 * i, cls=cls)], g, 1, model, names)

    _, records = drive(20, step)
    rows = [(r["model_version"], row["class_name"], row["count"]) for r in records
            for row in r["lines"]]
    assert rows == [("modelB", "Vehicle", 1)], rows
