"""Synthetic traffic scenes: truth from trajectories, geometry a counter can parse, pixels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_agent.traffic import parse_traffic_section
from roadloop.evaluation.traffic_noise import NOISE_LEVELS, simulate_detections
from roadloop.evaluation.traffic_scenes import (
    ScriptedVehicle,
    TrafficScene,
    build_scene,
    render_frames,
)

from .helpers import SHARED_DIR, needs_shared


def test_same_seed_same_scene_and_crossings_follow_lanes():
    cfg = TrafficScene(seed=4, duration_s=20.0)
    a, b = build_scene(cfg), build_scene(cfg)
    assert a.crossings == b.crossings and a.crossings
    assert build_scene(TrafficScene(seed=5, duration_s=20.0)).crossings != a.crossings
    by_id = {v.vehicle_id: v for v in a.vehicles}
    for c in a.crossings:  # lanes "down" come toward the camera: the line's in_label
        kind = cfg.lanes[by_id[c.vehicle_id].lane]
        assert c.direction == ("toward" if kind == "down" else "away")
        assert 0 < c.speed_kmh <= cfg.speed_kmh[1] + 1
    assert not [c for c in a.crossings if c.line == "closed"]
    assert len({(c.line, c.vehicle_id) for c in a.crossings}) == len(a.crossings)


def test_section_parses_and_lines_sit_where_the_trajectories_cross():
    scene = build_scene(TrafficScene(seed=1, duration_s=10.0))
    section = scene.traffic_section()
    config = parse_traffic_section(section)
    assert {line.name for line in config.lines} == {"near", "far", "closed"}
    near = next(x for x in section["lines"] if x["name"] == "near")
    c = next(x for x in scene.crossings if x.line == "near")
    frame = next(f for f in scene.truth_frames() if f.t >= c.t)
    box = next(b for b in frame.boxes if b.vehicle_id == c.vehicle_id)
    # one frame after the crossing the counting point is within one frame's travel of the line
    assert abs(box.xyxy[3] - near["start"][1]) < 0.3 * (box.xyxy[3] - box.xyxy[1]) + 5


def test_stopping_vehicle_stands_still_then_leaves():
    cfg = TrafficScene(duration_s=12.0, vehicles=(
        ScriptedVehicle(lane=0, speed_kmh=36, entry_s=-5.0, stop_at_m=9.5, stop_s=4.0),))
    scene = build_scene(cfg)
    standing = (scene.speed_ms[0] == 0) & (scene.times > -5.0)
    assert standing.sum() * 0.02 == pytest.approx(4.0, abs=0.1)
    assert scene.counting_y[0, standing][0] == pytest.approx(9.5, abs=0.15)  # grid: 0.02 s
    assert [c.line for c in scene.crossings].count("near") == 1


def test_queued_vehicles_keep_their_gap():
    scene = build_scene(TrafficScene(seed=2, duration_s=30.0, arrivals_per_min=30))
    for lane in range(4):
        ids = [i for i, v in enumerate(scene.vehicles) if v.lane == lane]
        for lead, follow in itertools.pairwise(ids):
            gap = np.abs(scene.counting_y[lead] - scene.counting_y[follow])
            assert gap.min() >= scene.config.min_gap_m - 1e-6


def test_detector_simulator_clean_is_truth_and_noise_is_seeded():
    cfg = TrafficScene(seed=0, duration_s=5.0)
    scene = build_scene(cfg)
    truth = list(scene.truth_frames())
    clean = list(simulate_detections(truth, NOISE_LEVELS["clean"], width=320, height=192))
    want = sum(1 for f in truth for b in f.boxes if b.visibility >= 0.35)
    assert sum(map(len, clean)) == want
    noisy = [list(simulate_detections(truth, NOISE_LEVELS["harsh"], width=320, height=192,
                                      seed=s)) for s in (1, 1, 2)]
    assert noisy[0] == noisy[1] != noisy[2]
    assert sum(map(len, noisy[0])) != want


def test_plain_render_shows_the_vehicles():
    scene = build_scene(TrafficScene(seed=0, duration_s=1.0, pixel_noise=0.0))
    frame = next(render_frames(scene))
    box = max(next(scene.truth_frames()).boxes, key=lambda b: b.visibility)
    x0, y0, x1, y1 = (int(v) for v in box.xyxy)
    road = next(render_frames(build_scene(TrafficScene(duration_s=1.0, vehicles=(),
                                                       pixel_noise=0.0))))
    assert frame.shape == (192, 320, 3)
    assert np.abs(frame[y0:y1, x0:x1].astype(int) - road[y0:y1, x0:x1]).mean() > 10


@needs_shared(SHARED_DIR / "videos" / "cctv_street.mp4", SHARED_DIR / "datasets" / "atl_v2")
def test_render_with_real_background_and_crops():
    cfg = TrafficScene(seed=0, duration_s=0.5, background_video=SHARED_DIR / "videos"
                       / "cctv_street.mp4", crop_datasets=(SHARED_DIR / "datasets" / "atl_v2",),
                       crops_per_class=2)
    frames = list(render_frames(build_scene(cfg)))
    assert len(frames) == 5 and frames[0].shape == (192, 320, 3)
    assert not np.array_equal(frames[0], frames[4])


def test_crops_come_from_the_asked_split_of_a_taxonomy_named_dataset(tmp_path):
    import cv2
    import yaml

    from roadloop.evaluation.traffic_scenes import load_crops

    root = tmp_path / "curated"  # no taxonomy source of that name: names are taxonomy names
    for split, ext, colour in (("train", ".jpg", (0, 0, 255)), ("test", ".png", (255, 0, 0))):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        img = np.zeros((100, 100, 3), np.uint8)
        img[20:80, 20:80] = colour
        cv2.imwrite(str(root / "images" / split / f"src__{split}{ext}"), img)
        (root / "labels" / split / f"src__{split}.txt").write_text("0 0.5 0.5 0.6 0.6\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"names": {0: "car"}}))

    test_only = load_crops((root,), 4, split="test")["car"]
    assert len(test_only) == 1
    assert test_only[0].image[10:-10, 10:-10].mean(axis=(0, 1)).round().tolist() == [255, 0, 0]
    assert len(load_crops((root,), 4)["car"]) == 2
