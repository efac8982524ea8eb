"""Traffic analytics on the agent: tracks, line and zone counts per class, speeds, PCU,
density states and incidents, summed into one record per camera and interval.

``geometry`` (the camera's lines, zones and homography, checked), ``tracking`` (ByteTrack
from the ``trackers`` package, with each track's class voted over its life), ``counter``
(crossings, zones, speeds, events per frame; its output values in ``events``) and
``intervals`` (the per-interval records that travel through the agent's record outbox to
the gateway). ``docs/traffic.md``.
"""

from edge_agent.traffic.geometry import (
    DEFAULT_PCU,
    CountingLine,
    EventRules,
    Homography,
    TrafficConfig,
    Zone,
    parse_traffic_section,
)

__all__ = [
    "DEFAULT_PCU",
    "CountingLine",
    "EventRules",
    "Homography",
    "TrafficConfig",
    "Zone",
    "parse_traffic_section",
]
