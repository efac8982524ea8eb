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

GATES = ("candidate_not_worse_than_production", "int8_accuracy_drop", "int8_accuracy_drop_per_shape",
         "p95_latency_within_budget", "model_meets_quality_floor")


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
    from resources import TINY_COUNTING, BenchmarkResource, TrainerResource, build_resources
    from roadloop.data.versioning import DvcStore
    from roadloop.fsutil import sha256_file
    from roadloop.models.mlflow_model import PENDING
    from roadloop.models.tracking import Tracker
    from roadloop.settings import get_settings

    settings = get_settings()
    resources = build_resources(settings, profile="test")
    instance = dg.DagsterInstance.ephemeral()

    # 1st turn: no production model yet -> every gate passes -> promoted.
    first = _materialize(resources, instance)
    evaluations = {e.check_name: e for e in first.get_asset_check_evaluations()}
    # Every check passes, the blocking gates too (no production model to compare with, a 60 s
    # latency budget, the INT8 drop within the test profile's limits): production_model runs.
    failed = {n: e.description for n, e in evaluations.items() if not e.passed}
    assert not failed, failed
    assert first.success, [e.message for e in first.all_events if e.is_failure]
    assert set(evaluations) >= set(GATES)  # besides the curated dataset's checks
    materialized = {e.asset_key.to_user_string() for e in first.get_asset_materialization_events()}
    assert materialized == {
        "curated_dataset", "trained_model", "onnx_model", "quantized_model", "benchmark_report", "production_model",
    }
    tracker = Tracker(str(settings.mlflow_tracking_uri), settings.mlflow_experiment, settings.mlflow_artifact_root)
    name = settings.registered_model_name
    candidate = tracker.version_by_alias(name, "candidate")
    assert candidate is not None and candidate.version == "1"
    # MLflow: a logged model linked to its report and checks; the real start checkpoint; the
    # benchmark of every format on the run.
    version = tracker.client.get_model_version(name, "1")
    assert version.source.startswith("models:/") and version.tags["checks"] == "passed"
    assert version.tags["benchmark_report"].endswith(".html")
    assert PENDING not in version.description
    assert "promotion checks all passed" in version.description
    params = tracker.client.get_run(candidate.run_id).data.params
    assert "model" not in params
    assert params["start_checkpoint_sha256"] == sha256_file(Path(params["start_checkpoint"]))
    assert {"bench/pytorch/map50", "bench/fp32/map50", "bench/int8/map50",
            "bench/fp32/latency_b1_p95_ms"} <= set(tracker.run_metrics(candidate.run_id))

    # DVC: the version in the metadata restores byte-identically from the remote.
    curated = first.asset_value("curated_dataset")
    restored = DvcStore(Path(str(settings.dvc_repo)), str(settings.dvc_remote_url)).restore(
        curated.version.md5, tmp_path / "restored"
    )
    assert _tree_digest(restored) == _tree_digest(curated.dataset.path)

    # ONNX files load and run in onnxruntime, at every exported shape (the test profile: the
    # square 96x96 and the 16:9 rectangle 64x96), fp32 and INT8.
    imgsz = first.asset_value("onnx_model").info.imgsz
    shapes = {"96x96": (imgsz, imgsz), "64x96": (64, 96)}
    assert list(first.asset_value("onnx_model").shapes()) == list(shapes)
    assert list(first.asset_value("quantized_model").variants) == ["64x96"]
    for asset_key in ("onnx_model", "quantized_model"):
        value = first.asset_value(asset_key)
        for label, info in {"96x96": value.info, **value.variants}.items():
            session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
            inp = session.get_inputs()[0]
            out = session.run(None, {inp.name: np.zeros((2, 3, *shapes[label]), np.float32)})
            assert out[0].shape[:2] == (2, 4 + 5)  # batch, box + 5 taxonomy classes

    # The report exists with numbers in range.
    report = first.asset_value("benchmark_report")
    assert report.html.exists() and report.markdown.exists()
    assert "<img" in report.html.read_text()
    # The UI's view of it: numbers the Plots tab can draw, the HTML in the MLflow UI.
    meta = next(e.materialization for e in first.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "benchmark_report").metadata
    assert isinstance(meta["map50_95"], dg.FloatMetadataValue)
    assert isinstance(meta["test_sets"], dg.TableMetadataValue)
    run_id = first.asset_value("trained_model").run_id
    url = meta["html_report"].value
    assert url.startswith(resources["mlflow"].ui_url) and run_id in url
    assert url.endswith("/artifactPath/reports/benchmark_report.html")
    logged = tracker.download(run_id, "reports/benchmark_report.html", tmp_path / "logged")
    assert logged.read_text() == report.html.read_text()
    results = json.loads(report.results_json.read_text())
    assert results
    from roadloop.evaluation.results import BenchmarkResults

    parsed = BenchmarkResults.model_validate_json(report.results_json.read_text())
    for fmt in ("pytorch", "onnx_fp32", "onnx_int8"):
        metrics = parsed.get("candidate", fmt, "all")
        assert metrics is not None
        assert 0.0 <= metrics.map50_95 <= metrics.map50 <= 1.0
        # A mean over the frames of whole-box count differences, at most the per-class sum.
        n = metrics.n_images
        assert n > 0 and metrics.count_mae * n == pytest.approx(round(metrics.count_mae * n))
        assert 0.0 <= metrics.count_mae <= sum(metrics.per_class_count_mae.values()) + 1e-9

    # The INT8 gate judged this candidate's measured numbers, and its verdict follows them.
    int8_check = evaluations["int8_accuracy_drop"]
    measured = {k: v.value for k, v in int8_check.metadata.items()}
    reference = parsed.get("candidate", measured["reference_format"], "all")
    int8 = parsed.get("candidate", "onnx_int8", "all")
    assert measured["reference_format"] == "onnx_fp32"
    assert reference is not None and int8 is not None
    assert measured["max_drop_points"] == resources["benchmark"].max_int8_drop_points
    assert measured["reference_map50_95"] == pytest.approx(reference.map50_95)
    assert measured["int8_map50_95"] == pytest.approx(int8.map50_95)
    assert measured["drop_points"] == pytest.approx((reference.map50_95 - int8.map50_95) * 100)
    assert measured["max_drop_pct"] == resources["benchmark"].max_int8_drop_pct
    assert int8_check.passed == (
        measured["drop_points"] <= measured["max_drop_points"] + 1e-9
        and measured["relative_drop_pct"] <= measured["max_drop_pct"] + 1e-9
        and measured["classes_failed"] == "none"
    )

    # Every shape has its report row and its own INT8 gate, which the per-shape check reads.
    assert [r.shape for r in parsed.shape_rows] == list(shapes)
    assert "Input shapes" in report.markdown.read_text()
    shape_gates = {g.name: g.passed for g in report.gates if "@" in g.name}
    assert shape_gates == {f"int8_drop@{k}": r.gate_passed
                           for k, r in zip(shapes, parsed.shape_rows, strict=True)}
    assert evaluations["int8_accuracy_drop_per_shape"].passed == all(shape_gates.values())

    prod = tracker.version_by_alias(name, "production")
    assert prod is not None and prod.version == "1"

    # 2nd turn with an impossible latency budget: the blocking check fails and
    # production_model does not run, so the `production` alias does not move. Square only
    # (ROADLOOP_EXPORT_SHAPES=square): no variants, and the per-shape check has nothing to add.
    resources["trainer"] = TrainerResource(**{**resources["trainer"].model_dump(),
                                              "export_shapes": ["square"]})
    resources["benchmark"] = BenchmarkResource(
        warmup=1, runs=3, batch_sizes=[1], slices=["blur"], calibration_frames=4,
        p95_latency_budget_ms=0.001, max_int8_drop_points=100.0, max_int8_drop_pct=100.0,
        int8_class_max_drop_points=100.0, int8_class_max_drop_pct=100.0,
        max_regression_map50_95=1.0, min_map50=0.0, min_class_ap50=0.0,
        **TINY_COUNTING,
    )
    second = _materialize(resources, instance)
    checks2 = {e.check_name: e.passed for e in second.get_asset_check_evaluations()}
    # 100-point / 100 % INT8 limits, a 1.0 mAP tolerance and a zero floor cannot fail; the
    # latency budget must.
    assert {n: checks2.get(n) for n in GATES} == {
        "candidate_not_worse_than_production": True,
        "int8_accuracy_drop": True,
        "int8_accuracy_drop_per_shape": True,
        "p95_latency_within_budget": False,
        "model_meets_quality_floor": True,
    }
    assert second.asset_value("onnx_model").variants == {}
    second_json = second.asset_value("benchmark_report").results_json.read_text()
    assert BenchmarkResults.model_validate_json(second_json).shape_rows == []
    assert all(passed for n, passed in checks2.items() if n not in GATES), checks2
    assert "production_model" not in {
        e.asset_key.to_user_string() for e in second.get_asset_materialization_events()
    }
    assert tracker.version_by_alias(name, "candidate").version == "2"
    prod_after = tracker.version_by_alias(name, "production")
    assert prod_after is not None and prod_after.version == prod.version
    # The candidate was compared against the production model from MLflow.
    assert second.asset_value("benchmark_report").production_version == prod.version

    # The demo's before/after table from this home: the start checkpoint (scored once on the
    # production report's test sets), production v1 and candidate v2 from their own reports.
    from launch.demo_before_after import demo_before_after
    from roadloop.evaluation.before_after import BeforeAfterTable, render_text
    from roadloop.models.training import resolve_start_weights

    train_config = resources["trainer"].train_config()
    built = demo_before_after(settings, train_config, production=prod.version, candidate="2")
    assert built is not None
    table, json_path, md_path = built
    assert BeforeAfterTable.model_validate_json(json_path.read_text()) == table
    assert md_path.read_text().count("| all |") == 3
    first_report = BenchmarkResults.model_validate_json(report.results_json.read_text())
    assert table.test_sets[-1] == "all" and set(table.test_sets) == (
        set(first_report.test_sets_of_kind("source")) | {"all"}
    )
    start_name = Path(resolve_start_weights(train_config).path_or_name).name
    for ts in table.test_sets:
        start, production = table.row("start", ts), table.row("production", ts)
        assert start is not None and start.model == start_name
        assert production is not None and table.row("candidate", ts) is not None
        # Production's figures are its own report's; every row saw the same frames.
        assert production.map50_95 == first_report.get("candidate", "pytorch", ts).map50_95
        assert start.n_images == production.n_images
        assert 0.0 <= start.map50_95 <= start.map50 <= 1.0
    assert table.start_eval_seconds is not None and table.imgsz == imgsz
    assert any(start_name in line for line in render_text(table))
    # The shared checkpoints have atl_v2's classes: the taxonomy's person is new to them.
    if start_name.startswith("atl_v2_"):
        assert any("never had person" in note for note in table.notes), table.notes
