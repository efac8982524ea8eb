from .benchmarks import nightly_benchmark_schedule
from .ingestion import replay_ingestion_schedule

ALL_SCHEDULES = [nightly_benchmark_schedule, replay_ingestion_schedule]

__all__ = ["ALL_SCHEDULES", "nightly_benchmark_schedule", "replay_ingestion_schedule"]
