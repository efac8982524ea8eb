"""The counting failure modes seen in the field, each as a tiny scene with its detections.

* ``flicker_across_line`` — a slow car's box is missing every other frame for 2 s around its
  crossing, and when present its bottom edge jumps ±10 % of its height: the counting point
  hops back and forth over the line. Truth: one crossing per line.
* ``never_confirmed`` — a confident box that appears for single frames only (every 4th),
  alternately above and below a line, with no vehicle behind it: a track that never
  confirms. Truth: nothing crosses.
* ``stop_on_line`` — a car brakes and stands 6 s with its counting point 0.2 m past a line,
  its box jittering (3 %), then drives on. Truth: one crossing per line.
* ``uncrossable_line`` — busy traffic (trucks and buses included) beside a closed lane whose
  line no vehicle can cross. Truth: 0 on that line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_agent.inference import Detection
from roadloop.evaluation.traffic_noise import NOISE_LEVELS, DetectorNoise, simulate_detections
from roadloop.evaluation.traffic_scenes import (
    CLASS_NAMES,
    Scene,
    ScriptedVehicle,
    TrafficScene,
    build_scene,
)


@dataclass
class FailureCase:
    name: str
    scene: Scene
    detections: list[list[Detection]]
    description: str


def _clean(scene: Scene, noise: DetectorNoise | None = None) -> list[list[Detection]]:
    c = scene.config
    return list(simulate_detections(scene.truth_frames(), noise or NOISE_LEVELS["clean"],
                                    width=c.width, height=c.height, seed=c.seed))


def _entry(line: str, at_s: float, kmh: float, **size) -> float:
    """Entry time of a lane-0 (toward the camera) vehicle that reaches ``line`` at ``at_s``."""
    c = TrafficScene(**size)
    return at_s - (c.road_length_m * 1.6 - c.lines_m[line]) / (kmh / 3.6)


def flicker_across_line(**size) -> FailureCase:
    cfg = TrafficScene(duration_s=8.0, **size, vehicles=(
        ScriptedVehicle(lane=0, speed_kmh=15, entry_s=_entry("near", 4.0, 15, **size)),))
    scene = build_scene(cfg)
    dets = _clean(scene)
    first = next(x.t for x in scene.crossings if x.line == "near")
    for k, t in enumerate(scene.frame_times):
        if abs(t - first) <= 1.0 and dets[k]:
            if k % 2:
                dets[k] = []
            else:
                d = dets[k][0]
                shift = (d.y2 - d.y1) * (0.1 if k % 4 == 0 else -0.1)
                dets[k] = [replace(d, y1=d.y1 + shift, y2=d.y2 + shift)]
    return FailureCase("flicker_across_line", scene, dets,
                       "box missing every other frame, bottom edge hopping over the line")


def never_confirmed(**size) -> FailureCase:
    cfg = TrafficScene(duration_s=6.0, vehicles=(), **size)
    scene = build_scene(cfg)
    line = next(x for x in scene.traffic_section()["lines"] if x["name"] == "near")
    x = (line["start"][0] + line["end"][0]) / 2
    y = line["start"][1]
    h = 0.12 * cfg.height
    dets: list[list[Detection]] = []
    for k in range(len(scene.frame_times)):
        if k % 4:
            dets.append([])
            continue
        bottom = y + (0.05 if k % 8 else -0.05) * cfg.height
        dets.append([Detection(class_id=0, confidence=0.9, x1=x - h / 2, y1=bottom - h,
                               x2=x + h / 2, y2=bottom, class_name=CLASS_NAMES[0])])
    return FailureCase("never_confirmed", scene, dets,
                       "single-frame boxes alternating across a line, no vehicle")


def stop_on_line(**size) -> FailureCase:
    base = TrafficScene(**size)
    stop_y = base.lines_m["near"] - 0.2  # lane 0 drives toward the camera: Y falls
    cfg = TrafficScene(duration_s=14.0, **size, vehicles=(
        ScriptedVehicle(lane=0, speed_kmh=30, entry_s=_entry("near", 3.0, 30, **size),
                        stop_at_m=stop_y, stop_s=6.0),))
    scene = build_scene(cfg)
    jitter_only = DetectorNoise(jitter=0.03, miss_rate=0.0, burst_start=0.0, flicker_start=0.0,
                                confusion=0.0, fp_per_frame=0.0)
    return FailureCase("stop_on_line", scene, _clean(scene, jitter_only),
                       "stands 6 s with its counting point 0.2 m past the line, box jittering")


def uncrossable_line(**size) -> FailureCase:
    cfg = TrafficScene(duration_s=10.0, arrivals_per_min=20, seed=3, stop_prob=0.0,
                       class_mix={"car": 0.4, "truck": 0.3, "bus": 0.3}, **size)
    scene = build_scene(cfg)
    return FailureCase("uncrossable_line", scene, _clean(scene, NOISE_LEVELS["typical"]),
                       "busy lanes beside a closed lane whose line nothing crosses")


def failure_cases(**size) -> list[FailureCase]:
    """Every case; ``size`` (``width``, ``height``, ``fps``) is passed to each scene."""
    return [f(**size) for f in (flicker_across_line, never_confirmed, stop_on_line,
                                uncrossable_line)]
