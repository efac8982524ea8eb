"""The demo's traffic analytics: each video camera gets its geometry before its agent starts,
and after the agents have streamed ``traffic_counts`` writes the day's report.

Geometry per video: ``launch.demo_geometry``. The agent polls its configuration once before
its first frame, so a camera configured here counts from frame one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from launch.demo_geometry import traffic_section

log = logging.getLogger(__name__)

TRAFFIC_JOB = "traffic_counts_job"


@dataclass
class TrafficOutcome:
    success: bool = True
    configured: list[str] = field(default_factory=list)  # camera ids with a geometry
    days: list[str] = field(default_factory=list)
    report: str | None = None  # report.md of the last day
    records: int = 0
    total_vehicles: int = 0
    line_totals: dict[str, int] = field(default_factory=dict)  # camera/line/direction
    preview_url: str | None = None
    token_file: str | None = None
    error: str | None = None

    def lines(self) -> list[str]:
        out = ["  traffic: geometry on " + (", ".join(self.configured) or "no camera")]
        if self.error:
            out.append(f"    traffic report FAILED ({self.error})")
        if self.report:
            out.append(f"    traffic_counts {', '.join(self.days)}: {self.records} interval "
                       f"records, {self.total_vehicles} vehicles; report {self.report}")
            out.append("    vehicles per line: " + (", ".join(
                f"{k}={v}" for k, v in sorted(self.line_totals.items())) or "none"))
        if self.preview_url:
            out.append(f"    camera preview (lines + last 15 min counts): {self.preview_url} "
                       f"(Authorization: Bearer $(cat {self.token_file}))")
        return out


def configure_cameras(fleet: Any, cameras: Iterable[tuple[str, str]]) -> list[str]:
    """PUT each ``(camera_id, video file name)``'s traffic section into the camera's
    configuration (other sections kept); returns the cameras configured."""
    done = []
    for camera_id, video_name in cameras:
        section = traffic_section(video_name)
        if section is None:
            continue
        current = fleet.camera_config(camera_id)
        config = dict(current.get("config") or {})
        config["traffic"] = section
        fleet.put_camera_config(camera_id, config, current.get("version", 0),
                                "demo: counting lines and zones for this video")
        done.append(camera_id)
    log.info("traffic geometry set on %s", ", ".join(done) or "no camera")
    return done


def materialize_report(defs: Any, instance: Any, days: Iterable[date],
                       outcome: TrafficOutcome) -> None:
    """``traffic_counts`` for each day (UTC) the agents streamed; the last day's figures."""
    job = defs.resolve_job_def(TRAFFIC_JOB)
    for day in sorted(set(days)):
        key = day.isoformat()
        result = job.execute_in_process(instance=instance, partition_key=key,
                                        raise_on_error=False)
        if not result.success:
            outcome.success, outcome.error = False, f"traffic_counts {key} did not materialize"
            return
        outcome.days.append(key)
        for event in result.get_asset_materialization_events():
            md = {k: v.value for k, v in event.materialization.metadata.items()}
            outcome.report = str(md.get("report_path"))
            outcome.records = int(md.get("records", 0))
            outcome.total_vehicles = int(md.get("total_vehicles", 0))
            outcome.line_totals = {str(k): int(v)
                                   for k, v in (md.get("line_totals") or {}).items()}


def preview(outcome: TrafficOutcome, gateway_url: str, token_file: Path) -> None:
    """The gateway's preview of the first configured camera (camera:admin token)."""
    if outcome.configured:
        outcome.preview_url = f"{gateway_url}/v1/cameras/{outcome.configured[0]}/preview.jpg"
        outcome.token_file = str(token_file)
