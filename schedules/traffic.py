"""Daily traffic report: yesterday's (UTC) traffic_counts partition at 01:00 UTC, when the
agents' outboxes have delivered the day's last records (off by default; a day can be
materialized again when late records arrive).

Written out rather than built from the partitioned job: the partitions include today (the day
so far), and a schedule built from them would report the day that has just begun."""

from datetime import timedelta

import dagster as dg

from jobs import traffic_counts_job


@dg.schedule(
    job=traffic_counts_job,
    cron_schedule="0 1 * * *",
    execution_timezone="UTC",
    name="traffic_counts_schedule",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def traffic_counts_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = (context.scheduled_execution_time - timedelta(days=1)).date().isoformat()
    return dg.RunRequest(run_key=day, partition_key=day)
