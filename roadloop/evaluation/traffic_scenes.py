"""Synthetic traffic video with exact truth, for measuring a tracker + line counter.

A road is laid out in a world plane (metres: ``X`` across, ``Y`` along, ``Y = 0`` at the
image's bottom edge) and mapped to the image by a known homography (a camera looking down
the road). Vehicles drive along lanes at known speeds, queue behind their leader, some brake
and stand on or near a counting line for a while; one lane is closed, so nothing ever crosses
the line drawn across it. Everything a counter is scored against comes from the
trajectories, never from pixels: per-frame truth boxes (true id, class, visible fraction
after occlusion by nearer vehicles) and per counting line which vehicle crossed it, in which
direction, when and at what speed.

Pixels are optional: ``render_frames`` pastes vehicle crops cut from the labelled datasets
(soft-masked, scaled with distance, far to near so nearer ones occlude) onto a real empty
road (the per-pixel median of frames spread over a shared video), or draws plain boxes on a
grey road when no data is given. ``simulate_detections`` turns truth into what a noisy
detector would give (``traffic_noise`` holds the noise model).

The scene's geometry is exported as the spec's ``traffic`` section (``traffic_section``) in
the scene's pixel coordinates, so a counter is configured exactly like a camera.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

LaneKind = Literal["up", "down", "closed"]  # up: away from the camera; closed: no traffic
CLASS_NAMES: tuple[str, ...] = ("car", "truck", "bus", "two_wheeler", "person")  # taxonomy order
# (width m, length m, box height / width when no crop gives one)
VEHICLE_SIZE: dict[str, tuple[float, float, float]] = {
    "car": (1.8, 4.5, 0.8), "truck": (2.5, 9.0, 1.1), "bus": (2.55, 12.0, 1.15),
    "two_wheeler": (0.8, 2.0, 1.6),
}
_DT = 0.02  # trajectory grid (s)
_LEAD_IN_S = 12.0  # arrivals start this long before frame 0, so the road is busy at once
_BRAKE = 3.0  # m/s² braking, and (below) accelerating again
_ACCEL = 2.0


class ScriptedVehicle(BaseModel):
    """One vehicle placed by hand (the failure cases); ``stop_at_m`` is the world Y where its
    counting point stops, for ``stop_s`` seconds."""

    model_config = ConfigDict(frozen=True)
    lane: int = Field(ge=0)
    class_name: str = "car"
    speed_kmh: float = Field(gt=0, le=200)
    entry_s: float
    stop_at_m: float | None = None
    stop_s: float = Field(default=0.0, ge=0)
    lateral_m: float = 0.0


class TrafficScene(BaseModel):
    """Everything that defines a scene; same config (seed included) → same scene."""

    model_config = ConfigDict(frozen=True)
    seed: int = 0
    width: int = Field(default=320, ge=64, le=4096)
    height: int = Field(default=192, ge=64, le=4096)
    fps: float = Field(default=10.0, gt=0, le=60)
    duration_s: float = Field(default=10.0, gt=0, le=3600)
    lanes: tuple[LaneKind, ...] = ("down", "down", "up", "closed")
    lane_width_m: float = Field(default=3.5, gt=1)
    road_length_m: float = Field(default=40.0, gt=5)  # world Y at the top of the road quad
    top_width_frac: float = Field(default=0.2, gt=0.02, le=1)  # road width at Y max / at Y 0
    arrivals_per_min: float = Field(default=12.0, ge=0)  # per open lane
    min_headway_s: float = Field(default=1.2, ge=0)
    speed_kmh: tuple[float, float] = (20.0, 90.0)
    class_mix: dict[str, float] = Field(
        default_factory=lambda: {"car": 0.65, "truck": 0.12, "bus": 0.08, "two_wheeler": 0.15}
    )
    lines_m: dict[str, float] = Field(default_factory=lambda: {"near": 9.0, "far": 20.0})
    closed_line_m: float = 14.0  # the line across the closed lane(s), named "closed"
    stop_line: str = "near"
    stop_prob: float = Field(default=0.15, ge=0, le=1)
    stop_s: tuple[float, float] = (2.0, 6.0)
    stop_offset_m: tuple[float, float] = (-1.5, 1.0)  # where the counting point stops
    min_gap_m: float = Field(default=2.0, ge=0)
    vehicles: tuple[ScriptedVehicle, ...] | None = None  # replaces the random arrivals
    background_video: Path | None = None
    crop_datasets: tuple[Path, ...] = ()
    crop_split: str | None = None  # e.g. "test": crops from that split only (None: all)
    crops_per_class: int = Field(default=12, ge=1)
    pixel_noise: float = Field(default=2.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> TrafficScene:
        unknown = set(self.class_mix) - set(VEHICLE_SIZE)
        if unknown or not self.class_mix or min(self.class_mix.values()) < 0:
            raise ValueError(f"class_mix must weigh classes of {sorted(VEHICLE_SIZE)}")
        if self.stop_line not in self.lines_m:
            raise ValueError(f"stop_line {self.stop_line!r} is not in lines_m")
        if "closed" in self.lines_m:
            raise ValueError("the name 'closed' is reserved for the closed lanes' line")
        if not self.speed_kmh[0] <= self.speed_kmh[1]:
            raise ValueError("speed_kmh must be (low, high)")
        for v in self.vehicles or ():
            if v.lane >= len(self.lanes) or self.lanes[v.lane] == "closed":
                raise ValueError(f"scripted vehicle on lane {v.lane}: not an open lane")
            if v.class_name not in VEHICLE_SIZE:
                raise ValueError(f"scripted vehicle class {v.class_name!r} unknown")
        return self


@dataclass(frozen=True)
class TruthBox:
    vehicle_id: int
    class_name: str
    xyxy: tuple[float, float, float, float]
    visibility: float  # fraction of the (clipped) box not hidden by nearer vehicles


@dataclass(frozen=True)
class FrameTruth:
    index: int
    t: float
    boxes: list[TruthBox]


@dataclass(frozen=True)
class TruthCrossing:
    line: str
    direction: str  # the line's in_label / out_label
    vehicle_id: int
    class_name: str
    t: float
    speed_kmh: float


@dataclass
class Vehicle:
    vehicle_id: int
    class_name: str
    lane: int
    lateral_m: float
    speed_kmh: float  # desired speed
    entry_s: float
    width_m: float
    length_m: float
    aspect: float  # box height / width
    crop: int  # index into the class's crop list (rendering only)
    stops: bool


@dataclass
class Scene:
    """A built scene: trajectories plus everything derived from them (no pixels)."""

    config: TrafficScene
    homography: np.ndarray  # world (X, Y) → image (u, v)
    vehicles: list[Vehicle]
    times: np.ndarray  # trajectory grid
    counting_y: np.ndarray  # (vehicles, grid) world Y of each counting point
    speed_ms: np.ndarray  # (vehicles, grid)
    crossings: list[TruthCrossing] = field(default_factory=list)

    @property
    def frame_times(self) -> np.ndarray:
        n = round(self.config.duration_s * self.config.fps)
        return np.arange(n) / self.config.fps

    def lane_x(self, lane: int) -> float:
        c = self.config
        return (lane + 0.5) * c.lane_width_m - len(c.lanes) * c.lane_width_m / 2

    def project(self, pts_m: np.ndarray) -> np.ndarray:
        pts = cv2.perspectiveTransform(np.asarray(pts_m, np.float64).reshape(-1, 1, 2),
                                       self.homography)
        return pts.reshape(-1, 2)

    def line_endpoints(self) -> dict[str, tuple[float, list[int]]]:
        """name → (world Y, lanes it spans). Main lines span the open lanes, 'closed' the rest."""
        c = self.config
        open_lanes = [i for i, k in enumerate(c.lanes) if k != "closed"]
        closed = [i for i, k in enumerate(c.lanes) if k == "closed"]
        out = {name: (y, open_lanes) for name, y in c.lines_m.items()}
        if closed:
            out["closed"] = (c.closed_line_m, closed)
        return out

    def _line_px(self, y_m: float, lanes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        w = self.config.lane_width_m
        x0 = min(self.lane_x(i) for i in lanes) - w / 2
        x1 = max(self.lane_x(i) for i in lanes) + w / 2
        start, end = self.project(np.array([[x0, y_m], [x1, y_m]]))
        return start, end

    def traffic_section(self) -> dict:
        """The spec §1 ``traffic`` section of this scene, in its pixel coordinates."""
        c = self.config
        lines = []
        for name, (y_m, lanes) in self.line_endpoints().items():
            start, end = self._line_px(y_m, lanes)
            lines.append({"name": name, "start": _r(start), "end": _r(end),
                          "in_label": "toward", "out_label": "away", "allowed": "both"})
        zones = []
        for i, kind in enumerate(c.lanes):
            if kind == "closed":
                continue
            x, w = self.lane_x(i), c.lane_width_m / 2
            y0, y1 = 2.0, c.road_length_m * 0.75
            poly = self.project(np.array([[x - w, y0], [x + w, y0], [x + w, y1], [x - w, y1]]))
            zones.append({"name": f"lane_{i}", "polygon": [_r(p) for p in poly],
                          "capacity": max(1, int((y1 - y0) // 7))})
        half = len(c.lanes) * c.lane_width_m / 2
        world = [[-half, 0.0], [half, 0.0], [half, c.road_length_m], [-half, c.road_length_m]]
        image = [_r(p) for p in self.project(np.array(world))]
        return {"frame_size": [c.width, c.height], "lines": lines, "zones": zones,
                "homography": {"image_points": image, "world_points": world},
                "interval_s": 60}

    def truth_frames(self) -> Iterator[FrameTruth]:
        """Per-frame truth boxes (clipped to the image), nearest first, with visibility."""
        c = self.config
        for k, t in enumerate(self.frame_times):
            yield FrameTruth(k, float(t), self._boxes_at(float(t), c.width, c.height))

    def _boxes_at(self, t: float, width: int, height: int) -> list[TruthBox]:
        j = min(round((t - self.times[0]) / _DT), len(self.times) - 1)
        cands = []
        for i, v in enumerate(self.vehicles):
            y = self.counting_y[i, j]
            if not -8.0 < y < self.config.road_length_m * 1.6:
                continue
            x = self.lane_x(v.lane) + v.lateral_m
            (u, vv), (ul, _), (ur, _) = self.project(np.array([[x, y], [x - .5, y], [x + .5, y]]))
            bw = (ur - ul) * v.width_m * 1.1
            bh = bw * v.aspect
            box = np.array([u - bw / 2, vv - bh, u + bw / 2, vv])
            full = bw * bh
            clipped = np.clip(box, [0, 0, 0, 0], [width, height, width, height])
            area = max(0.0, clipped[2] - clipped[0]) * max(0.0, clipped[3] - clipped[1])
            if full <= 0 or area < 0.3 * full or clipped[3] - clipped[1] < 3:
                continue
            cands.append((y, i, clipped))
        cands.sort(key=lambda c: c[0])  # nearest (smallest world Y) first
        covered = np.zeros((height, width), bool)
        out = []
        for _, i, b in cands:
            x0, y0, x1, y1 = int(b[0]), int(b[1]), int(np.ceil(b[2])), int(np.ceil(b[3]))
            region = covered[y0:y1, x0:x1]
            vis = 1.0 - (float(region.mean()) if region.size else 1.0)
            region[:] = True
            v = self.vehicles[i]
            out.append(TruthBox(v.vehicle_id, v.class_name, tuple(float(q) for q in b), vis))
        return out


def _r(p: np.ndarray) -> list[float]:
    return [round(float(p[0]), 2), round(float(p[1]), 2)]


def road_homography(c: TrafficScene) -> np.ndarray:
    """World (X, Y) → image: the road's near edge spans the image bottom, its far edge is
    ``top_width_frac`` as wide, 10 % below the image top (a camera above the road)."""
    half = len(c.lanes) * c.lane_width_m / 2
    world = np.float32([[-half, 0], [half, 0], [half, c.road_length_m], [-half, c.road_length_m]])
    w, h = c.width, c.height
    bw, tw = 0.96 * w, 0.96 * w * c.top_width_frac
    image = np.float32([[(w - bw) / 2, h], [(w + bw) / 2, h], [(w + tw) / 2, 0.1 * h],
                        [(w - tw) / 2, 0.1 * h]])
    return cv2.getPerspectiveTransform(world, image).astype(np.float64)


def _speed_profile(times: np.ndarray, v: float, entry: float, s_stop: float | None,
                   stop_s: float) -> np.ndarray:
    """Free-driving speed (m/s) on the grid: cruise, or brake to stand at ``s_stop``."""
    speed = np.where(times >= entry, v, 0.0)
    if s_stop is None:
        return speed
    d_brake = v * v / (2 * _BRAKE)
    t_brake = entry + max(0.0, s_stop - d_brake) / v
    t_stand = t_brake + v / _BRAKE
    t_go = t_stand + stop_s
    t_cruise = t_go + v / _ACCEL
    speed = np.where((times >= t_brake) & (times < t_stand), v - _BRAKE * (times - t_brake),
                     speed)
    speed = np.where((times >= t_stand) & (times < t_go), 0.0, speed)
    speed = np.where((times >= t_go) & (times < t_cruise), _ACCEL * (times - t_go), speed)
    return speed


def build_scene(config: TrafficScene) -> Scene:
    """Trajectories and truth of a scene (fast: no pixels)."""
    c = config
    rng = np.random.default_rng(c.seed)
    times = np.arange(-_LEAD_IN_S, c.duration_s + 1.0, _DT)
    specs = list(c.vehicles) if c.vehicles is not None else _random_arrivals(c, rng)
    vehicles: list[Vehicle] = []
    for n, s in enumerate(specs):
        w, ln, asp = VEHICLE_SIZE[s.class_name]
        vehicles.append(Vehicle(n + 1, s.class_name, s.lane, s.lateral_m, s.speed_kmh, s.entry_s,
                                w, ln, asp, int(rng.integers(0, 1 << 16)), s.stop_at_m is not None))
    counting_y = np.zeros((len(vehicles), len(times)))
    front = np.zeros_like(counting_y)
    last_in_lane: dict[int, int] = {}
    for i, (v, s) in enumerate(zip(vehicles, specs)):
        up = c.lanes[v.lane] == "up"
        y0 = -1.0 if up else c.road_length_m * 1.6  # where the front enters
        s_stop = None
        if s.stop_at_m is not None:  # front distance at which the counting point stands there
            s_stop = (s.stop_at_m - y0 + v.length_m) if up else (y0 - s.stop_at_m)
        speed = _speed_profile(times, v.speed_kmh / 3.6, v.entry_s, s_stop, s.stop_s)
        dist = np.concatenate([[0.0], np.cumsum((speed[1:] + speed[:-1]) / 2 * _DT)])
        lead = last_in_lane.get(v.lane)
        if lead is not None:  # queue: never closer than min_gap to the leader's rear
            dist = np.minimum(dist, front[lead] - vehicles[lead].length_m - c.min_gap_m)
        front[i] = dist
        counting_y[i] = (y0 + dist - v.length_m) if up else (y0 - dist)
        last_in_lane[v.lane] = i
    speed_ms = np.gradient(front, _DT, axis=1)
    scene = Scene(c, road_homography(c), vehicles, times, counting_y, speed_ms)
    scene.crossings = _crossings(scene)
    return scene


def _random_arrivals(c: TrafficScene, rng: np.random.Generator) -> list[ScriptedVehicle]:
    classes = list(c.class_mix)
    p = np.array([c.class_mix[k] for k in classes], float)
    p /= p.sum()
    out: list[ScriptedVehicle] = []
    rate = c.arrivals_per_min / 60.0
    for lane, kind in enumerate(c.lanes):
        if kind == "closed" or rate <= 0:
            continue
        t = -_LEAD_IN_S + float(rng.exponential(1 / rate))
        while t < c.duration_s:
            cls = classes[int(rng.choice(len(classes), p=p))]
            stop = rng.random() < c.stop_prob
            out.append(ScriptedVehicle(
                lane=lane, class_name=cls, speed_kmh=float(rng.uniform(*c.speed_kmh)), entry_s=t,
                stop_at_m=(c.lines_m[c.stop_line] + float(rng.uniform(*c.stop_offset_m)))
                if stop else None,
                stop_s=float(rng.uniform(*c.stop_s)) if stop else 0.0,
                lateral_m=float(rng.uniform(-0.3, 0.3))))
            t += max(c.min_headway_s, float(rng.exponential(1 / rate)))
    return sorted(out, key=lambda v: v.entry_s)


def _crossings(scene: Scene) -> list[TruthCrossing]:
    """Who crossed which line, in which direction (spec §1's left→right rule), when, how fast."""
    last_t = float(scene.frame_times[-1]) if len(scene.frame_times) else 0.0
    out = []
    for name, (y_line, lanes) in scene.line_endpoints().items():
        start, end = scene._line_px(y_line, lanes)
        d = end - start
        for i, v in enumerate(scene.vehicles):
            if v.lane not in lanes:
                continue
            side = scene.counting_y[i] > y_line
            idx = np.flatnonzero(side[1:] != side[:-1])
            if not len(idx):
                continue
            j = int(idx[0])
            y0, y1 = scene.counting_y[i, j], scene.counting_y[i, j + 1]
            f = (y_line - y0) / (y1 - y0)
            t = float(scene.times[j] + f * _DT)
            if not 0.0 <= t <= last_t:
                continue
            x = scene.lane_x(v.lane) + v.lateral_m
            before, after = scene.project(np.array([[x, y0], [x, y1]]))
            s0 = d[0] * (before[1] - start[1]) - d[1] * (before[0] - start[0])
            s1 = d[0] * (after[1] - start[1]) - d[1] * (after[0] - start[0])
            direction = "toward" if s0 < 0 <= s1 else "away"
            sp = float(np.interp(t, scene.times, scene.speed_ms[i])) * 3.6
            out.append(TruthCrossing(name, direction, v.vehicle_id, v.class_name, t, sp))
    return sorted(out, key=lambda x: x.t)


# --------------------------------------------------------------------------- pixels


@dataclass(frozen=True)
class Crop:
    image: np.ndarray  # BGR
    alpha: np.ndarray  # float32 0..1, soft edges


def _soft_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    cv2.ellipse(m, (w // 2, h // 2), (max(1, int(w * 0.47)), max(1, int(h * 0.47))), 0, 0, 360,
                1.0, -1)
    m = np.maximum(m, _rect_core(h, w))
    k = max(3, (min(h, w) // 6) | 1)
    return cv2.GaussianBlur(m, (k, k), 0)


def _rect_core(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[h // 8: h - h // 8, w // 8: w - w // 8] = 1.0
    return m


@lru_cache(maxsize=4)
def load_crops(datasets: tuple[Path, ...], per_class: int, seed: int = 0,
               min_px: int = 24, split: str | None = None) -> dict[str, list[Crop]]:
    """Vehicle crops per taxonomy class from YOLO datasets (``data.yaml`` names mapped through
    the taxonomy's source map, source = the folder's name; a folder that is no known source,
    e.g. a curated dataset, is read as already in taxonomy names): boxes at least ``min_px``
    on a side, clear of the image border and of other labelled boxes, so each shows one
    vehicle. ``split`` (``"test"``, ...) takes crops from ``labels/<split>`` only."""
    import yaml

    from roadloop.data.datasets import IMAGE_SUFFIXES, load_taxonomy

    tax = load_taxonomy()
    rng = np.random.default_rng(seed)
    cands: dict[str, list[tuple[Path, np.ndarray]]] = {k: [] for k in VEHICLE_SIZE}
    for root in datasets:
        names = yaml.safe_load((root / "data.yaml").read_text())["names"]
        mapping = tax.sources.get(root.name) or {c: c for c in tax.classes}
        for lab in sorted((root / "labels").glob(f"{split or '*'}/*.txt")):
            rows = np.loadtxt(lab, ndmin=2) if lab.stat().st_size else np.zeros((0, 5))
            if rows.shape[1] != 5:
                continue
            for r in rows:
                cls = mapping.get(names[int(r[0])])
                if cls not in cands:
                    continue
                x, y, w, h = r[1:]
                if x - w / 2 < 0.01 or y - h / 2 < 0.01 or x + w / 2 > 0.99 or y + h / 2 > 0.99:
                    continue
                others = rows[(rows[:, 1:] != r[1:]).any(axis=1)]
                if len(others) and (
                    (np.abs(others[:, 1] - x) < (others[:, 3] + w) / 2)
                    & (np.abs(others[:, 2] - y) < (others[:, 4] + h) / 2)
                ).any():
                    continue
                image = _image_of(root / "images" / lab.parent.name, lab.stem, IMAGE_SUFFIXES)
                if image is not None:
                    cands[cls].append((image, r[1:]))
    out: dict[str, list[Crop]] = {}
    for cls, items in cands.items():
        order = rng.permutation(len(items))
        crops: list[Crop] = []
        for k in order:
            if len(crops) >= per_class:
                break
            path, (x, y, w, h) = items[int(k)]
            img = cv2.imread(str(path))
            if img is None:
                continue
            ih, iw = img.shape[:2]
            x0, y0 = int((x - w / 2) * iw), int((y - h / 2) * ih)
            x1, y1 = int((x + w / 2) * iw), int((y + h / 2) * ih)
            if min(x1 - x0, y1 - y0) < min_px:
                continue
            crop = img[y0:y1, x0:x1]
            scale = min(1.0, 96 / max(crop.shape[:2]))
            crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            crops.append(Crop(crop, _soft_mask(*crop.shape[:2])))
        out[cls] = crops
    return out


def _image_of(folder: Path, stem: str, suffixes: set[str]) -> Path | None:
    jpg = folder / f"{stem}.jpg"
    if jpg.is_file():
        return jpg
    return next((p for s in sorted(suffixes) if (p := folder / f"{stem}{s}").is_file()), None)


@lru_cache(maxsize=4)
def video_background(video: Path, width: int, height: int, samples: int = 30) -> np.ndarray:
    """Per-pixel median of ``samples`` frames spread over ``video``: the road without traffic."""
    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for i in np.linspace(0, max(0, n - 1), samples).astype(int):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
        ok, f = cap.read()
        if ok:
            frames.append(cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA))
    cap.release()
    if not frames:
        raise ValueError(f"no frames could be read from {video}")
    return np.median(np.stack(frames), axis=0).astype(np.uint8)


def _plain_road(scene: Scene) -> np.ndarray:
    c = scene.config
    img = np.full((c.height, c.width, 3), (70, 110, 80), np.uint8)
    half = len(c.lanes) * c.lane_width_m / 2
    road = scene.project(np.array([[-half, 0], [half, 0], [half, c.road_length_m * 1.6],
                                   [-half, c.road_length_m * 1.6]]))
    cv2.fillConvexPoly(img, road.astype(np.int32), (90, 90, 90))
    return img


def render_frames(scene: Scene) -> Iterator[np.ndarray]:
    """BGR frames of the scene, one at a time (far vehicles first, so near ones occlude)."""
    c = scene.config
    bg = (video_background(c.background_video, c.width, c.height)
          if c.background_video else _plain_road(scene))
    crops = load_crops(tuple(c.crop_datasets), c.crops_per_class, c.seed,
                       split=c.crop_split) if c.crop_datasets else {}
    rng = np.random.default_rng(c.seed + 7)
    by_id = {v.vehicle_id: v for v in scene.vehicles}
    for truth in scene.truth_frames():
        frame = bg.astype(np.float32)
        for box in reversed(truth.boxes):  # truth is nearest first
            v = by_id[box.vehicle_id]
            full = _full_box(scene, v, truth.t)
            _paste(frame, full, crops.get(v.class_name) or [], v)
        if c.pixel_noise:
            frame += rng.normal(0, c.pixel_noise, frame.shape).astype(np.float32)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def _full_box(scene: Scene, v: Vehicle, t: float) -> np.ndarray:
    j = min(round((t - scene.times[0]) / _DT), len(scene.times) - 1)
    i = v.vehicle_id - 1
    x = scene.lane_x(v.lane) + v.lateral_m
    y = scene.counting_y[i, j]
    (u, vv), (ul, _), (ur, _) = scene.project(np.array([[x, y], [x - .5, y], [x + .5, y]]))
    bw = (ur - ul) * v.width_m * 1.1
    bh = bw * v.aspect
    return np.array([u - bw / 2, vv - bh, u + bw / 2, vv])


def _paste(frame: np.ndarray, box: np.ndarray, crops: list[Crop], v: Vehicle) -> None:
    h, w = frame.shape[:2]
    bw, bh = round(box[2] - box[0]), round(box[3] - box[1])
    if bw < 2 or bh < 2:
        return
    if crops:
        crop = crops[v.crop % len(crops)]
        img = cv2.resize(crop.image, (bw, bh), interpolation=cv2.INTER_AREA).astype(np.float32)
        alpha = cv2.resize(crop.alpha, (bw, bh))
    else:  # a plain coloured body with a dark window band
        colour = np.array([(v.crop * 37) % 200 + 30, (v.crop * 91) % 200 + 30,
                           (v.crop * 53) % 200 + 30], np.float32)
        img = np.empty((bh, bw, 3), np.float32)
        img[:] = colour
        img[bh // 5: bh // 2] *= 0.4
        alpha = _soft_mask(bh, bw)
    x0, y0 = round(box[0]), round(box[1])
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x0 + bw), min(h, y0 + bh)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    sub = img[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0]
    a = alpha[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0, None]
    frame[cy0:cy1, cx0:cx1] = frame[cy0:cy1, cx0:cx1] * (1 - a) + sub * a
