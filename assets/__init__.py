"""Software-defined assets, one module per lifecycle stage."""

from .active_learning import ACTIVE_LEARNING_ASSETS
from .camera_accuracy import ACCURACY_CHECK, CAMERA_ACCURACY_ASSETS, camera_accuracy
from .datasets import (
    curated_dataset,
    curated_dataset_quarantine_rate,
    curated_dataset_splits_present,
    seed_datasets,
)
from .drift import DRIFT_ASSETS, DRIFT_CHECK, OPERATIONS_CHECK, camera_drift
from .evaluation import (
    benchmark_report,
    candidate_not_worse_than_production,
    int8_accuracy_drop,
    int8_accuracy_drop_per_shape,
    model_meets_quality_floor,
    p95_latency_within_budget,
    production_model,
)
from .export import onnx_model, quantized_model
from .ingestion import sampled_edge_frames
from .partitions import camera_partitions
from .rollout import model_rollout
from .traffic import TRAFFIC_ASSETS, traffic_counts
from .training import trained_model

LOOP_ASSETS = [curated_dataset, trained_model, onnx_model, quantized_model, benchmark_report, production_model]
# The learning loop (jobs.learning_loop_job); model_rollout needs the fleet gateway, so it
# has its own job (jobs.model_rollout_job).
ALL_ASSETS = [seed_datasets, sampled_edge_frames, *LOOP_ASSETS, model_rollout, *ACTIVE_LEARNING_ASSETS,
              *DRIFT_ASSETS, *CAMERA_ACCURACY_ASSETS, *TRAFFIC_ASSETS]
ALL_CHECKS = [
    curated_dataset_splits_present,
    curated_dataset_quarantine_rate,
    candidate_not_worse_than_production,
    int8_accuracy_drop,
    int8_accuracy_drop_per_shape,
    p95_latency_within_budget,
    model_meets_quality_floor,
]

__all__ = [
    "ACCURACY_CHECK", "ALL_ASSETS", "ALL_CHECKS", "DRIFT_CHECK", "LOOP_ASSETS", "OPERATIONS_CHECK",
    "camera_accuracy", "camera_drift", "camera_partitions", "traffic_counts",
]
