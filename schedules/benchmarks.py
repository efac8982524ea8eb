"""Nightly benchmark report on the latest candidate (and the current production model)."""

import dagster as dg

from assets.evaluation import benchmark_report

nightly_benchmark_job = dg.define_asset_job(
    "nightly_benchmark_job",
    selection=dg.AssetSelection.assets(benchmark_report),
    description="Re-run the benchmark report and its promotion checks.",
)

nightly_benchmark_schedule = dg.ScheduleDefinition(
    name="nightly_benchmark_schedule",
    job=nightly_benchmark_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
