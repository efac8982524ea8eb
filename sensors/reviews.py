"""``reviews_finished_sensor``: annotators tagged samples ``reviewed`` → import them.

Polls the FiftyOne review dataset. When samples tagged ``reviewed`` (and not yet
``imported``) are waiting, it launches ``review_import``: ``reviewed_labels`` (export +
validation) then ``curated_dataset`` (a new DVC version). The run key is derived from the
set of pending sample ids, and the cursor remembers the last set launched, so the same
reviews never launch twice; ``reviewed_labels`` tags them ``imported``, which empties the
pending set.

A run that failed or was canceled leaves the set pending: the sensor finds it by its
``roadloop/review_key`` tag and launches the set again under a new run key (attempt ``n``:
``reviews-<key>-retry<n>``, cursor ``<key>#<n>``), waiting ``RETRY_BASE_S · 2^(n-1)`` (at
most ``RETRY_MAX_S``) after the failure so a lasting fault does not start a run a minute.
A launched set whose run cannot be found (deleted) is not relaunched (no run storm).

A set can also be pending again after its import SUCCEEDED: ``reviewed_labels`` rejected a
review (back in the queue) and the annotator fixed and finished it again, or a label-quality
flag sent an imported frame back and it was re-reviewed. The ids, hence ``pending_key`` and
the cursor, are the same as before; what differs is when the samples were last modified.
Each run is tagged with ``review_mark`` of the set it launched (``roadloop/review_mark``:
ids + FiftyOne ``last_modified_at``); a set whose last run succeeded is launched again when
its mark differs (run key ``reviews-<key>-m<mark>``: deterministic, new for every new
state of the set, the attempt counter goes on so later retries get new keys too). A run
without the tag (launched before it existed) counts as re-reviewed when a pending sample was
modified after that run ended. A set unchanged since its successful run is not relaunched,
and nothing is launched while a ``review_import`` run is in flight.
"""

import time
from datetime import UTC

import dagster as dg

from jobs import review_import_job
from resources import ArtifactStoreResource
from resources.fiftyone_resource import FiftyOneResource
from roadloop.labeling.fiftyone_setup import FiftyOneUnavailable
from roadloop.labeling.review_store import ReviewDatasetMissingError, pending_key, review_mark

_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,  # still executing until it reaches CANCELED
]
_RETRY_ON = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
TAG_REVIEW_KEY = "roadloop/review_key"
TAG_ATTEMPT = "roadloop/review_attempt"
TAG_REVIEW_MARK = "roadloop/review_mark"
RETRY_BASE_S = 60.0
RETRY_MAX_S = 3600.0


def _parse_cursor(cursor: str | None) -> tuple[str | None, int]:
    """(pending key, attempt) of the last launch; a cursor without ``#n`` is attempt 0."""
    if not cursor:
        return None, 0
    key, _, attempt = cursor.partition("#")
    return key, int(attempt) if attempt.isdigit() else 0


def _run_key(key: str, attempt: int) -> str:
    return f"reviews-{key}" if attempt == 0 else f"reviews-{key}-retry{attempt}"


def _last_run(instance: dg.DagsterInstance, key: str, attempt: int) -> dg.RunRecord | None:
    """The newest review_import run for this pending set: by our tag, else by Dagster's
    run-key tag (runs launched before the tag existed)."""
    for tags in ({TAG_REVIEW_KEY: key}, {"dagster/run_key": _run_key(key, attempt)}):
        records = instance.get_run_records(
            filters=dg.RunsFilter(job_name=review_import_job.name, tags=tags), limit=1
        )
        if records:
            return records[0]
    return None


def _reviewed_again(record: dg.RunRecord, mark: str, modified: dict) -> bool:
    """Whether the pending set changed since ``record``'s run was launched for it: its mark
    differs from the run's; for a run without one, a sample was modified after it ended."""
    launched = record.dagster_run.tags.get(TAG_REVIEW_MARK)
    if launched is not None:
        return launched != mark
    # no end time recorded: the later of its stamps (update_timestamp is whole seconds)
    ended = record.end_time or max(
        record.update_timestamp.timestamp(), record.create_timestamp.timestamp()
    )
    return any(
        t is not None and (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() > ended
        for t in modified.values()
    )


@dg.sensor(
    job=review_import_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches review_import when samples tagged `reviewed` in FiftyOne are waiting; "
    "relaunches (with backoff) when that run failed or was canceled.",
)
def reviews_finished_sensor(
    context: dg.SensorEvaluationContext,
    fiftyone: FiftyOneResource,
    artifacts: ArtifactStoreResource,
) -> dg.SensorResult | dg.SkipReason:
    try:
        store = fiftyone.store().guarded_by(artifacts.review_export_path())
        modified = store.pending_reviews_modified()
    except (FiftyOneUnavailable, ReviewDatasetMissingError) as exc:
        return dg.SkipReason(f"FiftyOne review dataset unavailable: {exc}")
    pending = list(modified)
    if not pending:
        return dg.SkipReason("no reviewed samples waiting for import")
    in_flight = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=review_import_job.name, statuses=_IN_FLIGHT), limit=1
    )
    if in_flight:  # it imports everything reviewed by then; look again afterwards
        return dg.SkipReason(f"review_import run {in_flight[0].run_id} is still in flight")
    key, mark = pending_key(pending), review_mark(modified)
    last_key, attempt = _parse_cursor(context.cursor)
    run_key = None
    if key != last_key:
        attempt = 0
    else:
        record = _last_run(context.instance, key, attempt)
        if (
            record is not None
            and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            and _reviewed_again(record, mark, modified)
        ):
            context.log.info(
                f"the {len(pending)} reviews imported by run {record.dagster_run.run_id} are "
                "pending again (reviewed again after that import); launching them again"
            )
            attempt += 1
            run_key = f"reviews-{key}-m{mark}"
        elif record is None or record.dagster_run.status not in _RETRY_ON:
            run = (
                f"run {record.dagster_run.run_id} {record.dagster_run.status.value}"
                if record is not None
                else "no run found: if it was deleted, launch review_import by hand"
            )
            return dg.SkipReason(
                f"the {len(pending)} pending reviews were already launched (run key "
                f"{_run_key(key, attempt)}; {run})"
            )
        else:
            wait = min(RETRY_BASE_S * 2**attempt, RETRY_MAX_S)  # failed or canceled: back off
            ended = record.end_time or record.update_timestamp.timestamp()
            left = ended + wait - time.time()
            if left > 0:
                return dg.SkipReason(
                    f"review_import run {record.dagster_run.run_id} for these {len(pending)} "
                    f"reviews ended {record.dagster_run.status.value}; retrying in {left:.0f} s "
                    f"(attempt {attempt + 1})"
                )
            context.log.warning(
                f"review_import run {record.dagster_run.run_id} ended "
                f"{record.dagster_run.status.value}; launching the reviews again"
            )
            attempt += 1
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=run_key or _run_key(key, attempt),
                tags={
                    "roadloop/pending_reviews": str(len(pending)),
                    TAG_REVIEW_KEY: key,
                    TAG_ATTEMPT: str(attempt),
                    TAG_REVIEW_MARK: mark,
                },
            )
        ],
        cursor=key if attempt == 0 else f"{key}#{attempt}",
    )
