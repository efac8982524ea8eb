"""Rollups of traffic interval records (docs/traffic.md; the record format is the spec's §2).

Framework-free: the gateway's aggregated endpoints and the daily report both call these.
Records are plain dicts as posted by the agents (extra keys such as ``received_at`` are
ignored). Several records of one camera and interval (one per agent run) SUM; a record seen
twice (same ``record_id``) counts once.

Buckets are aligned to UTC multiples of ``bucket_s`` (which must be a multiple of 60 that
divides a day); a record falls in the bucket that holds its ``interval_start``. A bucket must
hold whole records: a record's counts are not spread over its interval, so a 60 s bucket
over 900 s records would put all of a record's vehicles in one minute and read its 900 s of
traffic as one minute's flow (15 times the truth). Every record's ``interval_s`` must divide
``bucket_s``; otherwise the rollup refuses (``ValueError``, a 422 at the gateway) rather than
answer something that looks finer than the data is (``check_intervals``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

DAY_S = 86400
# Density states, least to most congested.
STATES: tuple[str, ...] = ("normal", "warning", "heavy", "jam")
_RANK = {state: rank for rank, state in enumerate(STATES)}

Record = Mapping[str, Any]


# --------------------------------------------------------------------------- time


def check_bucket(bucket_s: int) -> int:
    """``bucket_s`` itself when it is a whole number of minutes that divides a day."""
    if isinstance(bucket_s, bool) or not isinstance(bucket_s, int | np.integer):
        # ValueError, not TypeError: callers map one error type to a 422 / a clear message
        raise ValueError(  # noqa: TRY004
            f"bucket_s must be an integer number of seconds, got {bucket_s!r}"
        )
    bucket_s = int(bucket_s)
    if bucket_s <= 0 or bucket_s % 60 or DAY_S % bucket_s:
        raise ValueError(
            f"bucket_s must be a positive multiple of 60 that divides 86400, got {bucket_s}"
        )
    return bucket_s


def check_intervals(records: Iterable[Record], bucket_s: int) -> None:
    """Refuse (``ValueError``) a ``bucket_s`` that does not hold whole records: one that is
    shorter than, or not a multiple of, some record's ``interval_s`` (module docstring)."""
    for record in records:
        interval = record.get("interval_s")
        if interval and bucket_s % int(interval):
            raise ValueError(
                f"bucket_s {bucket_s} does not hold whole records: camera "
                f"{record.get('camera_id')} sent {int(interval)} s intervals (record "
                f"{record.get('record_id')}), whose counts cannot be split into shorter "
                f"buckets; ask for a bucket_s that is a multiple of {int(interval)}")


def fitting_bucket(records: Iterable[Record], bucket_s: int) -> int:
    """The smallest multiple of ``bucket_s`` that holds whole records of every interval in
    ``records`` (``bucket_s`` itself for the agents' 60, 300 and 900 s intervals and a
    bucket of 900 s or more): for a report that must be drawn whatever was sent."""
    out = check_bucket(bucket_s)
    for record in records:
        interval = record.get("interval_s")
        if interval:
            out = math.lcm(out, int(interval))
    return check_bucket(out)


def unfitting_cameras(records: Iterable[Record], bucket_s: int, *, widen: bool = False
                      ) -> dict[str, int]:
    """The cameras whose records do not fit ``bucket_s``, each with the first ``interval_s``
    that does not: one camera's records must not stop the answer for every camera.

    ``widen=False``: the interval must divide ``bucket_s`` (``check_intervals``, the gateway's
    queries); ``widen=True``: the camera's intervals and ``bucket_s`` must have a least
    common multiple that tiles a day (``fitting_bucket``, the daily report)."""
    bucket_s = check_bucket(bucket_s)
    widened: dict[str, int] = {}
    out: dict[str, int] = {}
    for record in records:
        cam = record["camera_id"]
        interval = record.get("interval_s")
        if not interval or cam in out:
            continue
        interval = int(interval)
        if widen:
            widened[cam] = math.lcm(widened.get(cam, bucket_s), interval)
            if DAY_S % widened[cam]:
                out[cam] = interval
        elif bucket_s % interval:
            out[cam] = interval
    return out


def parse_time(value: str | datetime) -> datetime:
    """An aware UTC datetime from an ISO-8601 string or a datetime (naive means UTC)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def bucket_start(moment: str | datetime, bucket_s: int) -> datetime:
    """Start of the UTC-aligned bucket of ``bucket_s`` seconds holding ``moment``."""
    ts = parse_time(moment).timestamp()
    return datetime.fromtimestamp(int(ts // bucket_s) * bucket_s, tz=UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def unique_records(records: Iterable[Record]) -> Iterator[Record]:
    """``records`` with each ``record_id`` once (the first): a resend counts once."""
    seen: set[str] = set()
    for record in records:
        record_id = record.get("record_id")
        if record_id is not None:
            if record_id in seen:
                continue
            seen.add(record_id)
        yield record


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def _serialise(obj: Any) -> dict[str, Any]:
    out = asdict(obj)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
    return out


# --------------------------------------------------------------------------- lines


@dataclass(frozen=True)
class LineVolume:
    """Vehicles of one class crossing one line in one direction during one bucket."""

    camera_id: str
    bucket_start: datetime
    line: str
    direction: str
    class_name: str
    count: int
    pcu: float
    speed_median_kmh: float | None
    speed_p85_kmh: float | None
    speeds_n: int

    def to_dict(self) -> dict[str, Any]:
        return _serialise(self)


def line_volumes(
    records: Iterable[Record],
    bucket_s: int = 900,
    *,
    camera_id: str | None = None,
    line: str | None = None,
    direction: str | None = None,
    class_name: str | None = None,
) -> list[LineVolume]:
    """Counts, PCU and speed median / 85th percentile (``np.percentile`` over the pooled
    speeds; None when there are none) per camera, bucket, line, direction and class.

    Ordered by bucket, camera, line, direction, class.
    """
    bucket_s = check_bucket(bucket_s)
    records = list(unique_records(records))
    check_intervals((r for r in records if camera_id in (None, r["camera_id"])), bucket_s)
    counts: dict[tuple, int] = defaultdict(int)
    pcus: dict[tuple, float] = defaultdict(float)
    speeds: dict[tuple, list[float]] = defaultdict(list)
    for record in records:
        cam = record["camera_id"]
        if camera_id is not None and cam != camera_id:
            continue
        start = bucket_start(record["interval_start"], bucket_s)
        for row in record.get("lines") or ():
            if line is not None and row["line"] != line:
                continue
            if direction is not None and row["direction"] != direction:
                continue
            if class_name is not None and row["class_name"] != class_name:
                continue
            key = (start, cam, row["line"], row["direction"], row["class_name"])
            counts[key] += int(row["count"])
            pcus[key] += float(row.get("pcu") or 0.0)
            speeds[key].extend(float(s) for s in row.get("speeds_kmh") or ())
    return [
        LineVolume(
            camera_id=key[1],
            bucket_start=key[0],
            line=key[2],
            direction=key[3],
            class_name=key[4],
            count=counts[key],
            pcu=round(pcus[key], 6),
            speed_median_kmh=_percentile(speeds[key], 50),
            speed_p85_kmh=_percentile(speeds[key], 85),
            speeds_n=len(speeds[key]),
        )
        for key in sorted(counts)
    ]


def coverage(
    records: Iterable[Record], bucket_s: int = 900, *, camera_id: str | None = None
) -> dict[tuple[str, datetime], float]:
    """Seconds each camera watched in each bucket: the sum of its records' ``covered_s``,
    capped at ``bucket_s`` (two runs overlapping in a minute do not watch it twice)."""
    bucket_s = check_bucket(bucket_s)
    records = list(unique_records(records))
    check_intervals((r for r in records if camera_id in (None, r["camera_id"])), bucket_s)
    covered: dict[tuple[str, datetime], float] = defaultdict(float)
    for record in records:
        cam = record["camera_id"]
        if camera_id is not None and cam != camera_id:
            continue
        key = (cam, bucket_start(record["interval_start"], bucket_s))
        covered[key] += float(record.get("covered_s") or 0.0)
    return {key: min(value, float(bucket_s)) for key, value in covered.items()}


# --------------------------------------------------------------------------- zones


@dataclass(frozen=True)
class ZoneBucket:
    """One zone of one camera during one bucket.

    ``occupancy_mean`` is weighted by each record's ``covered_s`` (None when nothing was
    watched); ``covered_s`` is the time the zone was watched in the bucket (the ``covered_s``
    of the records that carry it: an agent reports every zone it watches in each record,
    capped at the bucket), and ``pcu_flow_per_h`` is ``pcu_in`` per hour of it — so a zone
    added or renamed by a configuration change mid-bucket is not diluted by the time before
    it existed, and filtering by zone does not change it.
    ``worst_state`` is the most congested state the zone spent time in (or ended an interval in).
    """

    camera_id: str
    bucket_start: datetime
    zone: str
    entries: dict[str, int]
    entries_total: int
    exits: int
    dwell_mean_s: float | None
    dwell_n: int
    occupancy_mean: float | None
    occupancy_max: float
    pcu_in: float
    pcu_flow_per_h: float | None
    covered_s: float
    state_s: dict[str, float] = field(default_factory=dict)
    worst_state: str = "normal"

    def to_dict(self) -> dict[str, Any]:
        return _serialise(self)


class _ZoneAcc:
    def __init__(self) -> None:
        self.entries: dict[str, int] = defaultdict(int)
        self.exits = 0
        self.dwell: list[float] = []
        self.occ_weighted = 0.0
        self.occ_weight = 0.0
        self.occ_max = 0.0
        self.pcu_in = 0.0
        self.state_s: dict[str, float] = {state: 0.0 for state in STATES}
        self.worst = 0


def _state_rank(state: Any) -> int:
    return _RANK.get(str(state), 0)


def zone_stats(
    records: Iterable[Record],
    bucket_s: int = 900,
    *,
    camera_id: str | None = None,
    zone: str | None = None,
) -> list[ZoneBucket]:
    """Per camera, bucket and zone: entries per class and in total, exits, mean dwell,
    occupancy (mean weighted by covered_s, max), PCU in and PCU flow per hour, seconds in each
    density state and the worst state. Ordered by bucket, camera, zone."""
    bucket_s = check_bucket(bucket_s)
    records = list(unique_records(records))
    check_intervals((r for r in records if camera_id in (None, r["camera_id"])), bucket_s)
    acc: dict[tuple[datetime, str, str], _ZoneAcc] = {}
    for record in records:
        cam = record["camera_id"]
        if camera_id is not None and cam != camera_id:
            continue
        start = bucket_start(record["interval_start"], bucket_s)
        weight = float(record.get("covered_s") or 0.0)
        for row in record.get("zones") or ():
            if zone is not None and row["zone"] != zone:
                continue
            a = acc.setdefault((start, cam, row["zone"]), _ZoneAcc())
            for cls, n in (row.get("entries") or {}).items():
                a.entries[cls] += int(n)
            a.exits += int(row.get("exits") or 0)
            a.dwell.extend(float(d) for d in row.get("dwell_s") or ())
            a.occ_weighted += float(row.get("occupancy_mean") or 0.0) * weight
            a.occ_weight += weight
            a.occ_max = max(a.occ_max, float(row.get("occupancy_max") or 0.0))
            a.pcu_in += float(row.get("pcu_in") or 0.0)
            for state, seconds in (row.get("state_s") or {}).items():
                if state in a.state_s:
                    a.state_s[state] += float(seconds)
                    if float(seconds) > 0:
                        a.worst = max(a.worst, _state_rank(state))
            a.worst = max(a.worst, _state_rank(row.get("state")))
    out = []
    for (start, cam, name), a in sorted(acc.items()):
        watched = min(a.occ_weight, float(bucket_s))  # the covered_s of its records
        out.append(
            ZoneBucket(
                camera_id=cam,
                bucket_start=start,
                zone=name,
                entries=dict(sorted(a.entries.items())),
                entries_total=sum(a.entries.values()),
                exits=a.exits,
                dwell_mean_s=float(np.mean(a.dwell)) if a.dwell else None,
                dwell_n=len(a.dwell),
                occupancy_mean=a.occ_weighted / a.occ_weight if a.occ_weight > 0 else None,
                occupancy_max=a.occ_max,
                pcu_in=round(a.pcu_in, 6),
                pcu_flow_per_h=a.pcu_in * 3600.0 / watched if watched > 0 else None,
                covered_s=watched,
                state_s=a.state_s,
                worst_state=STATES[a.worst],
            )
        )
    return out


# --------------------------------------------------------------------------- congestion


@dataclass(frozen=True)
class CongestionSegment:
    """A stretch of consecutive intervals in which a zone was mostly in ``state``."""

    start: datetime
    end: datetime
    state: str

    def to_dict(self) -> dict[str, Any]:
        return _serialise(self)


@dataclass(frozen=True)
class ZoneTimeline:
    camera_id: str
    zone: str
    segments: tuple[CongestionSegment, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "camera_id": self.camera_id,
            "zone": self.zone,
            "segments": [segment.to_dict() for segment in self.segments],
        }


def congestion_timeline(
    records: Iterable[Record], *, camera_id: str | None = None, zone: str | None = None
) -> list[ZoneTimeline]:
    """Per camera and zone, the day as (start, end, state) segments.

    Each interval gets the state the zone spent most seconds in (the summed ``state_s`` of
    its records; a tie goes to the more congested state; the end-of-interval ``state`` when
    no seconds were reported). Adjacent intervals of one state merge; a gap (no record)
    ends a segment. An interval ends at its nominal length or at the zone's next interval,
    whichever comes first (a segment's last, partial interval is followed by the next
    segment's first, possibly of another length). Ordered by camera and zone.
    """
    per_interval: dict[tuple[str, str], dict[datetime, tuple[float, dict[str, float], int]]]
    per_interval = defaultdict(dict)
    for record in unique_records(records):
        cam = record["camera_id"]
        if camera_id is not None and cam != camera_id:
            continue
        start = parse_time(record["interval_start"])
        length = float(record.get("interval_s") or 60)
        for row in record.get("zones") or ():
            if zone is not None and row["zone"] != zone:
                continue
            slot = per_interval[(cam, row["zone"])]
            old_len, old_s, old_end = slot.get(start, (length, {s: 0.0 for s in STATES}, 0))
            seconds = dict(old_s)
            for state, value in (row.get("state_s") or {}).items():
                if state in seconds:
                    seconds[state] += float(value)
            slot[start] = (max(old_len, length), seconds, max(old_end, _state_rank(row.get("state"))))
    out = []
    for (cam, name), slots in sorted(per_interval.items()):
        segments: list[CongestionSegment] = []
        starts = sorted(slots)
        for i, start in enumerate(starts):
            length, seconds, end_rank = slots[start]
            if any(seconds.values()):
                state = max(STATES, key=lambda s: (seconds[s], _RANK[s]))
            else:
                state = STATES[end_rank]
            end = datetime.fromtimestamp(start.timestamp() + length, tz=UTC)
            if i + 1 < len(starts):
                end = min(end, starts[i + 1])
            last = segments[-1] if segments else None
            if last is not None and last.state == state and last.end == start:
                segments[-1] = CongestionSegment(last.start, end, state)
            else:
                segments.append(CongestionSegment(start, end, state))
        out.append(ZoneTimeline(camera_id=cam, zone=name, segments=tuple(segments)))
    return out


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TrafficEvent:
    event_id: str
    camera_id: str
    kind: str
    at: datetime
    zone: str | None
    line: str | None
    track_id: int | None
    class_name: str | None
    duration_s: float | None
    frame_id: str | None
    detail: str | None

    def to_dict(self) -> dict[str, Any]:
        return _serialise(self)


def events(
    records: Iterable[Record],
    kind: str | None = None,
    *,
    camera_id: str | None = None,
    zone: str | None = None,
    line: str | None = None,
) -> list[TrafficEvent]:
    """The records' events, each once (by camera and ``event_id``), ordered by time.

    Per camera: an event id is an agent's, unique only within its camera, so one camera's
    record cannot hide another camera's event by reusing its id."""
    seen: set[tuple[str, str]] = set()
    out = []
    for record in unique_records(records):
        cam = record["camera_id"]
        if camera_id is not None and cam != camera_id:
            continue
        for ev in record.get("events") or ():
            if kind is not None and ev["kind"] != kind:
                continue
            if zone is not None and ev.get("zone") != zone:
                continue
            if line is not None and ev.get("line") != line:
                continue
            key = (cam, ev["event_id"])
            if key in seen:
                continue
            seen.add(key)
            duration = ev.get("duration_s")
            out.append(
                TrafficEvent(
                    event_id=ev["event_id"],
                    camera_id=cam,
                    kind=ev["kind"],
                    at=parse_time(ev["at"]),
                    zone=ev.get("zone"),
                    line=ev.get("line"),
                    track_id=ev.get("track_id"),
                    class_name=ev.get("class_name"),
                    duration_s=None if duration is None else float(duration),
                    frame_id=ev.get("frame_id"),
                    detail=ev.get("detail"),
                )
            )
    out.sort(key=lambda e: (e.at, e.camera_id, e.event_id))
    return out


def in_window(
    records: Iterable[Record], since: datetime | None = None, until: datetime | None = None
) -> list[Record]:
    """The records whose ``interval_start`` lies in ``[since, until)``."""
    lo = parse_time(since) if since is not None else None
    hi = parse_time(until) if until is not None else None
    out = []
    for record in records:
        start = parse_time(record["interval_start"])
        if (lo is None or start >= lo) and (hi is None or start < hi):
            out.append(record)
    return out
