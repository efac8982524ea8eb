"""Partitions: one per camera (added at run time by the new-camera sensor), drift windows and
traffic days."""

from datetime import UTC, datetime, time

import dagster as dg

from roadloop.monitoring.windows import DRIFT_WINDOW_FORMAT, window_cron
from roadloop.settings import get_settings

camera_partitions = dg.DynamicPartitionsDefinition(name="cameras")

# Drift windows: fixed UTC windows of ROADLOOP_DRIFT_WINDOW_MINUTES (15 by default); the
# camera_drift asset is partitioned by camera × window (a grid in the Dagster UI).
_settings = get_settings()
drift_window_partitions = dg.TimeWindowPartitionsDefinition(
    cron_schedule=window_cron(_settings.drift_window_minutes),
    start=datetime.combine(_settings.drift_start, time(), UTC),
    fmt=DRIFT_WINDOW_FORMAT,
    timezone="UTC",
)
camera_window_partitions = dg.MultiPartitionsDefinition(
    {"camera": camera_partitions, "window": drift_window_partitions}
)

# Traffic days: the daily operator report covers one UTC day of every camera. Today is a
# partition too (end_offset=1): the report of the day so far can be written (and rewritten).
traffic_day_partitions = dg.DailyPartitionsDefinition(
    start_date=_settings.traffic_start.isoformat(), timezone="UTC", end_offset=1
)
