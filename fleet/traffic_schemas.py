"""Traffic interval records (agent -> gateway) and the answers of the traffic query routes.

An interval record is one camera's counts for one interval (``docs/fleet-api.md`` →
"Traffic analytics"; the contract is issue 12's spec §2). Every limit here is a 422 before
anything is stored: row counts (lines ≤ 64 × 2 directions × 32 classes, zones ≤ 64, events ≤
200, speeds and dwell times ≤ 1000 per row), strings ≤ 64 characters (``detail`` ≤ 500),
numbers finite and ≥ 0, speeds ≤ 400 km/h, ``covered_s ≤ interval_s``, unknown keys refused.
``interval_s`` is one the agent can produce (``edge_agent.traffic.geometry.INTERVALS_S``: 60,
300 or 900 s, the rule of the camera configuration's ``traffic.interval_s``): any other length
is refused — the agent never sends one, and some (7 s) fit no bucket of whole records that
tiles a day, so the rollups could not place them.
Ids are the posting camera's own, in exactly the form the agent writes them
(``edge_agent.traffic.intervals``): ``record_id`` is ``<camera_id>.<interval_start, unix
s>.<agent run, ms>``, ``event_id`` is ``<camera_id>.ev.<agent run, ms>.<sequence>``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from edge_agent.traffic.geometry import INTERVALS_S
from fleet.bounds import INT32_MAX, Count, EventTime, Name, PlainText
from roadloop.data.frame_records import FrameId

MAX_LINE_ROWS = 64 * 2 * 32
MAX_ZONES = 64
MAX_EVENTS = 200
MAX_SAMPLES = 1000  # speeds per line row, dwell times per zone
MAX_SPEED_KMH = 400.0
MAX_INTERVAL_S = 3600
MAX_PCU = 1e9
MAX_SECONDS = 1e9
MAX_CLASSES = 32

# Line and zone names as the camera's configuration allows them (spec §1).
GeometryName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_. -]{1,64}$")]
# PlainText: also a query filter, and PostgreSQL refuses a NUL in a parameter (a 500).
Label = Annotated[str, StringConstraints(min_length=1, max_length=64), PlainText]
RecordId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
# What follows "<camera_id>." in a record id and "<camera_id>.ev." in an event id: two
# integers as the agent writes them (no leading zero: "….01" would be a second id for "….1").
_INTEGER = r"(?:0|[1-9][0-9]{0,19})"
_ID_SUFFIX = re.compile(rf"({_INTEGER})\.({_INTEGER})")
Speed = Annotated[float, Field(ge=0.0, le=MAX_SPEED_KMH, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0.0, le=MAX_SECONDS, allow_inf_nan=False)]
Pcu = Annotated[float, Field(ge=0.0, le=MAX_PCU, allow_inf_nan=False)]
ZoneState = Literal["normal", "warning", "heavy", "jam"]
EventKind = Literal["jam", "jam_cleared", "stopped_vehicle", "wrong_way"]
BUCKETS_S = (60, 900, 3600)
UtcEventTime = Annotated[EventTime, AfterValidator(lambda v: v.astimezone(UTC))]


def _agent_interval(value: int) -> int:
    if value not in INTERVALS_S:
        raise ValueError(f"interval_s must be one of {list(INTERVALS_S)} (the agent's "
                         f"traffic.interval_s, edge_agent.traffic.geometry), got {value}")
    return value


IntervalSeconds = Annotated[int, Field(ge=1, le=MAX_INTERVAL_S,
                                       json_schema_extra={"enum": list(INTERVALS_S)}),
                            AfterValidator(_agent_interval)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LineCountIn(_Strict):
    """Vehicles of one class that crossed one line in one direction during the interval."""

    line: GeometryName
    direction: Label
    class_name: Label
    count: Count  # rows of 0 are omitted by the agent (sparse), but harmless
    pcu: Pcu
    speeds_kmh: list[Speed] = Field(default_factory=list, max_length=MAX_SAMPLES)

    @model_validator(mode="after")
    def _speeds_per_vehicle(self) -> LineCountIn:
        if len(self.speeds_kmh) > self.count:
            raise ValueError(f"{len(self.speeds_kmh)} speeds for {self.count} vehicles: at most "
                             "one speed per counted vehicle")
        return self


class StateSeconds(_Strict):
    normal: Seconds = 0.0
    warning: Seconds = 0.0
    heavy: Seconds = 0.0
    jam: Seconds = 0.0


class ZoneStatIn(_Strict):
    zone: GeometryName
    entries: dict[Label, Count] = Field(default_factory=dict, max_length=MAX_CLASSES)
    exits: Count = 0
    dwell_s: list[Seconds] = Field(default_factory=list, max_length=MAX_SAMPLES)
    occupancy_mean: Annotated[float, Field(ge=0.0, le=1e6, allow_inf_nan=False)] = 0.0
    occupancy_max: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    pcu_in: Pcu = 0.0
    state: ZoneState = "normal"
    state_s: StateSeconds = Field(default_factory=StateSeconds)

    @model_validator(mode="after")
    def _dwell_per_exit(self) -> ZoneStatIn:
        if len(self.dwell_s) > self.exits:
            raise ValueError(f"{len(self.dwell_s)} dwell times for {self.exits} exits: at most "
                             "one per exit")
        return self


class TrafficEventIn(_Strict):
    event_id: RecordId
    kind: EventKind
    at: UtcEventTime
    zone: GeometryName | None = None
    line: GeometryName | None = None
    track_id: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    class_name: Label | None = None
    duration_s: Seconds | None = None
    frame_id: FrameId | None = None
    detail: Annotated[str, StringConstraints(max_length=500)] | None = None


class TrafficIntervalIn(_Strict):
    """``POST /v1/traffic/intervals``: one camera's interval (spec §2)."""

    record_id: RecordId = Field(description="'<camera_id>.<interval start, unix s>.<agent run "
                                "start, unix ms>': unique per camera, interval and agent run.")
    camera_id: FrameId
    interval_start: UtcEventTime
    interval_s: IntervalSeconds
    covered_s: Annotated[float, Field(ge=0.0, le=MAX_INTERVAL_S, allow_inf_nan=False)]
    frames: Count
    config_version: Annotated[int, Field(ge=0, le=INT32_MAX)]
    model_version: Name | None = None
    lines: list[LineCountIn] = Field(default_factory=list, max_length=MAX_LINE_ROWS)
    zones: list[ZoneStatIn] = Field(default_factory=list, max_length=MAX_ZONES)
    events: list[TrafficEventIn] = Field(default_factory=list, max_length=MAX_EVENTS)

    @model_validator(mode="after")
    def _consistent(self) -> TrafficIntervalIn:
        if self.covered_s > self.interval_s:
            raise ValueError(f"covered_s {self.covered_s} is longer than interval_s "
                             f"{self.interval_s}")
        start = self.interval_start
        if start.microsecond or int(start.timestamp()) % self.interval_s:
            raise ValueError(f"interval_start {start.isoformat()} is not aligned to "
                             f"interval_s {self.interval_s} (unix time divisible by it)")
        # Camera ids may hold dots: "cam-a" must not take "cam-a.b.<s>.<ms>", the id space
        # of camera "cam-a.b", so what follows the camera id is exactly two integers.
        prefix = f"{self.camera_id}."
        suffix = (_ID_SUFFIX.fullmatch(self.record_id[len(prefix):])
                  if self.record_id.startswith(prefix) else None)
        if suffix is None:
            raise ValueError(f"record_id {self.record_id!r} must be '{self.camera_id}."
                             "<interval start, unix s>.<agent run, ms>'")
        # The interval in the id is what makes a resend of the interval the same id (409):
        # under any other number the same counts would be stored, and summed, again.
        unix_s = str(int(start.timestamp()))
        if suffix[1] != unix_s:
            raise ValueError(f"record_id {self.record_id!r} names interval start {suffix[1]}, "
                             f"not this record's interval_start {start.isoformat()} (unix "
                             f"{unix_s}): it must be '{self.camera_id}.{unix_s}.<agent run, "
                             "ms>'")
        # Event ids are listed once per camera and event_id: another camera's id space is
        # refused like its record ids.
        prefix = f"{self.camera_id}.ev."
        for i, event in enumerate(self.events):
            if not (event.event_id.startswith(prefix)
                    and _ID_SUFFIX.fullmatch(event.event_id[len(prefix):])):
                raise ValueError(f"events[{i}].event_id {event.event_id!r} must be "
                                 f"'{self.camera_id}.ev.<agent run, ms>.<sequence>': an id "
                                 "of this record's camera")
        keys = [(r.line, r.direction, r.class_name) for r in self.lines]
        if len(set(keys)) != len(keys):
            raise ValueError("lines: one row per (line, direction, class_name); a key repeats")
        if len({z.zone for z in self.zones}) != len(self.zones):
            raise ValueError("zones: one row per zone; a zone repeats")
        if len({(r.line, r.direction) for r in self.lines}) > 64 * 2:
            raise ValueError("lines: more than 64 lines x 2 directions")
        return self


class TrafficIntervalStored(BaseModel):
    record_id: str
    stored: bool = True


class TrafficIntervalOut(BaseModel):
    """A stored record as it was posted (canonical JSON), plus when the gateway got it."""

    record_id: str
    camera_id: str
    interval_start: datetime
    interval_s: int
    covered_s: float
    frames: int
    config_version: int
    model_version: str | None
    lines: list[dict[str, Any]]
    zones: list[dict[str, Any]]
    events: list[dict[str, Any]]
    received_at: datetime


class TrafficIntervalPage(BaseModel):
    items: list[TrafficIntervalOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page.")


class LineVolumeOut(BaseModel):
    """Vehicles of one class crossing one line in one direction during one bucket
    (``roadloop.traffic.rollups.LineVolume``)."""

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


class ZoneBucketOut(BaseModel):
    """One zone of one camera during one bucket (``roadloop.traffic.rollups.ZoneBucket``)."""

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
    state_s: dict[str, float]
    worst_state: str


class TrafficEventOut(BaseModel):
    """One traffic event (``roadloop.traffic.rollups.TrafficEvent``)."""

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
