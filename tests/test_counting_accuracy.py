"""Counting accuracy: the scorer against oracle counters, and the field failure modes
against the agent's counter (``edge_agent.traffic``; skipped until it is there)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edge_agent.traffic import parse_traffic_section
from roadloop.evaluation.counting_accuracy import evaluate_counter
from roadloop.evaluation.traffic_cases import failure_cases
from roadloop.evaluation.traffic_noise import NOISE_LEVELS, simulate_detections
from roadloop.evaluation.traffic_scenes import CLASS_NAMES, TrafficScene, build_scene


@dataclass
class _Out:
    tracks: list
    crossings: list = field(default_factory=list)


@dataclass
class _Track:
    track_id: int
    class_name: str
    xyxy: tuple


class _Oracle:
    """Reports the truth itself: tracks = truth boxes, crossings = truth crossings (each
    ``repeat`` times, with ``speed_bias`` km/h); from ``swap_at`` s on, ids are swapped."""

    def __init__(self, scene, repeat=1, speed_bias=0.0, swap_at=None):
        self.frames = {round(f.t, 6): f for f in scene.truth_frames()}
        self.crossings = scene.crossings
        self.repeat, self.bias, self.swap_at = repeat, speed_bias, swap_at
        self.prev = -1.0

    def update(self, detections, stream_time):
        f = self.frames[round(stream_time, 6)]
        ids = [b.vehicle_id for b in f.boxes]
        if self.swap_at is not None and stream_time >= self.swap_at:
            ids = ids[::-1]
        tracks = [_Track(i, b.class_name, b.xyxy) for i, b in zip(ids, f.boxes)]
        out = [{"line": c.line, "direction": c.direction, "class_name": c.class_name,
                    "track_id": c.vehicle_id, "speed_kmh": c.speed_kmh + self.bias,
                    "stream_time": stream_time}
               for c in self.crossings if self.prev < c.t <= stream_time] * self.repeat
        self.prev = stream_time
        return _Out(tracks, out)


@pytest.fixture(scope="module")
def scene():
    return build_scene(TrafficScene(seed=2, duration_s=20.0))


def _run(counter, scene, **kw):
    return evaluate_counter(counter, scene, ([] for _ in scene.frame_times), **kw)


def test_oracle_scores_perfect(scene):
    r = _run(_Oracle(scene), scene, min_visibility=0.0)
    assert r.total["truth"] > 5 and r.total["error"] == 0 and r.total["abs_error_sum"] == 0
    assert r.crossings["missed"] == r.crossings["ghosts"] == r.crossings["duplicates"] == 0
    assert r.mot["MOTA"] == 1.0 and r.mot["IDF1"] == 1.0 and r.mot["IDSW"] == 0
    assert r.speed["median_abs_error_kmh"] == 0.0
    assert {x["line"] for x in r.lines} == {"near", "far", "closed"}


def test_double_counting_swaps_and_speed_bias_show(scene):
    r = _run(_Oracle(scene, repeat=2, speed_bias=5.0), scene, min_visibility=0.0)
    assert r.total["counted"] == 2 * r.total["truth"]
    assert r.crossings["duplicates"] == r.crossings["matched"] == r.total["truth"]
    assert r.speed["bias_kmh"] == pytest.approx(5.0)
    swapped = _run(_Oracle(scene, swap_at=10.0), scene, min_visibility=0.0)
    assert swapped.mot["IDSW"] > 0 and swapped.mot["IDF1"] < 1.0


def test_edge_windows_are_left_out_on_both_sides(scene):
    full = _run(_Oracle(scene), scene, warmup_s=0.0, tail_s=0.0, min_visibility=0.0)
    cut = _run(_Oracle(scene), scene, warmup_s=5.0, tail_s=5.0, min_visibility=0.0)
    inside = [c for c in scene.crossings if 5.0 <= c.t <= scene.frame_times[-1] - 5.0]
    assert cut.total["truth"] == len(inside) < full.total["truth"]
    assert cut.total["error"] == 0


def _agent_counter(scene):
    mod = pytest.importorskip("edge_agent.traffic.counter")
    return mod.TrafficCounter(parse_traffic_section(scene.traffic_section()), list(CLASS_NAMES))


@pytest.mark.parametrize("case", failure_cases(), ids=lambda c: c.name)
def test_field_failure_modes(case):
    r = evaluate_counter(_agent_counter(case.scene), case.scene, case.detections,
                         warmup_s=0.0, tail_s=0.0)
    assert r.crossings["duplicates"] == 0 and r.crossings["ghosts"] == 0
    closed = next(x for x in r.lines if x["line"] == "closed")
    assert closed["counted"] == 0
    if case.name in ("flicker_across_line", "stop_on_line"):
        assert r.total["truth"] == 2 and r.total["error"] == 0


def test_agent_counter_on_clean_detections_counts_every_scored_crossing():
    scene = build_scene(TrafficScene(seed=1, duration_s=10.0, speed_kmh=(20.0, 40.0)))
    counter = _agent_counter(scene)
    dets = simulate_detections(scene.truth_frames(), NOISE_LEVELS["clean"], width=320,
                               height=192)
    r = evaluate_counter(counter, scene, dets)
    assert r.total["truth"] > 0 and r.total["error"] == 0
