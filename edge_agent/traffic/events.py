"""What one frame's traffic is (``TrafficCounter.update`` returns a ``FrameTraffic``): the
counting-line crossings, zone entries and exits, each zone's occupancy and density state, and
the incidents that began. Plain values, so the interval aggregation
(``edge_agent.traffic.intervals``) and the pipeline read them without the counter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge_agent.counting import DensityState

if TYPE_CHECKING:  # an annotation only: no tracker (supervision, trackers) imported here
    from edge_agent.traffic.tracking import TrackedBox


@dataclass(frozen=True)
class Crossing:
    line: str
    direction: str  # the line's in_label or out_label
    class_name: str
    track_id: int
    stream_time: float
    speed_kmh: float | None
    pcu: float
    wrong_way: bool


@dataclass(frozen=True)
class ZoneEntry:
    zone: str
    class_name: str
    track_id: int
    pcu: float


@dataclass(frozen=True)
class ZoneExit:
    zone: str
    track_id: int
    dwell_s: float


@dataclass(frozen=True)
class ZoneState:
    zone: str
    occupancy: int
    state: DensityState


@dataclass(frozen=True)
class TrafficEvent:
    kind: str  # jam | jam_cleared | stopped_vehicle | wrong_way
    stream_time: float
    detail: str
    zone: str | None = None
    line: str | None = None
    track_id: int | None = None
    class_name: str | None = None
    duration_s: float | None = None


@dataclass
class FrameTraffic:
    tracks: list[TrackedBox]  # every box of the frame; track_id -1: unconfirmed
    crossings: list[Crossing] = field(default_factory=list)
    entries: list[ZoneEntry] = field(default_factory=list)
    exits: list[ZoneExit] = field(default_factory=list)
    zones: list[ZoneState] = field(default_factory=list)
    events: list[TrafficEvent] = field(default_factory=list)

    @property
    def confirmed(self) -> list[TrackedBox]:
        return [t for t in self.tracks if t.track_id >= 0]
