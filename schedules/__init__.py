from .benchmarks import nightly_benchmark_job, nightly_benchmark_schedule
from .ingestion import replay_ingestion_schedule

__all__ = ["nightly_benchmark_job", "nightly_benchmark_schedule", "replay_ingestion_schedule"]
