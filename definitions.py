"""The roadloop code location (``dagster dev`` loads it through workspace.yaml)."""

import dagster as dg

from assets import ALL_ASSETS, ALL_CHECKS
from jobs import ALL_JOBS
from resources import build_resources
from schedules import ALL_SCHEDULES
from sensors import ALL_SENSORS

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=ALL_JOBS,
    schedules=ALL_SCHEDULES,
    sensors=ALL_SENSORS,
    resources=build_resources(),
)
