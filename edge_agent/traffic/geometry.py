"""A camera's traffic geometry: counting lines, zones, a homography to metres, PCU weights.

This is the ``traffic`` section of the camera's configuration document
(``docs/traffic.md``). One parser, ``parse_traffic_section``, is used by the agent *and* by
the gateway (which refuses a bad document with a 422), so both agree on what is valid.
Every refusal is a ``ValueError`` that names the field and says what is wrong with it: a line
outside the image, a self-intersecting zone, a degenerate homography, a duplicate name.

Coordinates are pixels of a reference image of ``frame_size``; ``TrafficConfig.scaled_to``
maps them onto the stream's actual size (the homography follows).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

Point = tuple[float, float]

# Passenger-car units (the table; a class missing here weighs 1.0).
DEFAULT_PCU: dict[str, float] = {
    "bicycle": 0.5, "bike": 0.5, "motorcycle": 0.7, "car": 1.0, "van": 1.5, "truck": 2.5,
    "bus": 3.0, "trailer": 4.0,
}
INTERVALS_S = (60, 300, 900)
MAX_SIDE = 16384
MAX_LINES = 64
MAX_ZONES = 64
MAX_POLYGON_POINTS = 64
MAX_HOMOGRAPHY_POINTS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\- ]{1,64}$")
_DIRECTIONS = ("both", "in", "out")
_KEYS = {"frame_size", "lines", "zones", "homography", "pcu", "interval_s", "events"}
_LINE_KEYS = {"name", "start", "end", "in_label", "out_label", "allowed"}
_ZONE_KEYS = {"name", "polygon", "capacity"}
_EVENT_KEYS = {"jam_min_s", "stopped_min_s", "stopped_speed_kmh"}


@dataclass(frozen=True)
class CountingLine:
    """Crossing from the left of ``start → end`` to its right (image axes, y down) is ``in``."""

    name: str
    start: Point
    end: Point
    in_label: str = "in"
    out_label: str = "out"
    allowed: str = "both"  # both | in | out: a crossing against it is a wrong-way event

    @property
    def length(self) -> float:
        return math.dist(self.start, self.end)


@dataclass(frozen=True)
class Zone:
    name: str
    polygon: tuple[Point, ...]
    capacity: float = 10.0  # vehicles the zone holds when full (sets its density states)


@dataclass(frozen=True)
class Homography:
    """Image pixels → ground-plane metres, fitted to 4+ point pairs."""

    image_points: tuple[Point, ...]
    world_points: tuple[Point, ...]
    matrix: np.ndarray = field(compare=False, repr=False)

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """``(N, 2)`` pixels → ``(N, 2)`` metres."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 1, 2)
        return cv2.perspectiveTransform(pts, self.matrix).reshape(-1, 2)


@dataclass(frozen=True)
class EventRules:
    jam_min_s: float = 120.0  # a zone in the jam state this long is an incident
    stopped_min_s: float = 30.0  # a vehicle standing this long (outside a queue) is one
    stopped_speed_kmh: float = 3.0  # below this a vehicle is standing


@dataclass(frozen=True)
class TrafficConfig:
    frame_size: tuple[int, int]
    lines: tuple[CountingLine, ...] = ()
    zones: tuple[Zone, ...] = ()
    homography: Homography | None = None
    pcu: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PCU))
    interval_s: int = 60
    events: EventRules = field(default_factory=EventRules)

    def pcu_of(self, class_name: str) -> float:
        return float(self.pcu.get(class_name, 1.0))

    def scaled_to(self, width: int, height: int) -> TrafficConfig:
        """The same geometry on a ``width × height`` stream (coordinates scaled per axis)."""
        w0, h0 = self.frame_size
        if (width, height) == (w0, h0):
            return self
        sx, sy = width / w0, height / h0

        def s(p: Point) -> Point:
            return (p[0] * sx, p[1] * sy)

        homography = None
        if self.homography is not None:
            inverse_scale = np.diag([1.0 / sx, 1.0 / sy, 1.0])
            homography = Homography(
                tuple(s(p) for p in self.homography.image_points),
                self.homography.world_points,
                self.homography.matrix @ inverse_scale,
            )
        return replace(
            self,
            frame_size=(width, height),
            lines=tuple(replace(ln, start=s(ln.start), end=s(ln.end)) for ln in self.lines),
            zones=tuple(replace(z, polygon=tuple(s(p) for p in z.polygon)) for z in self.zones),
            homography=homography,
        )


# --------------------------------------------------------------------------- field checks
def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}"[:200])  # noqa: TRY004
    try:
        v = float(value)
    except OverflowError:  # an integer beyond any float: out of range like infinity
        v = math.inf
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{where} must be between {lo:g} and {hi:g}, got {value!r}"[:200])
    return v


def _object(value: Any, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, got {type(value).__name__}")  # noqa: TRY004
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown[:5]}; known: {sorted(keys)}")
    return value


def _list(value: Any, where: str, lo: int, hi: int) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)) or not lo <= len(value) <= hi:
        raise ValueError(f"{where} must be a list of {lo}-{hi} items")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{where} must be 1-64 characters of letters, digits, '_', '.', '-' "
                         f"or spaces, got {value!r}"[:200])
    return value


def _point(value: Any, where: str, size: tuple[int, int] | None) -> Point:
    pair = _list(value, where, 2, 2)
    x = _number(pair[0], f"{where}[0]", -1e9, 1e9)
    y = _number(pair[1], f"{where}[1]", -1e9, 1e9)
    if size is not None and not (0 <= x <= size[0] and 0 <= y <= size[1]):
        raise ValueError(f"{where} ({x:g}, {y:g}) lies outside the {size[0]}x{size[1]} image")
    return (x, y)


def _unique(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{where}: the name {n!r} is used twice")
        seen.add(n)


# --------------------------------------------------------------------------- geometry checks
def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def segments_intersect(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """Whether the closed segments ``p1p2`` and ``q1q2`` share a point (touching counts)."""
    d1, d2 = _cross(q1, q2, p1), _cross(q1, q2, p2)
    d3, d4 = _cross(p1, p2, q1), _cross(p1, p2, q2)
    if ((d1 > 0) != (d2 > 0)) and d1 != 0 and d2 != 0 and ((d3 > 0) != (d4 > 0)) \
            and d3 != 0 and d4 != 0:
        return True

    def on(a: Point, b: Point, c: Point, d: float) -> bool:  # c collinear with ab, within it
        return d == 0 and min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) \
            and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    return on(q1, q2, p1, d1) or on(q1, q2, p2, d2) or on(p1, p2, q1, d3) or on(p1, p2, q2, d4)


def polygon_self_intersection(polygon: Sequence[Point]) -> tuple[int, int] | None:
    """The first pair of edges (by index) that cross or touch, other than neighbours sharing
    their common vertex; None for a simple polygon."""
    n = len(polygon)
    edges = [(polygon[i], polygon[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):  # neighbours: only the shared vertex
                a, b = edges[i], edges[j]
                shared = a[1] if j == i + 1 else a[0]
                other_a = a[0] if j == i + 1 else a[1]
                other_b = b[1] if j == i + 1 else b[0]
                # Folding back onto itself (collinear overlap) is a self-intersection too.
                if _cross(shared, other_a, other_b) == 0 and (
                        (other_a[0] - shared[0]) * (other_b[0] - shared[0])
                        + (other_a[1] - shared[1]) * (other_b[1] - shared[1]) > 0):
                    return (i, j)
                continue
            if segments_intersect(*edges[i], *edges[j]):
                return (i, j)
    return None


def polygon_area(polygon: Sequence[Point]) -> float:
    pts = np.asarray(polygon, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _spread(points: Sequence[Point]) -> float:
    """Smallest/largest singular value of the centred points: ~0 when they lie on a line."""
    pts = np.asarray(points, dtype=np.float64)
    s = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
    return float(s[-1] / s[0]) if s[0] > 0 else 0.0


def _collinear_triple(points: Sequence[Point], rel_tol: float = 1e-3) -> tuple[int, ...] | None:
    n = len(points)
    scale = max(math.dist(a, b) for a in points for b in points) or 1.0
    for i in range(n):
        for j in range(i + 1, n):
            for k in range(j + 1, n):
                if abs(_cross(points[i], points[j], points[k])) <= rel_tol * scale * scale:
                    return (i, j, k)
    return None


def _general_quad(points: Sequence[Point]) -> tuple[int, ...] | None:
    """Indices of four points no three of which lie on one line, or None. A homography has
    eight unknowns: it is determined only by four such points, whatever else is given —
    six points with five on one line leave it free off that line (errors of metres)."""
    for quad in itertools.combinations(range(len(points)), 4):
        if _collinear_triple([points[i] for i in quad]) is None:
            return quad
    return None


def fit_homography(image_points: Sequence[Point], world_points: Sequence[Point],
                   where: str = "traffic.homography") -> Homography:
    """Least-squares homography with the checks that make it usable for speeds: 4+ points,
    among them four with no three on one line (in the image and in the world: the fewest
    that determine it), a well-spread set, a finite invertible matrix, every calibration
    point in front of the camera (no horizon between them) and a re-projection error under
    5 % of the world extent."""
    if len(image_points) != len(world_points):
        raise ValueError(f"{where}: {len(image_points)} image points but "
                         f"{len(world_points)} world points")
    for label, pts in (("image_points", image_points), ("world_points", world_points)):
        if len(pts) == 4:
            triple = _collinear_triple(pts)
            if triple is not None:
                raise ValueError(f"{where} is degenerate: {label} {list(triple)} lie on one "
                                 "line")
        elif len(pts) > 4 and _general_quad(pts) is None:
            raise ValueError(f"{where} is degenerate: no four of the {label} are free of three "
                             "on one line (all but one lie on one line, or points repeat), so "
                             "they do not determine the mapping: add points off that line")
        if _spread(pts) < 0.02:
            raise ValueError(f"{where} is degenerate: the {label} (nearly) lie on one line")
    img = np.asarray(image_points, dtype=np.float64)
    world = np.asarray(world_points, dtype=np.float64)
    matrix, _ = cv2.findHomography(img, world, 0)
    if matrix is None or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{where} is degenerate: no homography fits these points")
    if abs(np.linalg.det(matrix)) < 1e-12 or np.linalg.cond(matrix) > 1e12:
        raise ValueError(f"{where} is degenerate: the fitted matrix is (nearly) singular")
    w = img @ matrix[2, :2] + matrix[2, 2]
    if not (np.all(w > 0) or np.all(w < 0)):
        raise ValueError(f"{where} is degenerate: the horizon passes between the image points "
                         "(some map behind the camera)")
    mapped = cv2.perspectiveTransform(img.reshape(-1, 1, 2), matrix).reshape(-1, 2)
    error = float(np.sqrt(np.mean(np.sum((mapped - world) ** 2, axis=1))))
    extent = float(np.max(np.ptp(world, axis=0)))
    if not math.isfinite(error) or error > 0.05 * extent:
        raise ValueError(f"{where} is inconsistent: the points re-project with an RMS error of "
                         f"{error:.2f} m over a {extent:.1f} m extent (a point pair is wrong)")
    return Homography(tuple(map(tuple, img.tolist())), tuple(map(tuple, world.tolist())),
                      matrix)


# --------------------------------------------------------------------------- the parser
def _parse_line(raw: Any, where: str, size: tuple[int, int]) -> CountingLine:
    d = _object(raw, where, _LINE_KEYS)
    name = _name(d.get("name"), f"{where}.name")
    start = _point(d.get("start"), f"{where}.start", size)
    end = _point(d.get("end"), f"{where}.end", size)
    if math.dist(start, end) < 2.0:
        raise ValueError(f"{where} {name!r} is shorter than 2 pixels: start and end coincide")
    in_label = _name(d.get("in_label", "in"), f"{where}.in_label")
    out_label = _name(d.get("out_label", "out"), f"{where}.out_label")
    if in_label == out_label:
        raise ValueError(f"{where} {name!r}: in_label and out_label are both {in_label!r}")
    allowed = d.get("allowed", "both")
    if allowed not in _DIRECTIONS:
        raise ValueError(f"{where}.allowed must be one of {list(_DIRECTIONS)}, got {allowed!r}"
                         [:200])
    return CountingLine(name, start, end, in_label, out_label, allowed)


def _parse_zone(raw: Any, where: str, size: tuple[int, int]) -> Zone:
    d = _object(raw, where, _ZONE_KEYS)
    name = _name(d.get("name"), f"{where}.name")
    pts = _list(d.get("polygon"), f"{where}.polygon", 3, MAX_POLYGON_POINTS)
    polygon = tuple(_point(p, f"{where}.polygon[{i}]", size) for i, p in enumerate(pts))
    seen: dict[Point, int] = {}
    for i, p in enumerate(polygon):  # checked first: a repeat also makes two edges "cross"
        if p in seen:
            closing = " (the polygon closes itself: do not repeat the first point)" \
                if (seen[p], i) == (0, len(polygon) - 1) else ""
            raise ValueError(f"{where} {name!r} polygon repeats a corner: points {seen[p]} and "
                             f"{i} are both {list(p)}{closing}")
        seen[p] = i
    crossing = polygon_self_intersection(polygon)
    if crossing is not None and polygon_area(polygon) < 16.0 and _spread(polygon) < 1e-3:
        raise ValueError(f"{where} {name!r} polygon has its points on one line: it encloses "
                         "nothing")
    if crossing is not None:
        raise ValueError(f"{where} {name!r} polygon is self-intersecting (edges {crossing[0]} "
                         f"and {crossing[1]} cross)")
    if polygon_area(polygon) < 16.0:
        raise ValueError(f"{where} {name!r} polygon encloses less than 16 square pixels")
    capacity = _number(d.get("capacity", 10.0), f"{where}.capacity", 0.5, 10_000)
    return Zone(name, polygon, capacity)


def parse_traffic_section(section: Any) -> TrafficConfig:
    """The ``traffic`` section of a camera's configuration, checked (``ValueError`` naming
    the first problem otherwise)."""
    d = _object(section, "traffic", _KEYS)
    size_raw = _list(d.get("frame_size"), "traffic.frame_size", 2, 2)
    size = (int(_number(size_raw[0], "traffic.frame_size[0]", 16, MAX_SIDE)),
            int(_number(size_raw[1], "traffic.frame_size[1]", 16, MAX_SIDE)))
    if [float(v) for v in size_raw] != [float(v) for v in size]:
        raise ValueError(f"traffic.frame_size must be whole pixels, got {list(size_raw)}")
    lines = tuple(_parse_line(raw, f"traffic.lines[{i}]", size) for i, raw in
                  enumerate(_list(d.get("lines", []), "traffic.lines", 0, MAX_LINES)))
    _unique([ln.name for ln in lines], "traffic.lines")
    zones = tuple(_parse_zone(raw, f"traffic.zones[{i}]", size) for i, raw in
                  enumerate(_list(d.get("zones", []), "traffic.zones", 0, MAX_ZONES)))
    _unique([z.name for z in zones], "traffic.zones")
    homography = None
    if d.get("homography") is not None:
        h = _object(d["homography"], "traffic.homography", {"image_points", "world_points"})
        img_raw = _list(h.get("image_points"), "traffic.homography.image_points", 4,
                        MAX_HOMOGRAPHY_POINTS)
        world_raw = _list(h.get("world_points"), "traffic.homography.world_points", 4,
                          MAX_HOMOGRAPHY_POINTS)
        img = [_point(p, f"traffic.homography.image_points[{i}]", size)
               for i, p in enumerate(img_raw)]
        world = [_point(p, f"traffic.homography.world_points[{i}]", None)
                 for i, p in enumerate(world_raw)]
        homography = fit_homography(img, world)
    pcu = dict(DEFAULT_PCU)
    if d.get("pcu") is not None:
        raw_pcu = d["pcu"]
        if not isinstance(raw_pcu, Mapping) or len(raw_pcu) > 64:
            raise ValueError("traffic.pcu must be an object of at most 64 class weights")
        for cls, weight in raw_pcu.items():
            pcu[_name(cls, "traffic.pcu key")] = _number(weight, f"traffic.pcu.{cls}", 0.1, 20)
    interval = d.get("interval_s", 60)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval not in INTERVALS_S:
        raise ValueError(f"traffic.interval_s must be one of {list(INTERVALS_S)}, got "
                         f"{interval!r}"[:200])
    events = EventRules()
    if d.get("events") is not None:
        e = _object(d["events"], "traffic.events", _EVENT_KEYS)
        events = EventRules(
            jam_min_s=_number(e.get("jam_min_s", events.jam_min_s), "traffic.events.jam_min_s",
                              10, 86_400),
            stopped_min_s=_number(e.get("stopped_min_s", events.stopped_min_s),
                                  "traffic.events.stopped_min_s", 5, 86_400),
            stopped_speed_kmh=_number(e.get("stopped_speed_kmh", events.stopped_speed_kmh),
                                      "traffic.events.stopped_speed_kmh", 0.5, 30),
        )
    return TrafficConfig(size, lines, zones, homography, pcu, int(interval), events)


__all__ = [
    "DEFAULT_PCU",
    "CountingLine",
    "EventRules",
    "Homography",
    "TrafficConfig",
    "Zone",
    "fit_homography",
    "parse_traffic_section",
    "polygon_self_intersection",
    "segments_intersect",
]
