"""Daily retention at 02:00 UTC (after the 01:00 traffic report has aggregated yesterday).

Off by default like every schedule here: the replay demo writes frames stamped 2026-01-01,
which a running schedule would expire on its first tick. A deployment that keeps real
camera data turns it on (docs/retention.md): the policy is only a promise while it runs."""

import dagster as dg

from jobs import retention_job


@dg.schedule(
    job=retention_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    name="retention_schedule",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def retention_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(run_key=context.scheduled_execution_time.date().isoformat())
