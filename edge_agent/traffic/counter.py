"""Per frame: which confirmed tracks crossed a counting line (and which way, how fast),
entered or left a zone, how full each zone is, and which incidents began.

How a crossing is decided (the failure modes counters meet in the field):

* The counting point is the box's bottom-centre. Its **side** of a line changes only when it
  is more than a band beyond the line — ``BAND_FRACTION`` of the box height, at least
  ``MIN_BAND_PX`` — so a box whose bottom edge flickers across the line, or a vehicle that
  stops on it, does not toggle the side and is not counted again and again.
* A crossing counts when the side flips and the path between the two firm positions meets
  the line *segment* (passing beside the line's end is not a crossing); each track counts on a
  line at most once. Unconfirmed tracks (ID -1) never count. A track is confirmed only after
  ``min_hits`` consecutive matched frames, and a fast vehicle may cross the line in those
  frames (at 10 fps a car at 60 km/h near the camera moves most of its length a frame): a
  newly confirmed track's side therefore starts where its *unconfirmed* boxes of the frames
  just before were (``_prehistory``: each the best-overlapping box of the frame before,
  similar in size, as the tracker matched them), else where it is first seen — so a vehicle
  first seen beyond a line never counts on it.
* A vehicle that stops *on* a line (inside the band) and is hidden for longer than the
  tracker's ``lost_s`` comes back under a new ID, born in the band, with no firm side: it
  would never count. A track born inside a line's band therefore takes over the last firm
  side of a track lost on that line within ``REID_WINDOW_S`` whose last counting point was
  within its own box size of the new one (the nearest, each lost track at most once) — only
  from a lost track that had not counted on that line, so a vehicle that already crossed
  never counts again through its successor.
* Speed at a crossing (with a homography): the least-squares slope of the track's ground
  position over the last ``SPEED_WINDOW_S`` seconds, from at least three observations over
  ``MIN_SPEED_SPAN_S``; otherwise none (a count without a speed, never a made-up one).
* A zone is entered when the counting point is a band inside the polygon (or when a new track
  is first seen inside), left when it is a band outside or when the tracker gives up on the
  track; dwell is the time between the two. Occupancy is the number of alive confirmed tracks
  inside; its density state per zone has the hysteresis of ``edge_agent.counting``.
* Events: a zone in ``jam`` for ``jam_min_s`` (then ``jam_cleared`` with its duration), a
  vehicle standing (below ``stopped_speed_kmh``) for ``stopped_min_s`` inside a zone that is
  neither heavy nor jammed — outside every zone it is parked, in a congested zone it is
  queueing: neither is an incident —, and a crossing against a line's ``allowed`` direction.
* A new geometry (lines, zones or homography edited, or a stream of another size) needs a
  counter in the new coordinates, but what is in progress is handed on (``hand_over``): the
  new counter starts with the old one's live tracks, scaled (``_carried``), and a track of its
  own tracker adopts one of them (``_adopt``) only if it was first seen in the new counter's
  first ``ADOPT_FRAMES`` frames (a vehicle in view at the change is detected at once; one
  first seen later is another vehicle) and both its first box and its box now lie within
  half that vehicle's box size of where the vehicle's own recent motion (``trail``) puts it
  at those times (not where it was at the change: in a moving queue that is where the car
  behind is by then; and an oncoming car does not move as the one that left), nearest pairs
  first over all of the frame's new tracks (each vehicle adopted once). The adopter takes
  its firm, uncounted sides of the lines whose name and (normalised) geometry are unchanged,
  the lines it already counted on (by name, whatever their geometry: never counted twice),
  its entry times into the zones whose name, polygon and capacity are unchanged (no second
  entry, dwell measured from the first), its standing state and its ground-track history.
  Such tracks of the first frames (adopters or not) enter and leave zones from their
  unconfirmed boxes on, at those boxes' times, so the new tracker's confirmation frames do
  not delay an entry. Carried vehicles keep their last sighting across further changes (each
  prediction runs from it). Until adopted a carried vehicle still occupies its zones; one not
  adopted within the old tracker's ``lost_s`` plus the new tracker's confirmation frames
  (counted from its last sighting) leaves them then (its exits)
  and its uncounted sides become a lost track's (``_lost``), as if the old tracker had lost
  it. Zones that keep their shape keep their density state, jam timer and "jam reported"
  flag; a zone that vanishes or changes gets its vehicles' exits and, if its jam was
  reported, a ``jam_cleared`` from the old counter. ``close`` clears a reported jam too.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from edge_agent.boxes import box_iou
from edge_agent.counting import DensityState, DensityTracker
from edge_agent.traffic.events import (
    Crossing,
    FrameTraffic,
    TrafficEvent,
    ZoneEntry,
    ZoneExit,
    ZoneState,
)
from edge_agent.traffic.geometry import CountingLine, TrafficConfig
from edge_agent.traffic.tracking import TrackedBox, TrackerSettings, VehicleTracker

BAND_FRACTION = 0.1
MIN_BAND_PX = 2.0
SPEED_WINDOW_S = 1.0
MIN_SPEED_SPAN_S = 0.4
STOP_WINDOW_S = 2.0
HISTORY_S = 3.0
ASSUMED_VEHICLE_HEIGHT_M = 1.5  # only for "standing" without a homography (pixels → m/s)
# How long a track lost while standing on a line may hand its side to a successor: a vehicle
# stopped on the line is hidden by traffic passing in front of it for about as long as that
# traffic takes to pass — an 18 m articulated bus at 7 km/h, 9 s; ten covers it. Longer is
# not needed and would let a later vehicle, stopping near the same spot, take its side.
REID_WINDOW_S = 10.0
# A crossing found through a new track's unconfirmed past is dropped when another track that
# counted on the same line this recently overlaps it this much (see ``_counted_twin``).
TWIN_WINDOW_S = 1.0
TWIN_MIN_IOU = 0.3
# Hand-over (``_adopt``): a new track takes a carried vehicle's state only if it was first
# seen in the first ``ADOPT_FRAMES`` frames of the new counter (a vehicle in view at the
# change is detected at once; one missed in the first frame may come in the second; later it
# is another vehicle), and only if its first and its current box both lie within
# ``ADOPT_TOLERANCE`` of the carried vehicle's box size from where that vehicle's own motion
# (its last ``TRAIL_S`` of positions) puts it at those times. Half a box is less than the
# spacing of bumper-to-bumper vehicles, so the vehicle behind is never taken for the one ahead.
ADOPT_FRAMES = 2
ADOPT_TOLERANCE = 0.5
TRAIL_S = 1.0


@dataclass
class _Track:
    track_id: int
    class_name: str
    first_seen: float
    last_seen: float
    anchor: tuple[float, float]
    height: float
    size: float  # the box's larger side (px): how far a re-detection of it may lie
    history: deque[tuple[float, float, float]] = field(default_factory=deque)  # t, gx, gy
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    sides: dict[str, int] = field(default_factory=dict)
    side_points: dict[str, tuple[float, float]] = field(default_factory=dict)
    past_sides: set[str] = field(default_factory=set)  # lines whose side is from _prehistory
    counted: set[str] = field(default_factory=set)
    counted_at: dict[str, float] = field(default_factory=dict)
    inside: dict[str, float] = field(default_factory=dict)  # zone -> entry time
    stopped_since: float | None = None
    stopped_reported: bool = False
    # t, x, y of its counting point in pixels over the last ``TRAIL_S``: its image motion,
    # which predicts where a carried vehicle is when a new tracker first sees it
    trail: deque[tuple[float, float, float]] = field(default_factory=deque)

    def motion(self) -> tuple[float, float]:
        """Image velocity (px/s) of the counting point: a least-squares fit of the trail;
        (0, 0) from fewer than two positions."""
        if len(self.trail) < 2:
            return (0.0, 0.0)
        arr = np.asarray(self.trail, dtype=np.float64)
        tc = arr[:, 0] - arr[:, 0].mean()
        den = float(tc @ tc)
        if den <= 0.0:
            return (0.0, 0.0)
        vx, vy = tc @ (arr[:, 1:] - arr[:, 1:].mean(axis=0)) / den
        return (float(vx), float(vy))


_SAME = 1e-6  # normalised coordinates (fractions of the frame) closer than this are equal


def _same_points(a: Sequence[tuple[float, float]], size_a: tuple[int, int],
                 b: Sequence[tuple[float, float]], size_b: tuple[int, int]) -> bool:
    """Whether two point lists are the same place in the view, each in its frame's pixels."""
    return len(a) == len(b) and all(
        abs(p[0] / size_a[0] - q[0] / size_b[0]) <= _SAME
        and abs(p[1] / size_a[1] - q[1] / size_b[1]) <= _SAME for p, q in zip(a, b))


@dataclass
class _Lost:
    """A track the tracker gave up on, with the lines it stood on a firm side of and had not
    counted on yet (what a successor born on the line may take over)."""

    last_seen: float
    anchor: tuple[float, float]
    size: float
    sides: dict[str, tuple[int, tuple[float, float]]]  # line -> (side, where it was firm)


def _signed_distance(line: CountingLine, p: tuple[float, float]) -> float:
    """> 0 on the right of start → end (image axes, y down), in pixels."""
    (sx, sy), (ex, ey) = line.start, line.end
    return ((ex - sx) * (p[1] - sy) - (ey - sy) * (p[0] - sx)) / line.length


def _meets_segment(line: CountingLine, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the path a → b (on both sides of the line) passes through the segment."""
    da, db = _signed_distance(line, a), _signed_distance(line, b)
    if da == db:
        return False
    t = da / (da - db)
    px, py = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
    (sx, sy), (ex, ey) = line.start, line.end
    u = ((px - sx) * (ex - sx) + (py - sy) * (ey - sy)) / (line.length ** 2)
    return 0.0 <= u <= 1.0


def _velocity(samples: list[tuple[float, float, float]]) -> float | None:
    """Speed (units/s) of a least-squares straight-line fit, or None when too little data."""
    if len(samples) < 3:
        return None
    arr = np.asarray(samples, dtype=np.float64)
    t = arr[:, 0]
    if t[-1] - t[0] < MIN_SPEED_SPAN_S:
        return None
    # The least-squares slope in closed form, both axes at once (np.polyfit twice per track
    # per frame was most of the counter's own time at 50 objects).
    tc = t - t.mean()
    vx, vy = tc @ (arr[:, 1:] - arr[:, 1:].mean(axis=0)) / (tc @ tc)
    return float(np.hypot(vx, vy))


class TrafficCounter:
    """Tracks, counts, zone states and events of one camera (one geometry)."""

    def __init__(self, config: TrafficConfig, class_names: Sequence[str], *,
                 tracker: TrackerSettings | None = None) -> None:
        self.config = config
        self.tracker = VehicleTracker(class_names, tracker)
        self._tracks: dict[int, _Track] = {}
        self._contours = {z.name: np.asarray(z.polygon, dtype=np.float32).reshape(-1, 1, 2)
                          for z in config.zones}
        self._density = {z.name: DensityTracker(z.capacity) for z in config.zones}
        self._jam_since: dict[str, float] = {}
        self._jam_reported: set[str] = set()
        self._lost: list[_Lost] = []
        # Live tracks of the counter this one took over from (``hand_over``), in this
        # geometry's pixels, until a track of this counter's tracker adopts them.
        self._carried: list[_Track] = []
        # The unconfirmed boxes of the last frames (one entry per frame, empty lists too, so
        # that the entries stay consecutive): where a track was before it got its ID.
        self._unconfirmed: deque[list[TrackedBox]] = deque(
            maxlen=max(0, self.tracker.settings.min_hits - 1))
        # The times of the last frames (this one last): when each of those boxes was seen.
        self._times: deque[float] = deque(maxlen=max(1, self.tracker.settings.min_hits))
        self._frames = 0  # frames this counter has counted (``ADOPT_FRAMES``)
        self._handed = False  # whether it took over from another counter (``hand_over``)
        self._now: float | None = None  # the counter's clock at the last frame
        self._gap = 1.0 / self.tracker.settings.frame_rate  # the last frame gap seen
        self._shift = 0.0  # added to stream times after the stream's clock went back

    # ------------------------------------------------------------------ per frame
    def update(self, detections: Sequence, stream_time: float) -> FrameTraffic:
        stream_time = self._clock(stream_time)
        boxes = self.tracker.update(detections, stream_time)
        out = FrameTraffic(boxes)
        self._frames += 1
        self._times.append(stream_time)
        self._lost = [x for x in self._lost if stream_time - x.last_seen <= REID_WINDOW_S]
        # The tracks confirmed in this frame, with their unconfirmed past; all of them at once
        # take over carried vehicles (``_adopt``) before any of them counts.
        new = {b.track_id: self._start(b, stream_time) for b in boxes
               if b.track_id >= 0 and b.track_id not in self._tracks}
        if new and self._carried:
            self._adopt(new, stream_time)
        replayed = {tid for tid, (_, past) in new.items()
                    if self._handed and past and self._frames - len(past) <= ADOPT_FRAMES}
        for tid in replayed:
            self._replay_zones(*new[tid], out)
        # Known tracks first: a new track's crossing from its unconfirmed past is checked
        # against what they counted in this very frame (``_counted_twin``).
        for box in sorted((b for b in boxes if b.track_id >= 0),
                          key=lambda b: b.track_id in new):
            self._observe(box, stream_time, out, first=box.track_id in new,
                          replayed=box.track_id in replayed)
        if self._unconfirmed.maxlen:
            self._unconfirmed.append([b for b in boxes if b.track_id < 0])
        alive = self.tracker.alive_ids()
        for tid in [t for t in self._tracks if t not in alive]:
            track = self._tracks.pop(tid)
            self._remember(track)
            self._finish(track, out)
        if self._carried:
            self._expire_carried(stream_time, out)
        self._zone_states(stream_time, out)
        self._standing(stream_time, {b.track_id for b in boxes if b.track_id >= 0}, out)
        return out

    def _clock(self, stream_time: float) -> float:
        """The stream's time, kept from going back. Sources give a clock that never does
        (media time, monotonic time); should one step back anyway, the tracker would skip
        every frame timed before its last (no IDs, no counts until the clock caught up), so
        the step is taken as one more frame gap and the clock runs on from there."""
        t = stream_time + self._shift
        if self._now is not None:
            if t < self._now:
                self._shift += self._now + self._gap - t
                t = self._now + self._gap
            elif t > self._now:
                self._gap = t - self._now
        self._now = t
        return t

    def close(self) -> FrameTraffic:
        """Every live track leaves its zones and a reported jam is cleared (the stream ends,
        or counting stops: nothing is watched any more)."""
        out = FrameTraffic([])
        for track in [*self._tracks.values(), *self._carried]:
            self._finish(track, out)
        self._tracks.clear()
        self._carried.clear()
        now = self._now if self._now is not None else 0.0
        for zone in sorted(self._jam_since):
            self._clear_jam(zone, now, out, "is no longer watched")
        return out

    # ------------------------------------------------------------------ mid-run changes
    def retune(self, config: TrafficConfig, class_names: Sequence[str], *,
               new_model: bool) -> None:
        """Go on counting under ``config``, whose lines, zones, homography and frame size are
        this counter's (``same_counting``): only PCU weights, event rules or the interval
        change. A new detector (``new_model``) restarts the tracks' class votes, so classes
        come from its vocabulary only; tracks, sides and zone states go on."""
        self.config = config
        self.tracker.set_classes(class_names, forget_votes=new_model)

    def same_counting(self, config: TrafficConfig) -> bool:
        """Whether counting under ``config`` is counting under this counter's geometry."""
        old = self.config
        return (old.frame_size, old.lines, old.zones, old.homography) == (
            config.frame_size, config.lines, config.zones, config.homography)

    def hand_over(self, config: TrafficConfig, class_names: Sequence[str], *,
                  tracker: TrackerSettings | None = None
                  ) -> tuple[TrafficCounter, FrameTraffic]:
        """A counter for a new geometry that goes on with what is in progress here (see the
        module docstring), and what ends with this one: exits from the zones that vanish or
        change shape, a ``jam_cleared`` for such a zone's reported jam."""
        new = TrafficCounter(config, class_names, tracker=tracker)
        new._handed = True
        out = FrameTraffic([])
        (w0, h0), (w1, h1) = self.config.frame_size, config.frame_size
        sx, sy = w1 / w0, h1 / h0

        def s(p: tuple[float, float]) -> tuple[float, float]:
            return (p[0] * sx, p[1] * sy)

        old_lines = {ln.name: ln for ln in self.config.lines}
        lines = {ln.name for ln in config.lines if ln.name in old_lines and _same_points(
            (old_lines[ln.name].start, old_lines[ln.name].end), (w0, h0),
            (ln.start, ln.end), (w1, h1))}
        old_zones = {z.name: z for z in self.config.zones}
        zones = {z.name for z in config.zones if z.name in old_zones
                 and old_zones[z.name].capacity == z.capacity
                 and _same_points(old_zones[z.name].polygon, (w0, h0), z.polygon, (w1, h1))}
        h_old, h_new = self.config.homography, config.homography
        # A track's history is ground positions: pixels without a homography (scaled), the
        # same metres under the same homography, else unusable (speeds start afresh).
        keep_history, scale_history = True, h_old is None and h_new is None
        if not scale_history:
            keep_history = h_old is not None and h_new is not None \
                and h_old.world_points == h_new.world_points \
                and _same_points(h_old.image_points, (w0, h0), h_new.image_points, (w1, h1))
        fx, fy = (sx, sy) if scale_history else (1.0, 1.0)

        def moved(t: _Track) -> _Track:
            x1, y1, x2, y2 = t.box
            box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
            sides = {n: v for n, v in t.sides.items() if n in lines and n not in t.counted}
            return _Track(
                t.track_id, t.class_name, t.first_seen, t.last_seen, s(t.anchor),
                box[3] - box[1], max(box[2] - box[0], box[3] - box[1]),
                deque((q[0], q[1] * fx, q[2] * fy) for q in t.history) if keep_history
                else deque(), box,
                sides, {n: s(t.side_points[n]) for n in sides}, set(), set(t.counted),
                dict(t.counted_at), {z: e for z, e in t.inside.items() if z in zones},
                t.stopped_since, t.stopped_reported,
                deque((q[0], q[1] * sx, q[2] * sy) for q in t.trail))

        for t in [*self._tracks.values(), *self._carried]:
            for zone, entered in t.inside.items():
                if zone not in zones:
                    out.exits.append(ZoneExit(zone, t.track_id, t.last_seen - entered))
            new._carried.append(moved(t))
        for x in self._lost:
            sides = {n: (side, s(p)) for n, (side, p) in x.sides.items() if n in lines}
            if sides:
                new._lost.append(_Lost(x.last_seen, s(x.anchor), x.size * max(sx, sy), sides))
        new._times.extend(self._times)
        for frame in self._unconfirmed:
            new._unconfirmed.append([TrackedBox(b.track_id, b.class_name, b.confidence, (
                b.xyxy[0] * sx, b.xyxy[1] * sy, b.xyxy[2] * sx, b.xyxy[3] * sy))
                for b in frame])
        now = self._now if self._now is not None else 0.0
        for zone in sorted(self._jam_since):
            if zone in zones:
                new._jam_since[zone] = self._jam_since[zone]
                if zone in self._jam_reported:
                    new._jam_reported.add(zone)
            else:
                self._clear_jam(zone, now, out, "was changed in the configuration")
        for zone in zones:
            new._density[zone] = self._density[zone]
        new._now, new._gap, new._shift = self._now, self._gap, self._shift  # one clock
        self._tracks.clear()
        self._carried.clear()
        return new, out

    def _adopt(self, new: dict[int, tuple[_Track, list[tuple[float, TrackedBox]]]],
               now: float) -> None:
        """Tracks confirmed in this frame take over carried vehicles (see ``ADOPT_FRAMES``).
        A track is a candidate only if its first box (the earliest of its unconfirmed past,
        else this one) came in the counter's first ``ADOPT_FRAMES`` frames. Its distance to
        a carried vehicle is the larger of two: its first box's counting point from where
        the vehicle's motion predicts it at that box's time, and its counting point now from
        the prediction for now — so it must be where that vehicle is and move as it moves
        (an oncoming vehicle, or one entering the view, is not it). Pairs within
        ``ADOPT_TOLERANCE`` of the carried vehicle's size are taken nearest first over all
        tracks and vehicles (each at most once). Carried sides outrank the new track's
        unconfirmed past (they are older)."""
        tracks, firsts, when = [], [], []
        for track, past in new.values():
            if self._frames - len(past) > ADOPT_FRAMES:
                continue  # first seen after the change's first frames: another vehicle
            t0, box0 = past[0] if past else (now, None)
            tracks.append(track)
            firsts.append(box0.anchor if box0 is not None else track.anchor)
            when.append(t0)
        if not tracks:
            return
        carried = self._carried
        pos = np.asarray([c.anchor for c in carried], dtype=np.float64)  # M x 2
        vel = np.asarray([c.motion() for c in carried], dtype=np.float64)
        seen = np.asarray([c.last_seen for c in carried], dtype=np.float64)
        tol = ADOPT_TOLERANCE * np.asarray([c.size for c in carried], dtype=np.float64)

        def gap(points: list[tuple[float, float]], at: np.ndarray) -> np.ndarray:
            """N x M distances of the tracks' points from the vehicles' predictions."""
            predicted = pos[None] + vel[None] * (at[:, None, None] - seen[None, :, None])
            return np.hypot(*(np.asarray(points, dtype=np.float64)[:, None] - predicted)
                            .transpose(2, 0, 1))

        cost = np.maximum(gap(firsts, np.asarray(when)),
                          gap([t.anchor for t in tracks], np.full(len(tracks), now)))
        taken_t, taken_c = set(), set()
        for i, j in sorted(zip(*np.nonzero(cost <= tol[None])), key=lambda ij: cost[ij]):
            if i in taken_t or j in taken_c:
                continue
            taken_t.add(i)
            taken_c.add(j)
            track, c = tracks[i], carried[j]
            track.first_seen = c.first_seen
            track.history = deque([*c.history, *track.history])
            track.trail = deque([*c.trail, *track.trail])
            track.counted |= c.counted
            track.counted_at.update(c.counted_at)
            for line, side in c.sides.items():
                track.sides[line], track.side_points[line] = side, c.side_points[line]
                track.past_sides.discard(line)
            track.inside.update(c.inside)
            track.stopped_since, track.stopped_reported = c.stopped_since, c.stopped_reported
        self._carried = [c for j, c in enumerate(carried) if j not in taken_c]

    def _replay_zones(self, track: _Track, past: list[tuple[float, TrackedBox]],
                      out: FrameTraffic) -> None:
        """A track a counter that took over (``hand_over``) first saw in its first frames:
        most likely a vehicle the old counter was tracking, which the new tracker took
        ``min_hits`` frames to confirm. Its zones go through its unconfirmed boxes of those
        frames, at their times, so the restart delays no entry (dwell as if no change)."""
        for k, (t, b) in enumerate(past):
            band = max(MIN_BAND_PX, BAND_FRACTION * b.height)
            self._zones_at(track, b.anchor, band, t, out, first=k == 0)

    def _expire_carried(self, now: float, out: FrameTraffic) -> None:
        """Carried vehicles no track adopted in time: lost (their exits; their sides left to
        a successor born on the line, as for any lost track)."""
        s = self.tracker.settings
        grace = s.lost_s + (s.min_hits + 2) * self._gap
        keep = []
        for c in self._carried:
            if now - c.last_seen <= grace:
                keep.append(c)
            else:
                self._remember(c)
                self._finish(c, out)
        self._carried = keep

    # ------------------------------------------------------------------ tracks
    def _start(self, box: TrackedBox, now: float
               ) -> tuple[_Track, list[tuple[float, TrackedBox]]]:
        """A track confirmed in this frame, its side of each line from its unconfirmed past
        (``_prehistory``) and its trail from it; returned with that past, oldest first, each
        box with its frame's time."""
        x1, y1, x2, y2 = box.xyxy
        track = _Track(box.track_id, box.class_name, now, now, box.anchor, box.height,
                       max(x2 - x1, y2 - y1))
        self._tracks[box.track_id] = track
        before = self._prehistory(box)
        times = list(self._times)[:-1]  # the frames before this one, oldest first
        past = list(zip(times[max(0, len(times) - len(before)):], before))
        track.trail.extend((t, b.anchor[0], b.anchor[1]) for t, b in past)
        self._start_sides(track, before)
        return track, past

    def _observe(self, box: TrackedBox, now: float, out: FrameTraffic, *,
                 first: bool, replayed: bool = False) -> None:
        """``first``: confirmed in this frame; ``replayed``: its zones already went through
        its unconfirmed boxes (``_replay_zones``), so it is not first seen here."""
        track = self._tracks[box.track_id]
        track.class_name, track.last_seen = box.class_name, now
        track.anchor, track.height, track.box = box.anchor, box.height, box.xyxy
        ground = (self.config.homography.to_world(np.asarray([box.anchor]))[0]
                  if self.config.homography is not None else box.anchor)
        track.history.append((now, float(ground[0]), float(ground[1])))
        while track.history and track.history[0][0] < now - HISTORY_S:
            track.history.popleft()
        track.trail.append((now, box.anchor[0], box.anchor[1]))
        while track.trail and track.trail[0][0] < now - TRAIL_S:
            track.trail.popleft()
        band = max(MIN_BAND_PX, BAND_FRACTION * box.height)
        if first:
            self._inherit(track, band)
        for line in self.config.lines:
            self._line(track, line, band, now, out)
        self._zones_at(track, box.anchor, band, now, out, first=first and not replayed)

    def _zones_at(self, track: _Track, point: tuple[float, float], band: float, now: float,
                  out: FrameTraffic, *, first: bool) -> None:
        """The track's zone entries and exits with its counting point at ``point``."""
        for zone in self.config.zones:
            dist = cv2.pointPolygonTest(self._contours[zone.name], point, True)
            if zone.name not in track.inside:
                if dist >= band or (first and dist >= 0):
                    track.inside[zone.name] = now
                    out.entries.append(ZoneEntry(zone.name, track.class_name, track.track_id,
                                                 self.config.pcu_of(track.class_name)))
            elif dist <= -band:
                entered = track.inside.pop(zone.name)
                out.exits.append(ZoneExit(zone.name, track.track_id, now - entered))

    def _line(self, track: _Track, line: CountingLine, band: float, now: float,
              out: FrameTraffic) -> None:
        d = _signed_distance(line, track.anchor)
        side = 1 if d > band else -1 if d < -band else 0
        if side == 0:
            return
        previous = track.sides.get(line.name)
        before = track.side_points.get(line.name)
        from_past = line.name in track.past_sides
        track.past_sides.discard(line.name)
        track.sides[line.name], track.side_points[line.name] = side, track.anchor
        if previous is None or previous == side or line.name in track.counted:
            return
        if before is None or not _meets_segment(line, before, track.anchor):
            return
        if from_past and self._counted_twin(track, line.name, now):
            return
        track.counted.add(line.name)
        track.counted_at[line.name] = now
        key = "in" if side > 0 else "out"
        label = line.in_label if key == "in" else line.out_label
        speed = None
        if self.config.homography is not None:
            recent = [s for s in track.history if s[0] >= now - SPEED_WINDOW_S]
            mps = _velocity(recent)
            speed = None if mps is None else round(mps * 3.6, 1)
        wrong = line.allowed != "both" and key != line.allowed
        out.crossings.append(Crossing(line.name, label, track.class_name, track.track_id, now,
                                      speed, self.config.pcu_of(track.class_name), wrong))
        if wrong:
            out.events.append(TrafficEvent(
                "wrong_way", now, f"{track.class_name} #{track.track_id} crossed {line.name} "
                f"{label}, against its allowed direction", line=line.name,
                track_id=track.track_id, class_name=track.class_name))

    def _prehistory(self, box: TrackedBox) -> list[TrackedBox]:
        """The unconfirmed boxes that were ``box``'s track before it was confirmed, oldest
        first: walking back one frame at a time, the box overlapping the later one most (IoU
        at least the tracker's ``min_iou``, height within a factor of 1.5). Stops at the first
        frame with none (the track's first frame, or a box the walk cannot tell)."""
        chain: list[TrackedBox] = []
        later = box
        for frame in reversed(self._unconfirmed):
            best, best_iou = None, self.tracker.settings.min_iou
            for cand in frame:
                ratio = cand.height / later.height if later.height > 0 else 0.0
                if not 1 / 1.5 <= ratio <= 1.5:
                    continue
                iou = box_iou(cand.xyxy, later.xyxy)
                if iou >= best_iou:
                    best, best_iou = cand, iou
            if best is None:
                break
            frame.remove(best)  # one track's past, not two
            chain.append(best)
            later = best
        return chain[::-1]

    def _counted_twin(self, track: _Track, line: str, now: float) -> bool:
        """Whether another track that counted on ``line`` within ``TWIN_WINDOW_S`` overlaps
        ``track`` now (IoU ≥ ``TWIN_MIN_IOU``): the same vehicle detected twice (a weak
        detector's second, partial box), whose second track's unconfirmed past would count
        it again."""
        return any(other is not track and now - other.counted_at.get(line, -math.inf)
                   <= TWIN_WINDOW_S and box_iou(other.box, track.box) >= TWIN_MIN_IOU
                   for other in self._tracks.values())

    def _start_sides(self, track: _Track, before: list[TrackedBox]) -> None:
        """A new track's side of each line, from its earliest unconfirmed box that stood on a
        firm side (``_line`` then counts the crossing if the track is now on the other)."""
        for line in self.config.lines:
            for past in before:
                band = max(MIN_BAND_PX, BAND_FRACTION * past.height)
                d = _signed_distance(line, past.anchor)
                if abs(d) > band:
                    track.sides[line.name] = 1 if d > 0 else -1
                    track.side_points[line.name] = past.anchor
                    track.past_sides.add(line.name)
                    break

    def _remember(self, track: _Track) -> None:
        """Keep a lost track's firm, uncounted sides for a successor (see the docstring)."""
        sides = {name: (side, track.side_points[name]) for name, side in track.sides.items()
                 if name not in track.counted}
        if sides:
            self._lost.append(_Lost(track.last_seen, track.anchor, track.size, sides))

    def _inherit(self, track: _Track, band: float) -> None:
        """A new track born inside a line's band takes the side of the nearest recently lost
        track near enough to be the same vehicle (each lost side is handed on once)."""
        for line in self.config.lines:
            if line.name in track.sides:
                continue  # its own unconfirmed boxes stood on a firm side: that is the truth
            if abs(_signed_distance(line, track.anchor)) > band:
                continue  # born on a firm side: its own side is the truth
            near = [(math.dist(x.anchor, track.anchor), i) for i, x in enumerate(self._lost)
                    if line.name in x.sides and math.dist(x.anchor, track.anchor) <= x.size]
            if near:
                lost = self._lost[min(near)[1]]
                side, point = lost.sides.pop(line.name)
                track.sides[line.name], track.side_points[line.name] = side, point

    def _finish(self, track: _Track, out: FrameTraffic) -> None:
        for zone, entered in track.inside.items():
            out.exits.append(ZoneExit(zone, track.track_id, track.last_seen - entered))
        track.inside.clear()

    # ------------------------------------------------------------------ zones and events
    def _zone_states(self, now: float, out: FrameTraffic) -> None:
        rules = self.config.events
        for zone in self.config.zones:
            occupancy = sum(zone.name in t.inside for t in self._tracks.values()) \
                + sum(zone.name in c.inside for c in self._carried)
            state, _ = self._density[zone.name].update(occupancy)
            out.zones.append(ZoneState(zone.name, occupancy, state))
            if state == DensityState.JAM:
                since = self._jam_since.setdefault(zone.name, now)
                if now - since >= rules.jam_min_s and zone.name not in self._jam_reported:
                    self._jam_reported.add(zone.name)
                    out.events.append(TrafficEvent(
                        "jam", now, f"zone {zone.name} jammed for {now - since:.0f} s",
                        zone=zone.name, duration_s=round(now - since, 1)))
            elif zone.name in self._jam_since:
                self._clear_jam(zone.name, now, out, "flows again")

    def _clear_jam(self, zone: str, now: float, out: FrameTraffic, why: str) -> None:
        """End the zone's jam timer; a ``jam_cleared`` if its jam was reported."""
        since = self._jam_since.pop(zone, now)
        if zone in self._jam_reported:
            self._jam_reported.discard(zone)
            out.events.append(TrafficEvent(
                "jam_cleared", now, f"zone {zone} {why} after {now - since:.0f} s of jam",
                zone=zone, duration_s=round(now - since, 1)))

    def _standing(self, now: float, visible: set[int], out: FrameTraffic) -> None:
        rules = self.config.events
        congested = {z.zone for z in out.zones if z.state >= DensityState.HEAVY}
        for tid in visible:
            track = self._tracks.get(tid)
            if track is None or not track.inside:  # only vehicles on the road's zones
                continue
            recent = [s for s in track.history if s[0] >= now - STOP_WINDOW_S]
            per_s = _velocity(recent) if recent and now - recent[0][0] >= 0.9 * STOP_WINDOW_S \
                else None
            if per_s is None:
                continue
            mps = per_s if self.config.homography is not None else (
                per_s / max(track.height, 1.0) * ASSUMED_VEHICLE_HEIGHT_M)
            if mps * 3.6 >= rules.stopped_speed_kmh:
                track.stopped_since = None
                continue
            if track.stopped_since is None:
                track.stopped_since = recent[0][0]
            standing = now - track.stopped_since
            if standing >= rules.stopped_min_s and not track.stopped_reported \
                    and not set(track.inside) <= congested:
                track.stopped_reported = True
                out.events.append(TrafficEvent(
                    "stopped_vehicle", now, f"{track.class_name} #{tid} standing for "
                    f"{standing:.0f} s", zone=next(iter(sorted(track.inside)), None),
                    track_id=tid, class_name=track.class_name, duration_s=round(standing, 1)))


__all__ = [
    "Crossing",
    "FrameTraffic",
    "TrafficCounter",
    "TrafficEvent",
    "ZoneEntry",
    "ZoneExit",
    "ZoneState",
]
