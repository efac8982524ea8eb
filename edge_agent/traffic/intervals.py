"""Per-frame traffic summed into one record per camera and interval (``docs/traffic.md``).

Intervals are aligned to the agent's wall clock (UTC multiples of ``interval_s``, 60 s by
default). A record is closed when the first frame of a later interval arrives, or by
``close()`` when the stream ends or the geometry changes (then it covers only part of the
interval: ``covered_s``). Its ``record_id`` is ``camera.interval_start.segment_ms``, where a
*segment* is one run of one geometry: a restart or a new configuration in the middle of a
minute yields a second record for that minute, over the seconds the first did not cover, and
the gateway sums them; the same record sent twice (a retry, a restart before its
acknowledgement) has the same id and is stored once. Nothing is counted twice.

The wall clock can step back (an NTP correction on a live camera). A frame whose interval
starts before the running one would reopen a minute whose record is already closed, under
the same id: the gateway would refuse the second record as a duplicate and its counts would
be lost. Such a frame closes the running interval and starts a new segment (a new
``segment_ms``), so the minute gets a second record with its own id, and the two sum.

``covered_s`` is watched time: the sum of the gaps between consecutive frames, each capped
at ``MAX_FRAME_GAP_S`` (a stalled source is not watching), measured on the stream's clock
(monotonic for a live camera, so a clock step is neither watched nor lost time). The
occupancy mean and the seconds per density state are weighted by the same gaps, so they
are means over the watched time. A segment that follows another on the same stream (a
mid-run change: ``last_stream_time``) counts the gap from the other's last frame to its own
first, so a change loses no watched time; the first segment's first frame adds none.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from edge_agent.counting import DensityState
from edge_agent.traffic.events import FrameTraffic, TrafficEvent, ZoneState

MAX_FRAME_GAP_S = 5.0  # a longer gap (a stalled source) is not watched time
MAX_EVENTS = 200


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


class _Interval:
    def __init__(self, start: int) -> None:
        self.start = start
        self.covered = 0.0  # watched seconds: the sum of the capped frame gaps
        self.frames = 0
        self.lines: dict[tuple[str, str, str], list[Any]] = {}  # -> [count, pcu, speeds]
        self.entries: dict[str, Counter[str]] = defaultdict(Counter)
        self.exits: Counter[str] = Counter()
        self.dwell: dict[str, list[float]] = defaultdict(list)
        self.pcu_in: dict[str, float] = defaultdict(float)
        self.occupancy_s: dict[str, float] = defaultdict(float)  # occupancy × seconds
        self.occupancy_max: dict[str, int] = defaultdict(int)
        self.state_s: dict[str, dict[str, float]] = {}
        self.state: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []

    def watch(self, zones: list[ZoneState], dt: float) -> None:
        """``dt`` more seconds watched, in the zone states the frame ending them shows."""
        self.covered += dt
        for z in zones:
            self.occupancy_s[z.zone] += z.occupancy * dt
            states = self.state_s.setdefault(z.zone, {s.label: 0.0 for s in DensityState})
            states[z.state.label] += dt


class IntervalAccumulator:
    """``add(frame, wall_time, frame_id)`` → the records closed by this frame."""

    def __init__(self, camera_id: str, *, interval_s: int, zones: list[str],
                 segment_started_at: float, config_version: int, model_version: str,
                 last_stream_time: float | None = None) -> None:
        """``last_stream_time``: the stream time of the previous segment's last frame when
        this segment goes on watching the same stream (a mid-run change), so the gap from
        that frame to this segment's first is watched time, counted here; None: the first
        frame adds none."""
        self.camera_id = camera_id
        self.interval_s = int(interval_s)
        self.zones = list(zones)
        self.segment_ms = int(segment_started_at * 1000)
        self.config_version = config_version
        self.model_version = model_version
        self._segments = {self.segment_ms}
        self._current: _Interval | None = None
        self._last_wall: float | None = None
        self._last_stream: float | None = last_stream_time
        self._event_seq = 0

    def _start_of(self, wall_time: float) -> int:
        return int(math.floor(wall_time / self.interval_s) * self.interval_s)

    @property
    def last_wall_time(self) -> float | None:
        return self._last_wall

    @property
    def last_stream_time(self) -> float | None:
        """The stream time of the last frame folded in (or the one given at the start)."""
        return self._last_stream

    def _new_segment(self, wall_time: float) -> None:
        """A new segment id from ``wall_time``, never one this accumulator used before."""
        ms = int(wall_time * 1000)
        while ms in self._segments:
            ms += 1
        self._segments.add(ms)
        self.segment_ms = ms

    def add(self, frame: FrameTraffic, wall_time: float, stream_time_to_wall: float = 0.0,
            frame_id: str | None = None, *, is_frame: bool = True) -> list[dict[str, Any]]:
        """Fold one frame in. ``stream_time_to_wall`` converts the counter's stream times
        (event times) to wall time (``wall_time - stream_time_to_wall`` is the frame's stream
        time, which times the gaps); ``frame_id`` is the frame sampled for upload, if any;
        ``is_frame=False`` folds what the counter reported without a frame (its close: no
        time passes)."""
        closed: list[dict[str, Any]] = []
        stream = wall_time - stream_time_to_wall
        dt = 0.0
        if is_frame and self._last_stream is not None:
            dt = min(max(stream - self._last_stream, 0.0), MAX_FRAME_GAP_S)
        start = self._start_of(wall_time)
        cur = self._current
        if cur is not None and start != cur.start:
            if start > cur.start:  # the gap's part up to the boundary was the old interval's
                head = min(dt, max(cur.start + self.interval_s - (self._last_wall or 0.0), 0.0))
                cur.watch(frame.zones, head)
                dt -= head
                closed.append(self._record(cur))
            else:  # the wall clock went back: that interval's record may be closed already
                closed.append(self._record(cur))
                self._new_segment(wall_time)
            cur = None
        if cur is None:
            cur = self._current = _Interval(start)
        if is_frame:
            self._last_wall, self._last_stream = wall_time, stream
        cur.frames += int(is_frame)
        cur.watch(frame.zones, dt)
        for c in frame.crossings:
            row = cur.lines.setdefault((c.line, c.direction, c.class_name), [0, 0.0, []])
            row[0] += 1
            row[1] += c.pcu
            if c.speed_kmh is not None and math.isfinite(c.speed_kmh):
                row[2].append(min(max(float(c.speed_kmh), 0.0), 400.0))
        for e in frame.entries:
            cur.entries[e.zone][e.class_name] += 1
            cur.pcu_in[e.zone] += e.pcu
        for x in frame.exits:
            cur.exits[x.zone] += 1
            cur.dwell[x.zone].append(round(max(x.dwell_s, 0.0), 2))
        for z in frame.zones:
            cur.occupancy_max[z.zone] = max(cur.occupancy_max[z.zone], z.occupancy)
            cur.state[z.zone] = z.state.label
        for ev in frame.events:
            if len(cur.events) < MAX_EVENTS:
                cur.events.append(self._event(ev, stream_time_to_wall, frame_id))
        return closed

    def snapshot(self) -> dict[str, Any] | None:
        """The interval in progress as the record it would be if closed now (kept on disk
        by the agent so a crash loses only what came after the snapshot)."""
        cur = self._current
        return self._record(cur) if cur is not None and cur.frames else None

    def close(self) -> list[dict[str, Any]]:
        """The interval in progress as a (partial) record; nothing when no frame came."""
        cur, self._current = self._current, None
        return [self._record(cur)] if cur is not None and cur.frames else []

    def _event(self, ev: TrafficEvent, offset: float, frame_id: str | None) -> dict[str, Any]:
        self._event_seq += 1
        return {
            "event_id": f"{self.camera_id}.ev.{self.segment_ms}.{self._event_seq}",
            "kind": ev.kind,
            "at": _iso(ev.stream_time + offset),
            "zone": ev.zone,
            "line": ev.line,
            "track_id": ev.track_id,
            "class_name": ev.class_name,
            "duration_s": ev.duration_s,
            "frame_id": frame_id,
            "detail": ev.detail[:500],
        }

    def _record(self, cur: _Interval) -> dict[str, Any]:
        covered = min(cur.covered, float(self.interval_s))
        zones = []
        for name in self.zones:
            if name not in cur.state_s and not cur.entries.get(name) and not cur.exits[name]:
                continue
            zones.append({
                "zone": name,
                "entries": dict(cur.entries.get(name, {})),
                "exits": cur.exits[name],
                "dwell_s": cur.dwell.get(name, [])[:1000],
                "occupancy_mean": round(cur.occupancy_s[name] / covered, 4) if covered else 0.0,
                "occupancy_max": cur.occupancy_max[name],
                "pcu_in": round(cur.pcu_in[name], 3),
                "state": cur.state.get(name, DensityState.NORMAL.label),
                "state_s": {k: round(v, 3) for k, v in cur.state_s.get(
                    name, {s.label: 0.0 for s in DensityState}).items()},
            })
        return {
            "record_id": f"{self.camera_id}.{cur.start}.{self.segment_ms}",
            "camera_id": self.camera_id,
            "interval_start": _iso(cur.start),
            "interval_s": self.interval_s,
            "covered_s": round(covered, 3),
            "frames": cur.frames,
            "config_version": self.config_version,
            "model_version": self.model_version,
            "lines": [
                {"line": line, "direction": direction, "class_name": cls, "count": row[0],
                 "pcu": round(row[1], 3), "speeds_kmh": row[2][:1000]}
                for (line, direction, cls), row in sorted(cur.lines.items())
            ],
            "zones": zones,
            "events": cur.events,
        }


__all__ = ["IntervalAccumulator"]
