"""The roadloop Dagster code location (``dagster dev`` loads it through workspace.yaml)."""

import dagster as dg

from assets import ALL_ASSETS, ALL_CHECKS
from assets.jobs import learning_loop_job, model_rollout_job
from ops import replay_ingestion_job
from resources import build_resources
from schedules import nightly_benchmark_job, nightly_benchmark_schedule, replay_ingestion_schedule
from sensors import (
    new_camera_sensor,
    review_import_job,
    reviews_finished_sensor,
    rollout_health_sensor,
    sampled_edge_frames_job,
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[
        learning_loop_job,
        model_rollout_job,
        nightly_benchmark_job,
        replay_ingestion_job,
        review_import_job,
        sampled_edge_frames_job,
    ],
    schedules=[nightly_benchmark_schedule, replay_ingestion_schedule],
    sensors=[new_camera_sensor, reviews_finished_sensor, rollout_health_sensor],
    resources=build_resources(),
)
