from .benchmarks import nightly_benchmark_schedule
from .federated import federated_rounds_schedule
from .ingestion import replay_ingestion_schedule
from .retention import retention_schedule
from .traffic import traffic_counts_schedule

ALL_SCHEDULES = [nightly_benchmark_schedule, federated_rounds_schedule, replay_ingestion_schedule,
                 traffic_counts_schedule, retention_schedule]

__all__ = [
    "ALL_SCHEDULES",
    "federated_rounds_schedule",
    "nightly_benchmark_schedule",
    "replay_ingestion_schedule",
    "retention_schedule",
    "traffic_counts_schedule",
]
