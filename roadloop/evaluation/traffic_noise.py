"""A detector simulator: truth boxes → the noisy detections a real detector would give.

Noise (each seeded, each off at 0): box jitter (Gaussian on every edge, a fraction of the
box's size), random misses, bursts of misses (a vehicle gone for several frames), flicker (a
vehicle's box present every other frame for a few frames), class confusion between given
pairs (car ↔ truck by default: the taxonomy has no van), false positives (car-sized boxes on
the road, low confidence), and confidences that fall with occlusion. Boxes hidden by more
than ``1 - min_visibility`` are not detected at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.inference import Detection
from roadloop.evaluation.traffic_scenes import CLASS_NAMES, FrameTruth


@dataclass(frozen=True)
class DetectorNoise:
    jitter: float = 0.03  # std of each box edge, as a fraction of the box's width/height
    miss_rate: float = 0.10  # independent miss per box per frame
    burst_start: float = 0.01  # per visible vehicle per frame: start a burst of misses
    burst_frames: tuple[int, int] = (3, 8)
    flicker_start: float = 0.01  # per visible vehicle per frame: start flickering
    flicker_frames: tuple[int, int] = (4, 8)
    confusion: float = 0.05  # per detection: report the other class of its pair
    confusion_pairs: tuple[tuple[str, str], ...] = (("car", "truck"),)
    fp_per_frame: float = 0.2  # mean false positives per frame (Poisson)
    min_visibility: float = 0.35
    min_height_px: float = 4.0
    conf_mean: float = 0.7


NOISE_LEVELS: dict[str, DetectorNoise] = {
    "clean": DetectorNoise(jitter=0.0, miss_rate=0.0, burst_start=0.0, flicker_start=0.0,
                           confusion=0.0, fp_per_frame=0.0),
    "typical": DetectorNoise(),
    "harsh": DetectorNoise(jitter=0.06, miss_rate=0.2, burst_start=0.02, flicker_start=0.03,
                           confusion=0.1, fp_per_frame=0.6),
}


def simulate_detections(
    frames: Iterable[FrameTruth],
    noise: DetectorNoise,
    *,
    width: int,
    height: int,
    seed: int = 0,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Iterator[list[Detection]]:
    """One list of detections per truth frame (ids of ``class_names`` order)."""
    rng = np.random.default_rng(seed)
    other = {a: b for a, b in noise.confusion_pairs} | {b: a for a, b in noise.confusion_pairs}
    burst: dict[int, int] = {}  # vehicle → frames left missing
    flicker: dict[int, int] = {}  # vehicle → frames left flickering
    for truth in frames:
        out: list[Detection] = []
        for b in truth.boxes:
            vid = b.vehicle_id
            x0, y0, x1, y1 = b.xyxy
            if b.visibility < noise.min_visibility or y1 - y0 < noise.min_height_px:
                continue
            if burst.get(vid, 0) <= 0 and rng.random() < noise.burst_start:
                burst[vid] = int(rng.integers(noise.burst_frames[0], noise.burst_frames[1] + 1))
            if flicker.get(vid, 0) <= 0 and rng.random() < noise.flicker_start:
                flicker[vid] = int(rng.integers(noise.flicker_frames[0],
                                                noise.flicker_frames[1] + 1))
            missing = burst.get(vid, 0) > 0 or (flicker.get(vid, 0) > 0 and flicker[vid] % 2 == 1)
            burst[vid] = burst.get(vid, 0) - 1
            flicker[vid] = flicker.get(vid, 0) - 1
            if missing or rng.random() < noise.miss_rate:
                continue
            w, h = x1 - x0, y1 - y0
            if noise.jitter:
                e = rng.normal(0, noise.jitter, 4) * np.array([w, h, w, h])
                x0, y0, x1, y1 = x0 + e[0], y0 + e[1], x1 + e[2], y1 + e[3]
            x0, x1 = sorted((float(np.clip(x0, 0, width)), float(np.clip(x1, 0, width))))
            y0, y1 = sorted((float(np.clip(y0, 0, height)), float(np.clip(y1, 0, height))))
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            cls = b.class_name
            if cls in other and rng.random() < noise.confusion:
                cls = other[cls]
            conf = float(np.clip(rng.normal(noise.conf_mean * (0.6 + 0.4 * b.visibility), 0.1),
                                 0.26, 0.99))
            out.append(_det(cls, conf, (x0, y0, x1, y1), class_names))
        for _ in range(int(rng.poisson(noise.fp_per_frame))):
            bw = float(rng.uniform(6, 30)) * width / 320
            bh = bw * float(rng.uniform(0.6, 1.2))
            x = float(rng.uniform(0, width - bw))
            y = float(rng.uniform(0.2 * height, height - bh))
            out.append(_det("car", float(rng.uniform(0.25, 0.45)), (x, y, x + bw, y + bh),
                            class_names))
        yield out


def _det(cls: str, conf: float, xyxy: tuple[float, float, float, float],
         class_names: Sequence[str]) -> Detection:
    return Detection(class_id=list(class_names).index(cls), confidence=conf, x1=xyxy[0],
                     y1=xyxy[1], x2=xyxy[2], y2=xyxy[3], class_name=cls)
