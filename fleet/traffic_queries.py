"""Aggregated traffic: ``GET /v1/traffic/counts``, ``/v1/traffic/zones``, ``/v1/traffic/events``
(``camera:admin``).

The filters (camera, line, direction, class, zone, kind, time range) are SQL over the indexed
row tables of ``fleet.traffic``; the aggregation — buckets, sums of the records of one
interval from several agent runs, speed median / 85th percentile over the pooled speeds,
zone statistics — is ``roadloop.traffic.rollups``, the same code the daily report runs, so
the two never disagree. A query that would read more than ``MAX_ROWS`` rows is a 422 asking
for a narrower range; so is a ``bucket_s`` that does not hold whole records of the range
(``rollups.check_intervals``: 60 s buckets over an agent's 900 s records would put each
record's vehicles in one minute and read them as that minute's flow). Without ``camera_id``,
the cameras whose records do not fit the bucket are left out of the answer and named in the
``X-Traffic-Left-Out`` header (``camera: N s intervals``), so one camera's records (60 s
buckets over its 900 s intervals, or a length an older gateway took) do not make the query a
422 for every camera; it is a 422 when no camera's records fit, or for a camera asked by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import AfterValidator
from sqlalchemy import Select

from fleet.auth import AdminPrincipal
from fleet.auth_first import AuthFirstRoute
from fleet.bounds import Timestamp
from fleet.db import TrafficEventRow, TrafficLineCountRow, TrafficZoneStatRow
from fleet.runtime import Gateway, GatewayDep
from fleet.traffic import READ_ERRORS, CameraQuery, SinceQuery, UntilQuery
from fleet.traffic_schemas import (
    BUCKETS_S,
    EventKind,
    GeometryName,
    Label,
    LineVolumeOut,
    TrafficEventOut,
    ZoneBucketOut,
)
from roadloop.traffic import rollups

MAX_ROWS = 200_000
LEFT_OUT_HEADER = "X-Traffic-Left-Out"
_LEFT_OUT_NAMED = 20  # cameras named in the header; the rest counted


def _bucket(value: int) -> int:
    if value not in BUCKETS_S:
        raise ValueError(f"bucket_s must be one of {list(BUCKETS_S)}, got {value}")
    return value


BucketQuery = Annotated[int, AfterValidator(_bucket),
                        Query(description="Bucket length in seconds (UTC-aligned).",
                              json_schema_extra={"enum": list(BUCKETS_S)})]
router = APIRouter(tags=["traffic"], route_class=AuthFirstRoute)


def _fetch(gw: Gateway, q: Select[Any]) -> list[Any]:
    with gw.db.read() as session:
        rows = list(session.execute(q.limit(MAX_ROWS + 1)))
    if len(rows) > MAX_ROWS:
        raise HTTPException(422, f"the query matches more than {MAX_ROWS} stored rows: narrow "
                            "it (since/until, camera_id)")
    return rows


def _rollup(compute: Callable[[], list[Any]]) -> list[Any]:
    """A rollup's rows; its ``ValueError`` (a bucket that splits records) is a 422."""
    try:
        return compute()
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _fitting(records: list[dict[str, Any]], bucket_s: int, camera_id: str | None,
             response: Response) -> list[dict[str, Any]]:
    """``records`` less those of the cameras whose records ``bucket_s`` cannot hold whole,
    named in the ``X-Traffic-Left-Out`` header; unchanged for a camera asked by name, or when
    no camera's records fit (then the rollup's 422 says which bucket to ask for)."""
    if camera_id is not None:
        return records
    unfit = rollups.unfitting_cameras(records, bucket_s)
    kept = [r for r in records if r["camera_id"] not in unfit]
    if not unfit or not kept:
        return records
    named = [f"{cam}: {unfit[cam]} s intervals" for cam in sorted(unfit)[:_LEFT_OUT_NAMED]]
    if len(unfit) > _LEFT_OUT_NAMED:
        named.append(f"{len(unfit) - _LEFT_OUT_NAMED} more")
    response.headers[LEFT_OUT_HEADER] = "; ".join(named)
    return kept


def _window(q: Select[Any], column: Any, camera: Any, camera_id: str | None,
            since: datetime | None, until: datetime | None) -> Select[Any]:
    if camera_id is not None:
        q = q.where(camera == camera_id)
    if since is not None:
        q = q.where(column >= since)
    if until is not None:
        q = q.where(column < until)
    return q


def as_records(rows: Iterable[Any], key: str, item: Any) -> list[dict[str, Any]]:
    """Row-table rows back into (partial) interval records, one per ``record_id``: the form
    ``roadloop.traffic.rollups`` reads."""
    records: dict[str, dict[str, Any]] = {}
    for row in rows:
        record = records.get(row.record_id)
        if record is None:
            record = records[row.record_id] = {
                "record_id": row.record_id, "camera_id": row.camera_id,
                "interval_start": row.interval_start,
                "interval_s": getattr(row, "interval_s", None),
                "covered_s": getattr(row, "covered_s", None), key: []}
        record[key].append(item(row))
    return list(records.values())


@router.get("/v1/traffic/counts", response_model=list[LineVolumeOut], responses=READ_ERRORS)
def traffic_counts(
    principal: AdminPrincipal,
    gw: GatewayDep,
    response: Response,
    camera_id: CameraQuery = None,
    line: Annotated[GeometryName | None, Query()] = None,
    direction: Annotated[Label | None, Query()] = None,
    class_name: Annotated[Label | None, Query()] = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    bucket_s: BucketQuery = 900,
) -> list[LineVolumeOut]:
    """Volumes per bucket, camera, line, direction and class: count, PCU, speed median and
    85th percentile (km/h, over the pooled speeds; null without speeds)."""
    t = TrafficLineCountRow
    q = _window(t.__table__.select(), t.interval_start, t.camera_id, camera_id, since, until)
    if line is not None:
        q = q.where(t.line == line)
    if direction is not None:
        q = q.where(t.direction == direction)
    if class_name is not None:
        q = q.where(t.class_name == class_name)
    records = as_records(_fetch(gw, q), "lines", lambda r: {
        "line": r.line, "direction": r.direction, "class_name": r.class_name,
        "count": r.count, "pcu": r.pcu, "speeds_kmh": r.speeds_kmh})
    records = _fitting(records, bucket_s, camera_id, response)
    volumes = _rollup(lambda: rollups.line_volumes(records, bucket_s))
    return [LineVolumeOut(**v.to_dict()) for v in volumes]


@router.get("/v1/traffic/zones", response_model=list[ZoneBucketOut], responses=READ_ERRORS)
def traffic_zones(
    principal: AdminPrincipal,
    gw: GatewayDep,
    response: Response,
    camera_id: CameraQuery = None,
    zone: Annotated[GeometryName | None, Query()] = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    bucket_s: BucketQuery = 900,
) -> list[ZoneBucketOut]:
    """Zone statistics per bucket: entries per class, exits, mean dwell, occupancy, PCU in
    and PCU flow per watched hour, seconds in each density state and the worst state."""
    t = TrafficZoneStatRow
    q = _window(t.__table__.select(), t.interval_start, t.camera_id, camera_id, since, until)
    if zone is not None:
        q = q.where(t.zone == zone)
    records = _fitting(as_records(_fetch(gw, q), "zones", lambda r: r.stats), bucket_s,
                       camera_id, response)
    zones = _rollup(lambda: rollups.zone_stats(records, bucket_s))
    return [ZoneBucketOut(**z.to_dict()) for z in zones]


@router.get("/v1/traffic/events", response_model=list[TrafficEventOut], responses=READ_ERRORS)
def traffic_events(
    principal: AdminPrincipal,
    gw: GatewayDep,
    camera_id: CameraQuery = None,
    kind: Annotated[EventKind | None, Query()] = None,
    since: Annotated[Timestamp | None, Query(description="Only events at >= since.")] = None,
    until: Annotated[Timestamp | None, Query(description="Only events at < until.")] = None,
) -> list[TrafficEventOut]:
    """Traffic events (jams, stopped vehicles, wrong-way crossings) in time order."""
    t = TrafficEventRow
    q = _window(t.__table__.select(), t.at, t.camera_id, camera_id, since, until)
    if kind is not None:
        q = q.where(t.kind == kind)
    records = as_records(_fetch(gw, q), "events", lambda r: r.event)
    return [TrafficEventOut(**e.to_dict()) for e in rollups.events(records)]
