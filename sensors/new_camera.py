"""New-camera sensor: each camera folder in the frame store becomes a dynamic partition.

Cursor: ``{camera: frame-store count}`` as of the last tick; a camera is refreshed when its
count changed. A camera the cursor does not know yet (every camera on a first tick, e.g.
right after ``roadloop demo`` built the partitions in-process) is seeded from the instance:
when its partition was already materialized from the same number of stored frames
(``store_frames`` in the materialization's metadata; a materialization without it counts as
current), it is not requested again. Only new cameras and cameras with new frames run.
A cursor that does not read (not a JSON object of counts) is logged and treated as none.

Run keys are ``camera:count:materialization`` (``refresh_key``): the frame count and the
storage id of the partition's latest materialization, the one the run refreshes. Dagster
drops a run key a sensor used before, and retention deleting old frames brings a count back
to an earlier value: ``camera:count`` alone would repeat and that refresh would be dropped.
The same state (a tick evaluated again) still gives the same key.
"""


import json

import dagster as dg

from assets.ingestion import sampled_edge_frames
from assets.partitions import camera_partitions
from jobs import sampled_edge_frames_job
from resources import FrameStoreResource


def materialized_frame_counts(instance: dg.DagsterInstance, cameras: list[str],
                              current: dict[str, int]) -> dict[str, int]:
    """For each camera whose ``sampled_edge_frames`` partition is materialized: the store's
    frame count that materialization saw (the current count when it did not record one)."""
    out: dict[str, int] = {}
    for camera in cameras:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=sampled_edge_frames.key, asset_partitions=[camera]),
            limit=1,
        ).records
        if not records or records[0].asset_materialization is None:
            continue
        seen = records[0].asset_materialization.metadata.get("store_frames")
        out[camera] = int(seen.value) if seen is not None else current[camera]
    return out


def refresh_key(instance: dg.DagsterInstance, camera: str, count: int) -> str:
    """``camera:count:storage id`` of the partition's latest ``sampled_edge_frames``
    materialization (0: none yet). Each refresh that ran moves the storage id on, so a count
    seen before (frames deleted by retention) gives a new key."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=sampled_edge_frames.key, asset_partitions=[camera]),
        limit=1,
    ).records
    return f"{camera}:{count}:{records[0].storage_id if records else 0}"


def read_cursor(context: dg.SensorEvaluationContext) -> dict[str, int]:
    """``{camera: count}`` of the last tick; an unreadable cursor, or entries in it that are
    not counts, are logged and dropped (those cameras are seeded from the instance again)."""
    if not context.cursor:
        return {}
    try:
        raw = json.loads(context.cursor)
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        context.log.warning(f"new_camera_sensor: cursor {context.cursor[:100]!r} is not a JSON "
                            "object of frame counts; starting over as on a first tick")
        return {}
    seen = {c: n for c, n in raw.items() if isinstance(n, int) and not isinstance(n, bool)}
    if len(seen) != len(raw):
        context.log.warning(f"new_camera_sensor: cursor entries that are not counts dropped: "
                            f"{sorted(set(raw) - set(seen))[:10]}")
    return seen


@dg.sensor(
    job=sampled_edge_frames_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Adds a partition per new camera and refreshes cameras that sent new frames. Cursor: "
        "frames per camera; on a first tick, partitions already materialized from the same "
        "frames are not requested again."
    ),
)
def new_camera_sensor(context: dg.SensorEvaluationContext, frame_store: FrameStoreResource) -> dg.SensorResult:
    store = frame_store.store()
    seen = read_cursor(context)
    counts = {camera: store.count(camera) for camera in store.cameras()}
    unseen = sorted(c for c in counts if c not in seen)
    if unseen:  # a first tick, or cameras the cursor has not met: what does the instance hold?
        built = materialized_frame_counts(context.instance, unseen, counts)
        seen = {**seen, **built}
        if built:
            context.log.info(f"already materialized, not requested again unless frames changed: "
                             f"{', '.join(sorted(built))}")
    known = set(context.instance.get_dynamic_partitions(camera_partitions.name))
    new_cameras = sorted(c for c in counts if c not in known)
    changed = sorted(c for c, n in counts.items() if n > 0 and n != seen.get(c))
    return dg.SensorResult(
        dynamic_partitions_requests=[camera_partitions.build_add_request(new_cameras)] if new_cameras else [],
        # The same state never launches twice; an earlier count after a refresh ran does.
        run_requests=[dg.RunRequest(partition_key=c,
                                    run_key=refresh_key(context.instance, c, counts[c]))
                      for c in changed],
        cursor=json.dumps(counts, sort_keys=True),
    )
