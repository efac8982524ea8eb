"""The agent's traffic stage: the geometry in force → tracker + counter → interval records.

``process`` runs on the frame loop after the detector; ``commit`` folds the frame in once the
agent knows whether the frame was sampled (an event's frame is forced into the upload so the
operator sees what happened: ``REASON_TRAFFIC_EVENT``).

Mid-run changes: the counting state (the ``TrafficCounter``: tracks, lines' sides, zones'
entry times, jam and standing timers) is kept apart from the *segment* (the
``IntervalAccumulator`` whose records carry ``config_version``, ``model_version`` and the
``segment_ms`` of their ``record_id``). Any change of configuration version, model version
or stream size closes the running segment — its partial records are returned — and starts a
new one, so every record says which configuration and which detector its counts come from
and no record mixes two; the new segment counts the gap from the old one's last frame as
watched time (``covered_s``), so changes lose none. The counter goes on across the change
when its geometry (lines, zones, homography at the stream's size) is the same by value
(``retune``: new PCU weights, event rules, interval or detector vocabulary); otherwise a
counter for the new geometry takes
over what is in progress (``TrafficCounter.hand_over``): a vehicle standing on a line still
counts once when it drives off, one standing in a zone keeps its entry, a reported jam or
standing vehicle is not reported again. A geometry that goes away or does not fit the stream
stops counting (``close``: live tracks leave their zones, a reported jam is cleared).

Crashes: the interval in progress lives in memory until it closes. Every ``checkpoint_s``
the stage writes it, as the record it would be if closed then, to ``checkpoint_path``
(atomically). After a crash the agent queues that file's record (``recover_checkpoint``):
the crashed run's counts up to the checkpoint are kept, and since the record has the id the
closed record would have had, a record already queued before the crash is not queued again.
A crash loses at most ``checkpoint_s`` of counts, and never counts twice.

Clock: the counter runs on the stream's clock (``Frame.stream_time``: a file's media time, a
live camera's monotonic read time), which never steps back, so tracking and speeds survive
a wall-clock correction. Records and events are stamped on the wall clock: a live frame's
``captured_at`` (an NTP step back starts a new segment of records: ``intervals``), a file's
``origin + stream_time`` (the origin taken at the first frame), so a video read faster than
real time still yields one record per minute of video. A file's stamps run ahead of the
clock then; the gateway refuses records more than a day ahead, so once a frame would be
stamped more than ``MAX_MEDIA_AHEAD_S`` (10 h) past its read time the origin is re-based to
that read time: a step back, so a new segment whose records sum with the earlier ones of the
same minutes (every vehicle counted once, none refused; the minutes of video past 10 h fold
onto wall minutes already stamped). Checkpoints are timed on the stream clock, so a step
back does not hold them off.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from edge_agent.fsutil import write_text_atomic
from edge_agent.traffic.counter import TrafficCounter
from edge_agent.traffic.events import FrameTraffic
from edge_agent.traffic.geometry import TrafficConfig
from edge_agent.traffic.intervals import IntervalAccumulator
from edge_agent.traffic.tracking import TrackerSettings

logger = logging.getLogger(__name__)

REASON_TRAFFIC_EVENT = "traffic_event"
CHECKPOINT_FILE = "traffic_checkpoint.json"


class _Frame(Protocol):
    @property
    def stream_time(self) -> float: ...

    captured_at: float
    image: Any


# How far a stream's aspect ratio may differ from the geometry's frame_size before the
# geometry is taken for another view. Same-view sizes differ by rounding and codec padding
# (1920x1080 vs 1920x1088: 0.7 %; 640x360 vs 640x352: 2.3 %); a crop or a rotation is far
# beyond (16:9 vs 4:3: 25 %).
MAX_ASPECT_MISMATCH = 0.05
# How far ahead of the agent's clock a file's records may be stamped (``wall_time``). The
# gateway refuses a time more than a day ahead of its clock (``CLOCK_SKEW`` in
# fleet/bounds.py), a bound sized for a device clock up to 14 h fast; 24 h - 14 h = 10 h
# keeps a file's records accepted even from such a device, and a file read at 10x real
# time re-bases only every ~1.1 h of reading.
MAX_MEDIA_AHEAD_S = 10 * 3600.0


def geometry_misfit(geometry: TrafficConfig, config_version: int, width: int,
                    height: int) -> dict[str, Any] | None:
    """``{version, reason}`` when ``geometry`` was drawn for a view of another shape than a
    ``width x height`` stream, else None. Coordinates scale per axis (``scaled_to``), which
    is right for the same view at another resolution and wrong for anything else: lines
    land on other lanes and a stretched homography gives wrong speeds (a 1280x720 geometry
    on a 1280x320 crop measured 166 km/h for ~90 km/h traffic), so counting is better off."""
    w0, h0 = geometry.frame_size
    ratio = (width / height) / (w0 / h0)
    if abs(ratio - 1.0) <= MAX_ASPECT_MISMATCH:
        return None
    return {"version": config_version,
            "reason": f"the traffic geometry was drawn on {w0}x{h0} frames (aspect "
                      f"{w0 / h0:.2f}) but the stream is {width}x{height} ({width / height:.2f}): "
                      "another view; counting is off until a geometry for this view is applied"}


class TrafficStage:
    def __init__(self, camera_id: str, *, tracker: TrackerSettings | None = None,
                 checkpoint_path: Path | None = None, checkpoint_s: float = 10.0) -> None:
        self.camera_id = camera_id
        self.tracker_settings = tracker
        self.checkpoint_path = checkpoint_path
        self.checkpoint_s = checkpoint_s
        self._checkpointed_at: float | None = None
        self._geometry: TrafficConfig | None = None  # the geometry in force, as given
        self._key: tuple[int, str, int, int] | None = None  # config, model version; w, h
        self._counter: TrafficCounter | None = None
        self._intervals: IntervalAccumulator | None = None
        self._origin: float | None = None
        self._pending: list[dict[str, Any]] = []
        self.crossings_total = 0
        self.events_total = 0
        # {version, reason} while the geometry in force does not fit the stream (heartbeats
        # carry it as ``traffic_error``); None when it fits or there is none.
        self.error: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self._counter is not None

    def wall_time(self, frame: _Frame) -> float:
        """The wall time the frame's counts belong to (see the module docstring). A frame
        that does not say it is live (``is_live``) is timed as media: ``origin +
        stream_time``, but never more than ``MAX_MEDIA_AHEAD_S`` past its read time; a
        frame that would be is stamped at its read time (the origin re-based), which the
        intervals take for a clock step back: a new segment."""
        if getattr(frame, "is_live", False):
            return frame.captured_at
        if self._origin is None:
            self._origin = frame.captured_at - frame.stream_time
        wall = self._origin + frame.stream_time
        if wall > frame.captured_at + MAX_MEDIA_AHEAD_S:
            self._origin = frame.captured_at - frame.stream_time
            logger.info("traffic records of this file reached %.0f h ahead of the clock: "
                        "re-based to now (a new segment)", MAX_MEDIA_AHEAD_S / 3600)
            wall = frame.captured_at
        return wall

    def process(self, detections: Sequence, frame: _Frame, geometry: TrafficConfig | None,
                config_version: int, class_names: Sequence[str], model_version: str
                ) -> FrameTraffic | None:
        """Track and count this frame; None when the camera has no traffic geometry."""
        h, w = frame.image.shape[:2]
        key = (config_version, model_version, w, h)
        if geometry is not self._geometry or key != self._key:
            self._reconfigure(geometry, key, class_names, frame)
        if self._counter is None or self.error is not None:
            return None
        return self._counter.update(detections, frame.stream_time)

    def _reconfigure(self, geometry: TrafficConfig | None, key: tuple[int, str, int, int],
                     class_names: Sequence[str], frame: _Frame) -> None:
        """A new geometry object, configuration version, model or stream size (see the
        module docstring)."""
        same = geometry is self._geometry or (
            geometry is not None and self._geometry is not None and geometry == self._geometry)
        changed = not same or key != self._key
        self._geometry = geometry
        if not changed:  # the same section parsed again: nothing changes
            return
        version, model_version, w, h = key
        new_model = self._key is not None and key[1] != self._key[1]
        self._key = key
        self.error = None if geometry is None else geometry_misfit(geometry, version, w, h)
        if geometry is None or self.error is not None:
            self._pending.extend(self._close_segment())
            if self.error is not None:
                logger.error("traffic counting off: %s", self.error["reason"])
            return
        scaled = geometry.scaled_to(w, h)
        old, ended = self._counter, None
        if old is None:
            counter = TrafficCounter(scaled, class_names, tracker=self.tracker_settings)
        elif old.same_counting(scaled):
            counter = old
            counter.retune(scaled, class_names, new_model=new_model)
        else:
            counter, ended = old.hand_over(scaled, class_names, tracker=self.tracker_settings)
        # The segment ends here but watching goes on: the new one counts the gap from the
        # old one's last frame (none when counting was off: no accumulator then).
        last_stream = self._intervals.last_stream_time if self._intervals is not None else None
        self._pending.extend(self._close_records(ended))
        self._counter = counter
        self._intervals = IntervalAccumulator(
            self.camera_id, interval_s=scaled.interval_s, zones=[z.name for z in scaled.zones],
            segment_started_at=self.wall_time(frame), config_version=version,
            model_version=model_version, last_stream_time=last_stream)
        logger.info("traffic counting %s: %d line(s), %d zone(s)%s, %ds intervals "
                    "(configuration version %d, model %s)",
                    "on" if old is None else "goes on" if counter is old else "moves on",
                    len(scaled.lines), len(scaled.zones),
                    ", speeds" if scaled.homography is not None else "", scaled.interval_s,
                    version, model_version)

    def commit(self, traffic: FrameTraffic | None, frame: _Frame,
               frame_id: str | None) -> list[dict[str, Any]]:
        """Fold the frame's traffic into its interval; returns every record closed so far."""
        records, self._pending = self._pending, []
        if traffic is not None and self._intervals is not None:
            self.crossings_total += len(traffic.crossings)
            self.events_total += len(traffic.events)
            wall = self.wall_time(frame)
            records.extend(self._intervals.add(
                traffic, wall, stream_time_to_wall=wall - frame.stream_time,
                frame_id=frame_id if traffic.events else None))
            if self.checkpoint_path is not None:
                now = frame.stream_time
                if records:  # the file keeps their snapshot until the agent has queued them
                    self._checkpointed_at = None
                elif self._checkpointed_at is None \
                        or now - self._checkpointed_at >= self.checkpoint_s:
                    self._checkpoint(now)
        return records

    # ------------------------------------------------------------------ crash safety
    def _checkpoint(self, now: float) -> None:
        snapshot = self._intervals.snapshot() if self._intervals is not None else None
        self._checkpointed_at = now
        try:
            if snapshot is None:
                self.checkpoint_path.unlink(missing_ok=True)
            else:
                write_text_atomic(self.checkpoint_path, json.dumps(snapshot, allow_nan=False))
        except OSError as exc:  # counting goes on; only crash safety is reduced
            logger.error("traffic checkpoint %s not written: %s", self.checkpoint_path, exc)

    def clear_checkpoint(self) -> None:
        """After a clean stop, once the last records are queued."""
        if self.checkpoint_path is not None:
            self.checkpoint_path.unlink(missing_ok=True)

    @staticmethod
    def recover_checkpoint(path: Path) -> dict[str, Any] | None:
        """The record a crashed run left in ``path`` (None when it stopped cleanly or the file
        is unusable: logged)."""
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("record_id"), str):
                raise ValueError("not an interval record")  # noqa: TRY004
        except (OSError, ValueError) as exc:
            logger.error("ignoring the traffic checkpoint %s: %s", path, exc)
            return None
        return record

    def close(self) -> list[dict[str, Any]]:
        """End of the stream: the running segment's last (partial) record(s)."""
        records, self._pending = self._pending + self._close_segment(), []
        self._key = self._geometry = None
        return records

    def _close_segment(self) -> list[dict[str, Any]]:
        """Counting stops: the counter closes (live tracks leave their zones, a reported jam
        is cleared) and the segment's last records are returned."""
        last = self._counter.close() if self._counter is not None else None
        self._counter = None
        return self._close_records(last)

    def _close_records(self, last: FrameTraffic | None) -> list[dict[str, Any]]:
        """The running segment's last records, with ``last`` (what ended with it) folded in."""
        intervals, self._intervals = self._intervals, None
        if intervals is None:
            return []
        if last is not None and intervals.last_wall_time is not None:
            self.events_total += len(last.events)
            intervals.add(last, intervals.last_wall_time, is_frame=False)
        return intervals.close()


__all__ = ["REASON_TRAFFIC_EVENT", "TrafficStage"]
