"""Nightly benchmark report on the latest candidate (and the current production model)."""

import dagster as dg

from jobs import nightly_benchmark_job

nightly_benchmark_schedule = dg.ScheduleDefinition(
    name="nightly_benchmark_schedule",
    job=nightly_benchmark_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
