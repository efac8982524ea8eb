"""Hourly replay ingestion (stand-in for edge agents; off by default)."""

import dagster as dg

from jobs import replay_ingestion_job

replay_ingestion_schedule = dg.ScheduleDefinition(
    name="replay_ingestion_schedule",
    job=replay_ingestion_job,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
