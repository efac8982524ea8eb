"""Which new track takes over which vehicle at a mid-run geometry change
(``TrafficCounter.hand_over`` / ``_adopt``), and the watched time across segment changes.

A vehicle in view at the change is taken over by the new tracker's track that was first seen
in the change's first frames where that vehicle's own motion puts it — never by the vehicle
behind it in a moving queue (which would inherit its "already counted" and lose a crossing),
never by a vehicle entering the view later (an oncoming car is not the one that left)."""

from __future__ import annotations

import pytest

from tests.test_traffic_midrun_changes import BIG, LINE, Step, car, drive, geo, zone_totals

OTHER = {"name": "M", "start": [0, 5], "end": [640, 5]}  # an added line, at the view's edge
QZONE = {"name": "Z", "polygon": [[0, 100], [640, 100], [640, 359], [0, 359]], "capacity": 20}


def queue(speed: float, spacing: float, n: int = 6):
    """Counting points (y) of n 40-px cars in one lane moving down ``speed`` px a frame."""
    return lambda i: [y for y in (40 + speed * i - k * spacing for k in range(n))
                      if 40 <= y <= 359]


@pytest.mark.parametrize("change_at", [14, 20])
def test_a_moving_queue_across_a_resolution_change_counts_every_car(change_at: int) -> None:
    ys = queue(20, 60)  # 20 px a frame, cars 20 px apart: each moves a third of a gap a frame

    def step(i: int) -> Step:  # the same view at 1280x720, then at 640x360
        if i < change_at:
            return Step([car(300, y, scale=2.0) for y in ys(i)], geo(), image=BIG)
        return Step([car(300, y) for y in ys(i)], geo())

    stage, _ = drive(40, step)
    assert stage.crossings_total == 6


def test_a_moving_queue_across_an_added_line_keeps_zone_entries_and_dwell() -> None:
    ys = queue(20, 60)

    def step(i: int) -> Step:
        late = i >= 16
        g = geo(lines=(LINE, OTHER), zones=(QZONE,)) if late else geo(zones=(QZONE,))
        return Step([car(300, y) for y in ys(i)], g, version=2 if late else 1)

    stage, records = drive(40, step)
    entries, exits, dwell = zone_totals(records)
    assert (stage.crossings_total, entries, exits) == (6, 6, 6)
    assert dwell == pytest.approx([1.1] * 6, abs=0.05)  # as without the change


def test_three_changes_in_three_frames_predict_from_the_last_sighting() -> None:
    ys = queue(10, 80, n=5)  # 10 px a frame, cars 80 px apart

    def step(i: int) -> Step:  # versions 2 and 3 nudge line M, version 4 removes it
        if 30 <= i < 32:
            m = dict(OTHER, start=[0, 5 + i % 7], end=[640, 5 + i % 7])
            return Step([car(300, y) for y in ys(i)], geo(lines=(LINE, m)), version=i - 28)
        return Step([car(300, y) for y in ys(i)], geo(), version=4 if i >= 32 else 1)

    stage, _ = drive(90, step)
    assert stage.crossings_total == 5


def test_the_car_behind_a_missed_car_does_not_take_its_count() -> None:
    def step(i: int) -> Step:  # A (counted on L) missed on frames 17-21; B 60 px behind
        ya, yb = 60 + 10 * i, 10 * i
        dets = [car(300, y) for y, seen in ((ya, not 17 <= i < 22), (yb, True))
                if seen and 40 <= y <= 359]
        late = i >= 20
        return Step(dets, geo(lines=(LINE, OTHER)) if late else geo(), version=2 if late else 1)

    stage, _ = drive(50, step)
    assert stage.crossings_total == 2


@pytest.mark.parametrize("change_at", [15, 16])
def test_an_oncoming_car_entering_where_one_left_is_counted(change_at: int) -> None:
    def step(i: int) -> Step:
        dets = []
        ya = 60 + 20 * i  # A: down lane x=280, crosses L "in", leaves the view after frame 14
        if ya <= 359:
            dets.append(car(280, ya, h=50))
        yb = 359 - 20 * (i - 16)  # B: up lane x=315 from frame 16, crosses L "out"
        if i >= 16 and yb >= 50:
            dets.append(car(315, yb, h=50))
        late = i >= change_at
        return Step(dets, geo(lines=(LINE, OTHER)) if late else geo(), version=2 if late else 1)

    _, records = drive(40, step)
    rows = sorted((row["direction"], row["count"]) for r in records for row in r["lines"])
    assert rows == [("in", 1), ("out", 1)], rows


def test_a_vehicle_first_seen_after_the_changes_first_frames_is_another_vehicle() -> None:
    zone = {"name": "Z", "polygon": [[0, 220], [640, 220], [640, 359], [0, 359]]}

    def step(i: int) -> Step:  # A drives into Z and is not seen from the change (frame 15)
        # on; C is first seen in the change's third frame, where A would be by then
        seen = i < 15 or (i >= 17 and 100 + 10 * i <= 359)
        dets = [car(300, 100 + 10 * i)] if seen else []
        late = i >= 15
        g = geo(lines=(LINE, OTHER), zones=(zone,)) if late else geo(zones=(zone,))
        return Step(dets, g, version=2 if late else 1)

    _, records = drive(40, step)
    entries, exits, _ = zone_totals(records)
    assert (entries, exits) == (2, 2)  # A leaves Z when dropped, C enters it anew


@pytest.mark.parametrize("every", [1, 3, 50])
def test_model_swaps_lose_no_watched_time(every: int) -> None:
    g = geo()

    def step(i: int) -> Step:
        k = i % 50
        model = "modelA" if (i // every) % 2 == 0 else "modelB"
        return Step([car(300, 100 + 10 * k)] if k < 30 else [], g, 1, model)

    stage, records = drive(600, step)
    assert stage.crossings_total == 12
    assert sum(r["covered_s"] for r in records) == pytest.approx(59.9, abs=0.01)


def test_geometry_changes_lose_no_watched_time_and_counting_off_is_not_watched() -> None:
    def step(i: int) -> Step:  # 1280x720 <-> 640x360 every 5 frames; no geometry on 40-49
        if 40 <= i < 50:
            return Step([], None)
        if (i // 5) % 2:
            return Step([], geo(), image=BIG)
        return Step([], geo(lines=(LINE, OTHER)), version=2 + i // 5)

    _, records = drive(100, step)
    # 100 frames: 99 gaps of 0.1 s, less the 11 from frame 39 to frame 50 (not counting)
    assert sum(r["covered_s"] for r in records) == pytest.approx(8.8, abs=0.01)
