"""Every job of the roadloop code location, in one place.

Sensors, schedules, ``definitions`` and the demo (``launch/demo.py``) take their jobs from
here. A top-level module, beside ``definitions.py``, because the jobs span both layers below
it: asset jobs over ``assets/`` and the replay op job over ``ops/`` (``assets/`` importing
``ops/`` would tie the asset graph to op code it does not need).
"""

import dagster as dg

from assets import LOOP_ASSETS
from assets.active_learning import active_learning_queue, frame_embeddings, reviewed_labels
from assets.camera_accuracy import camera_accuracy
from assets.datasets import curated_dataset
from assets.drift import camera_drift
from assets.evaluation import benchmark_report
from assets.ingestion import sampled_edge_frames
from assets.partitions import (
    camera_partitions,
    camera_window_partitions,
    traffic_day_partitions,
)
from assets.rollout import model_rollout
from assets.traffic import traffic_counts
from ops.ingestion import replay_shared_cameras
from ops.retention import enforce_retention, erase_camera_frames
from roadloop.run_placement import TRAINING_RUN_TAGS

# --------------------------------------------------------------------------- ingestion


@dg.job(description="Play the shared datasets and videos as cameras into the frame store.")
def replay_ingestion_job() -> None:
    replay_shared_cameras()


sampled_edge_frames_job = dg.define_asset_job(
    "sampled_edge_frames_job",
    selection=dg.AssetSelection.assets(sampled_edge_frames),
    partitions_def=camera_partitions,
    description="Index one camera's kept frames (near-duplicates dropped); one run per partition.",
)

# --------------------------------------------------------------------------- privacy


@dg.job(description="Delete what the retention policy says has expired; reports counts.")
def retention_job() -> None:
    enforce_retention()


@dg.job(description="Erase one camera's frames in a time range everywhere (config: camera_id, "
        "since, until, requested_by, reason).")
def erasure_job() -> None:
    erase_camera_frames()


# --------------------------------------------------------------------------- learning loop

# Training runs ask for a GPU node on Kubernetes (roadloop.run_placement; ignored locally).
learning_loop_job = dg.define_asset_job(
    "learning_loop",
    selection=dg.AssetSelection.assets(*LOOP_ASSETS),
    description="Curate → train → export → quantize → benchmark → (gated) promote.",
    tags=TRAINING_RUN_TAGS,
)

federated_learning_loop_job = dg.define_asset_job(
    "federated_learning_loop",
    selection=dg.AssetSelection.assets(*LOOP_ASSETS) - dg.AssetSelection.assets(curated_dataset),
    config={"ops": {"trained_model": {"config": {"source": "federated"}}}},
    tags=TRAINING_RUN_TAGS,
    description="Federate across camera sites (Flower) → export → quantize → benchmark → "
    "(gated) promote: the same gates as learning_loop; the curated dataset is the held-out set.",
)

nightly_benchmark_job = dg.define_asset_job(
    "nightly_benchmark_job",
    selection=dg.AssetSelection.assets(benchmark_report),
    description="Re-run the benchmark report and its promotion checks.",
)

# --------------------------------------------------------------------------- labeling

review_queue_job = dg.define_asset_job(
    "review_queue",
    selection=dg.AssetSelection.assets(frame_embeddings, active_learning_queue),
    description="Score the cameras' unreviewed frames and push the next review batch to FiftyOne.",
)

review_import_job = dg.define_asset_job(
    "review_import",
    selection=dg.AssetSelection.assets(reviewed_labels, curated_dataset),
    description="Import annotators' reviews from FiftyOne and cut a new curated dataset version.",
)

# --------------------------------------------------------------------------- deployment

# model_rollout needs the fleet gateway, so it is not part of learning_loop.
model_rollout_job = dg.define_asset_job(
    "model_rollout_job",
    selection=dg.AssetSelection.assets(model_rollout),
    description="Publish the production version to the fleet as a signed, staged rollout.",
)

# --------------------------------------------------------------------------- monitoring

camera_drift_job = dg.define_asset_job(
    "camera_drift_job",
    selection=dg.AssetSelection.assets(camera_drift),
    partitions_def=camera_window_partitions,
    description="Score one camera window for drift (drift_window_sensor starts one per closed window).",
)

camera_accuracy_job = dg.define_asset_job(
    "camera_accuracy_job",
    selection=dg.AssetSelection.assets(camera_accuracy),
    partitions_def=camera_partitions,
    description="Measure the serving model on one camera's reviewed frames (camera_accuracy_sensor "
    "starts one per reviewed camera after each review import).",
)

# --------------------------------------------------------------------------- traffic

traffic_counts_job = dg.define_asset_job(
    "traffic_counts_job",
    selection=dg.AssetSelection.assets(traffic_counts),
    partitions_def=traffic_day_partitions,
    description="Write the operator's daily traffic report of one UTC day (traffic_counts).",
)

ALL_JOBS = [
    replay_ingestion_job,
    sampled_edge_frames_job,
    learning_loop_job,
    federated_learning_loop_job,
    nightly_benchmark_job,
    review_queue_job,
    review_import_job,
    model_rollout_job,
    camera_drift_job,
    camera_accuracy_job,
    traffic_counts_job,
    retention_job,
    erasure_job,
]

__all__ = [
    "ALL_JOBS",
    "camera_accuracy_job",
    "camera_drift_job",
    "erasure_job",
    "federated_learning_loop_job",
    "learning_loop_job",
    "model_rollout_job",
    "nightly_benchmark_job",
    "replay_ingestion_job",
    "retention_job",
    "review_import_job",
    "review_queue_job",
    "sampled_edge_frames_job",
    "traffic_counts_job",
]
