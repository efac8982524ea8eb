"""End to end: materialize the learning loop on tiny real data in a temporary home."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.e2e


def _tree_digest(root: Path) -> dict[str, str]:
    # Ultralytics drops *.cache label indexes beside the labels; DVC ignores them (.dvcignore).
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".cache"
    }


def _materialize(resources: dict, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    from assets import ALL_CHECKS, LOOP_ASSETS, seed_datasets

    return dg.materialize(
        [seed_datasets, *LOOP_ASSETS, *ALL_CHECKS],
        selection=dg.AssetSelection.assets(*LOOP_ASSETS),
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )


def test_learning_loop_end_to_end(roadloop_home: Path, shared_dir: Path, tmp_path: Path) -> None:
    from resources import BenchmarkResource, build_resources
    from roadloop.data.versioning import DvcStore
    from roadloop.models.tracking import Tracker
    from roadloop.settings import get_settings

    settings = get_settings()
    resources = build_resources(settings, profile="test")
    instance = dg.DagsterInstance.ephemeral()

    # 1st turn: no production model yet -> every gate passes -> promoted.
    first = _materialize(resources, instance)
    assert first.success, [e.message for e in first.all_events if e.is_failure]
    materialized = {e.asset_key.to_user_string() for e in first.get_asset_materialization_events()}
    assert materialized == {
        "curated_dataset", "trained_model", "onnx_model", "quantized_model", "benchmark_report", "production_model",
    }
    checks = {e.check_name: e.passed for e in first.get_asset_check_evaluations()}
    assert checks["int8_accuracy_drop"] in (True, False)  # measured; gate behaviour is tested below
    tracker = Tracker(str(settings.mlflow_tracking_uri), settings.mlflow_experiment, settings.mlflow_artifact_root)
    name = settings.registered_model_name
    candidate = tracker.version_by_alias(name, "candidate")
    assert candidate is not None and candidate.version == "1"

    # DVC: the version in the metadata restores byte-identically from the remote.
    curated = first.asset_value("curated_dataset")
    restored = DvcStore(Path(str(settings.dvc_repo)), str(settings.dvc_remote_url)).restore(
        curated.version.md5, tmp_path / "restored"
    )
    assert _tree_digest(restored) == _tree_digest(curated.dataset.path)

    # ONNX files load and run in onnxruntime.
    imgsz = first.asset_value("onnx_model").info.imgsz
    for asset_key in ("onnx_model", "quantized_model"):
        info = first.asset_value(asset_key).info
        session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        out = session.run(None, {inp.name: np.zeros((2, 3, imgsz, imgsz), np.float32)})
        assert out[0].shape[:2] == (2, 4 + 5)  # batch, box + 5 taxonomy classes

    # The report exists with numbers in range.
    report = first.asset_value("benchmark_report")
    assert report.html.exists() and report.markdown.exists()
    assert "<img" in report.html.read_text()
    results = json.loads(report.results_json.read_text())
    assert results
    from roadloop.evaluation.results import BenchmarkResults

    parsed = BenchmarkResults.model_validate_json(report.results_json.read_text())
    for fmt in ("pytorch", "onnx_fp32", "onnx_int8"):
        metrics = parsed.get("candidate", fmt, "all")
        assert metrics is not None
        assert 0.0 <= metrics.map50_95 <= metrics.map50 <= 1.0
        assert metrics.count_mae >= 0.0
    prod = tracker.version_by_alias(name, "production")
    if all(checks[c] for c in ("candidate_not_worse_than_production", "int8_accuracy_drop", "p95_latency_within_budget")):
        assert prod is not None and prod.version == "1"

    # 2nd turn with an impossible latency budget: the blocking check fails and
    # production_model does not run, so the `production` alias does not move.
    resources["benchmark"] = BenchmarkResource(
        warmup=1, runs=3, batch_sizes=[1], slices=["blur"], calibration_frames=4,
        p95_latency_budget_ms=0.001, max_int8_drop_points=100.0, max_regression_map50_95=1.0,
    )
    second = _materialize(resources, instance)
    checks2 = {e.check_name: e.passed for e in second.get_asset_check_evaluations()}
    assert checks2["p95_latency_within_budget"] is False
    assert "production_model" not in {
        e.asset_key.to_user_string() for e in second.get_asset_materialization_events()
    }
    assert tracker.version_by_alias(name, "candidate").version == "2"
    prod_after = tracker.version_by_alias(name, "production")
    assert (prod_after.version if prod_after else None) == (prod.version if prod else None)
    report2 = second.asset_value("benchmark_report")
    if prod is not None:  # the candidate was compared against the production model from MLflow
        assert report2.production_version == prod.version
