"""What MLflow shows for a training run: the classical-ML experiment layout, a registry
version that is a logged model with a signature and a description naming its report and
checks, the checkpoint training really started from, and benchmark metrics of every format.
One sqlite store for the module (creating one runs MLflow's migrations)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
from mlflow.models import get_model_info

from roadloop.evaluation.results import (
    BenchmarkResults,
    DetectionMetrics,
    LatencyConfig,
    LatencyRow,
    LatencyStats,
    MetricsRow,
    ModelSet,
)
from roadloop.evaluation.tracked_metrics import benchmark_metrics
from roadloop.models.mlflow_model import (
    PENDING,
    candidate_description,
    checks_description,
    detector_signature,
    start_checkpoint_params,
)
from roadloop.models.tracking import CLASSICAL_ML_KIND, EXPERIMENT_KIND_TAG, Tracker

NAME = "detector-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


def test_experiment_is_marked_classical_ml_new_or_existing(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "kind-new", artifacts)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] \
        == CLASSICAL_ML_KIND
    old = tracker.client.create_experiment("kind-old")  # made before the tag existed
    assert EXPERIMENT_KIND_TAG not in tracker.client.get_experiment(old).tags
    Tracker(uri, "kind-old", artifacts)
    assert tracker.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == CLASSICAL_ML_KIND


def test_registered_version_is_a_model_with_signature_description_and_links(
        store: tuple[str, Path], tmp_path: Path) -> None:
    uri, artifacts = store
    tracker = Tracker(uri, "registry", artifacts)
    run_id = tracker.start_run("train-x")
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"not a real checkpoint: the model is logged, never loaded here")
    tags = {"dataset_md5": "abc", "imgsz": "320", "dagster_run_id": "dg-run-1"}
    before = mlflow.get_tracking_uri()
    version = tracker.register_checkpoint_model(
        NAME, run_id, weights, imgsz=320, tags=tags,
        description=candidate_description(run_id, tags, {"mAP50": 0.5}))
    tracker.end_run(run_id)
    assert mlflow.get_tracking_uri() == before  # the fluent API's URI was put back

    mv = tracker.client.get_model_version(NAME, version.version)
    assert mv.run_id == run_id and mv.source.startswith("models:/")
    assert {k: mv.tags[k] for k in tags} == tags
    assert run_id in mv.description and "dg-run-1" in mv.description and PENDING in mv.description
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        info = get_model_info(f"models:/{NAME}/{version.version}")
    finally:
        mlflow.set_tracking_uri(before)
    assert info.signature == detector_signature()
    assert info.flavors.get("python_function") is not None

    gates = [("int8_accuracy_drop", True, "drop 0.01"), ("p95_latency", False, "p95 90 ms")]
    tracker.describe_version(NAME, version.version, checks_description(
        tracker.version_description(NAME, version.version), "file:///r/report.html", "dg-2",
        gates))
    described = tracker.version_description(NAME, version.version)
    assert PENDING not in described and run_id in described
    assert "file:///r/report.html" in described and "FAILED" in described
    assert "- p95_latency: FAIL (p95 90 ms)" in described
    # Gate names carry a shape (int8_drop@192x320): MLflow refuses '@' in a key.
    tracker.tag_version(NAME, version.version, {"check.int8_drop@192x320": "pass"})
    assert tracker.client.get_model_version(NAME, version.version).tags[
        "check.int8_drop_192x320"] == "pass"


def test_start_checkpoint_params_name_the_file_and_its_sha256(tmp_path: Path) -> None:
    start = tmp_path / "atl_v2.pt"
    start.write_bytes(b"weights" * 100)
    params = start_checkpoint_params(str(start), "checkpoint")
    assert params == {"start_checkpoint": str(start), "start_checkpoint_kind": "checkpoint",
                      "start_checkpoint_sha256": hashlib.sha256(start.read_bytes()).hexdigest()}
    scratch = start_checkpoint_params("yolo11n.yaml", "scratch")
    assert scratch["start_checkpoint_sha256"].startswith("none")


def _metrics(map50: float) -> DetectionMetrics:
    return DetectionMetrics(map50=map50, map50_95=map50 / 2, precision=0.6, recall=0.4,
                            f1=0.48, per_class_ap50={}, per_class_ap50_95={},
                            per_class_count_mae={}, count_mae=1.0, n_images=4)


def test_benchmark_metrics_cover_pytorch_fp32_and_int8_accuracy_and_latency() -> None:
    maps = {"pytorch": 0.61, "onnx_fp32": 0.60, "onnx_int8": 0.55}
    p95 = {"pytorch": 40.0, "onnx_fp32": 30.0, "onnx_int8": 20.0}
    results = BenchmarkResults(
        created_at=datetime.now(UTC).isoformat(), imgsz=320, split="test", conf=0.25,
        models={"candidate": ModelSet(version="1")}, test_sets=["all", "blur"],
        test_set_kinds={"all": "source", "blur": "robustness"}, latency_config=LatencyConfig(),
        rows=[MetricsRow(model="candidate", version="1", format=f, test_set=t,
                         metrics=_metrics(m if t == "all" else 0.1))
              for f, m in maps.items() for t in ("all", "blur")],
        latency_rows=[LatencyRow(model="candidate", version="1", format=f, stats=LatencyStats(
            batch=1, p50_ms=v / 2, p95_ms=v, p99_ms=v, mean_ms=v / 2, frames_per_s=2000 / v,
            runs=5, warmup=1)) for f, v in p95.items()],
    )
    logged = benchmark_metrics(results)
    for fmt, short in (("pytorch", "pytorch"), ("onnx_fp32", "fp32"), ("onnx_int8", "int8")):
        assert logged[f"bench/{short}/map50"] == maps[fmt]
        assert logged[f"bench/{short}/map50_95"] == maps[fmt] / 2
        assert logged[f"bench/{short}/latency_b1_p95_ms"] == p95[fmt]
        assert logged[f"bench/{short}/latency_b1_fps"] == 2000 / p95[fmt]
    assert not any("count" in k for k in logged)  # no counting scene ran
