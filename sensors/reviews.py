"""``reviews_finished_sensor``: annotators tagged samples ``reviewed`` → import them.

Polls the FiftyOne review dataset. When samples tagged ``reviewed`` (and not yet
``imported``) are waiting, it launches ``review_import``: ``reviewed_labels`` (export +
validation) then ``curated_dataset`` (a new DVC version). The run key is derived from the
set of pending sample ids, and the cursor remembers the last set launched, so the same
reviews never launch twice; ``reviewed_labels`` tags them ``imported``, which empties the
pending set.
"""

import dagster as dg

from jobs import review_import_job
from resources.fiftyone_resource import FiftyOneResource
from roadloop.labeling.fiftyone_setup import FiftyOneUnavailable
from roadloop.labeling.review_store import pending_key

_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]

@dg.sensor(
    job=review_import_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches review_import when samples tagged `reviewed` in FiftyOne are waiting.",
)
def reviews_finished_sensor(
    context: dg.SensorEvaluationContext, fiftyone: FiftyOneResource
) -> dg.SensorResult | dg.SkipReason:
    try:
        pending = fiftyone.store().pending_reviews()
    except FiftyOneUnavailable as exc:
        return dg.SkipReason(f"FiftyOne is not reachable: {exc}")
    if not pending:
        return dg.SkipReason("no reviewed samples waiting for import")
    in_flight = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=review_import_job.name, statuses=_IN_FLIGHT), limit=1
    )
    if in_flight:  # it imports everything reviewed by then; look again afterwards
        return dg.SkipReason(f"review_import run {in_flight[0].run_id} is still in flight")
    key = pending_key(pending)
    if key == context.cursor:
        return dg.SkipReason(
            f"the {len(pending)} pending reviews were already launched (run key {key})"
        )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"reviews-{key}",
                tags={"roadloop/pending_reviews": str(len(pending))},
            )
        ],
        cursor=key,
    )
