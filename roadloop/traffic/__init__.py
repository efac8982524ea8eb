"""Traffic analytics on the platform side: rollups of the edge agents' interval records
(volumes, zone statistics, congestion timeline, events) and the operator's daily report.
Framework-free; the gateway's aggregated endpoints and the Dagster ``traffic_counts`` asset
call it (docs/traffic.md)."""

from roadloop.traffic.rollups import (
    STATES,
    CongestionSegment,
    LineVolume,
    TrafficEvent,
    ZoneBucket,
    ZoneTimeline,
    bucket_start,
    check_bucket,
    congestion_timeline,
    coverage,
    events,
    in_window,
    line_volumes,
    parse_time,
    zone_stats,
)

__all__ = [
    "STATES",
    "CongestionSegment",
    "LineVolume",
    "TrafficEvent",
    "ZoneBucket",
    "ZoneTimeline",
    "bucket_start",
    "check_bucket",
    "congestion_timeline",
    "coverage",
    "events",
    "in_window",
    "line_volumes",
    "parse_time",
    "zone_stats",
]
