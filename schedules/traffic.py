"""Daily traffic report: yesterday's (UTC) traffic_counts partition at 01:00 UTC, when the
agents' outboxes have delivered the day's last records (off by default; a day can be
materialized again when late records arrive)."""

import dagster as dg

from jobs import traffic_counts_job

traffic_counts_schedule = dg.build_schedule_from_partitioned_job(
    traffic_counts_job,
    name="traffic_counts_schedule",
    hour_of_day=1,
    minute_of_hour=0,
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
