"""``traffic_counts``: the operator's daily traffic report (one partition per UTC day).

Reads the day's interval records of every camera (or of the configured ones) from the fleet
gateway (``FleetResource.traffic_intervals``: ``GET /v1/traffic/intervals``, every page) and
writes ``roadloop.traffic.report`` into ``<artifacts>/traffic/reports/<day>/`` (replaced as a
whole). Agents upload late records from their outbox, so a day can be materialized again; the
report then holds what had arrived. docs/traffic.md explains the figures.
"""

from typing import Any

import dagster as dg
from pydantic import Field

from resources import ArtifactStoreResource, FleetResource
from resources.fleet_resource import FleetError
from roadloop.traffic.report import day_window, write_daily_report

from . import groups
from .partitions import traffic_day_partitions


class TrafficCountsConfig(dg.Config):
    camera_ids: list[str] = Field(default_factory=list, description=(
        "Cameras to report; empty: every camera with records that day."))
    bucket_minutes: int = Field(default=15, description=(
        "Volume table and plot bucket in minutes (a divisor of a day)."))


def _metadata(report: Any, cameras: list[str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "day": report.day.isoformat(),
        "records": report.records,
        "cameras": dg.MetadataValue.json(cameras),
        "total_vehicles": report.total_vehicles,
        "total_pcu": float(report.total_pcu),
        "line_totals": dg.MetadataValue.json(report.line_totals),
        "events": report.events_count,
        "report_path": dg.MetadataValue.path(str(report.markdown)),
        "report_folder": dg.MetadataValue.path(str(report.folder)),
        "volumes": dg.MetadataValue.md(report.volume_table_md if report.records
                                       else "No traffic records for this day."),
        "plots": len(report.plots),
        # cameras whose records fit no bucket of the report (intervals the agents never
        # send): left out with the reason, the other cameras reported
        "left_out": dg.MetadataValue.json(report.left_out),
    }
    for label, vehicles in report.line_totals.items():
        metadata[f"vehicles/{label}"] = vehicles  # one series per line in the asset's plots
    return metadata


@dg.asset(
    partitions_def=traffic_day_partitions,
    group_name=groups.TRAFFIC,
    kinds={"matplotlib"},
    description=(
        "The operator's daily traffic report for one UTC day: vehicles per line, direction "
        "and class (15-minute volumes), PCU flow per hour, speed distributions (median, p85), "
        "congestion timeline per zone and events, from the cameras' interval records on the "
        "fleet gateway. Markdown + PNG plots under <artifacts>/traffic/reports/<day>."
    ),
)
def traffic_counts(
    context: dg.AssetExecutionContext,
    config: TrafficCountsConfig,
    fleet: FleetResource,
    artifacts: ArtifactStoreResource,
) -> dg.MaterializeResult:
    window = context.partition_time_window
    day = window.start.date()
    since, until = day_window(day)
    wanted = sorted(set(config.camera_ids))
    try:
        if wanted:
            records = [r for cam in wanted for r in fleet.traffic_intervals(cam, since, until)]
        else:
            records = fleet.traffic_intervals(None, since, until)
    except FleetError as exc:
        raise dg.Failure(f"traffic records of {day} unavailable: {exc}",
                         allow_retries=True) from exc
    folder = artifacts.path("traffic", "reports") / day.isoformat()
    try:
        report = write_daily_report(records, day, folder, cameras=wanted or None,
                                    bucket_s=config.bucket_minutes * 60)
    except ValueError as exc:  # a bucket that does not tile the day
        raise dg.Failure(f"traffic report of {day}: {exc}", allow_retries=False) from exc
    cameras = wanted or sorted({r["camera_id"] for r in records})
    for cam, why in sorted(report.left_out.items()):
        context.log.warning(f"traffic {day}: camera {cam} left out of the report: {why}")
    context.log.info(
        f"traffic {day}: {report.records} records of {len(cameras)} camera(s), "
        f"{report.total_vehicles} vehicles, {report.events_count} events -> {report.markdown}"
    )
    return dg.MaterializeResult(metadata=_metadata(report, cameras))


TRAFFIC_ASSETS = [traffic_counts]
