"""``camera_accuracy_sensor``: after reviews are imported, measure the serving model on each
reviewed camera.

Why a sensor: ``camera_accuracy`` is partitioned by camera, and a Dagster job holds assets
of one partitioning, so it cannot join the unpartitioned ``review_import`` job
(``reviewed_labels`` → ``curated_dataset``). Declarative automation (eager) would need the
automation-condition sensor, which this code location does not use, and would request every
camera partition rather than the cameras that have reviews.

What it does: for each new ``reviewed_labels`` materialization, once its run has finished
(so ``curated_dataset``'s DVC push is over), one ``camera_accuracy`` run per camera that has
frames in the review export and is a camera partition (``seed`` frames of label-quality
re-reviews are not a camera). Run keys are ``camera|export content hash``: one measurement
per camera per export. Nothing is launched before a model was promoted (``production_model``
never materialized): there is no serving model to measure.
"""

import dagster as dg

from assets.active_learning import reviewed_labels
from assets.evaluation import production_model
from assets.partitions import camera_partitions
from jobs import camera_accuracy_job
from resources import ArtifactStoreResource
from roadloop.errors import RoadloopError
from roadloop.labeling.review_items import load_review_export
from roadloop.monitoring.accuracy import reviewed_cameras


@dg.sensor(
    job=camera_accuracy_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a review import, starts camera_accuracy for each camera with reviewed "
    "frames.",
)
def camera_accuracy_sensor(context: dg.SensorEvaluationContext, artifacts: ArtifactStoreResource):
    after = None  # a cursor that is not a storage id: start over (run keys dedupe)
    if context.cursor:
        try:
            after = int(context.cursor)
        except ValueError:
            context.log.warning(f"camera_accuracy_sensor: cursor {context.cursor[:100]!r} is not "
                                "a storage id; reading the review imports from the start")
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=reviewed_labels.key, after_storage_id=after),
        limit=50, ascending=True,
    ).records
    finished = []
    for record in records:
        run = context.instance.get_run_by_id(record.run_id)
        if run is not None and not run.is_finished:
            break  # its curated_dataset step may still be pushing to DVC
        finished.append(record)
    if not finished:
        return dg.SkipReason("no finished review import since the last tick")
    cursor = str(finished[-1].storage_id)
    if context.instance.get_latest_materialization_event(production_model.key) is None:
        return dg.SensorResult(cursor=cursor, skip_reason=dg.SkipReason(
            "no model was promoted yet: nothing serves the cameras to measure"))
    try:
        export = load_review_export(artifacts.review_export_path())
        per_camera = reviewed_cameras(export)
    except RoadloopError as exc:
        return dg.SkipReason(f"review export unreadable, waiting: {exc}")
    known = set(context.instance.get_dynamic_partitions(camera_partitions.name))
    unknown = sorted(set(per_camera) - known)
    if unknown:
        context.log.info(f"reviewed frames of {unknown} are not camera partitions: not measured")
    requests = [
        dg.RunRequest(
            partition_key=camera,
            run_key=f"{camera}|{export.content_hash}",
            tags={"roadloop/review_export": export.content_hash,
                  "roadloop/reviewed_frames": str(n)},
        )
        for camera, n in sorted(per_camera.items()) if camera in known
    ]
    if not requests:
        return dg.SensorResult(cursor=cursor, skip_reason=dg.SkipReason(
            "the review export holds no frame of a known camera"))
    return dg.SensorResult(run_requests=requests, cursor=cursor)
