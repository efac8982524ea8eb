"""Guards of the model lifecycle (train -> export -> quantize -> benchmark -> promote -> roll
out): each asset refuses inputs that belong to another model version or to other bytes, and
the gates fail closed on figures that are not finite numbers.

The real asset functions run on stub records, tiny files and a throw-away MLflow store; the
benchmark itself is never run (a stub stops ``benchmark_report`` where it would start)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest
from pydantic import ValidationError

from assets.records import (
    BenchmarkReportFiles,
    CuratedDatasetVersion,
    OnnxModelVersion,
    QuantizedModelVersion,
    TrainedModelVersion,
)
from resources import ArtifactStoreResource, BenchmarkResource, MlflowResource
from resources.fleet_resource import FleetResource
from roadloop.errors import InvalidInputError
from roadloop.evaluation.gates import (
    GateConfig,
    GateOutcome,
    check_candidate_vs_production,
    check_int8_drop,
    check_latency_budget,
    check_minimum_quality,
    int8_class_drops,
)
from roadloop.evaluation.results import BenchmarkResults, DetectionMetrics
from roadloop.models.export import OnnxModelInfo
from roadloop.models.quantize import QuantConfig, QuantizedModelInfo
from roadloop.models.tracking import PRODUCTION_ALIAS
from roadloop.release.signing import build_manifest

from .test_int8_gate import _m, _results
from .test_report_gates import make_results
from .test_rollouts import CLASSES

NAN = math.nan
GATES_PASSED = [GateOutcome(name=n, passed=True, description="ok") for n in
                ("candidate_vs_production", "int8_drop", "latency_budget", "minimum_quality")]


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> MlflowResource:
    root = tmp_path_factory.mktemp("lifecycle-mlflow")
    return MlflowResource(tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                          artifact_root=str(root / "mlruns"))


def _register(mlflow: MlflowResource, name: str, tmp: Path, **tags: str) -> TrainedModelVersion:
    """A new registry version of ``name`` (tagged as given) and its trained_model record."""
    tracker = mlflow.tracker()
    run_id = tracker.start_run("lifecycle")
    mv = tracker.register_version(name, run_id, "weights")
    tracker.end_run(run_id)
    if tags:
        tracker.tag_version(name, mv.version, tags)
    return TrainedModelVersion(registered_name=name, model_version=mv.version, run_id=run_id,
                               weights=tmp / "best.pt", imgsz=320, class_names=CLASSES,
                               dataset_md5="x")


def _report(version: str, tmp: Path) -> BenchmarkReportFiles:
    return BenchmarkReportFiles(candidate_version=version, production_version=None,
                                results_json=tmp / "r.json", html=tmp / "r.html",
                                markdown=tmp / "r.md", gates=GATES_PASSED)


def _promote(report: BenchmarkReportFiles, trained: TrainedModelVersion,
             mlflow: MlflowResource) -> dg.MaterializeResult:
    from assets.evaluation import production_model

    return production_model(context=dg.build_asset_context(), benchmark_report=report,
                            trained_model=trained, mlflow=mlflow)


def _production(mlflow: MlflowResource, name: str) -> str | None:
    prod = mlflow.tracker().version_by_alias(name, PRODUCTION_ALIAS)
    return prod.version if prod else None


# =========================================================================== production_model
def test_production_model_refuses_a_report_about_another_version(
        mlflow: MlflowResource, tmp_path: Path) -> None:
    name = "lc-report-version"
    v1 = _register(mlflow, name, tmp_path, checks="passed")
    v2 = _register(mlflow, name, tmp_path, checks="passed")
    # The latest report judged v1 (e.g. v2's onnx_model failed before its own report).
    with pytest.raises(dg.Failure, match=rf"v{v2.model_version}.*judged v{v1.model_version}"):
        _promote(_report(v1.model_version, tmp_path), v2, mlflow)
    assert _production(mlflow, name) is None


@pytest.mark.parametrize("tag", [None, "failed"])
def test_production_model_requires_the_registry_checks_tag_passed(
        mlflow: MlflowResource, tmp_path: Path, tag: str | None) -> None:
    name = f"lc-checks-{tag}"
    trained = _register(mlflow, name, tmp_path, **({"checks": tag} if tag else {}))
    with pytest.raises(dg.Failure, match=f"checks is {tag or 'unset'}"):
        _promote(_report(trained.model_version, tmp_path), trained, mlflow)
    assert _production(mlflow, name) is None


def test_production_model_promotes_a_consistent_passed_version(
        mlflow: MlflowResource, tmp_path: Path) -> None:
    name = "lc-promote"
    trained = _register(mlflow, name, tmp_path, checks="passed")
    out = _promote(_report(trained.model_version, tmp_path), trained, mlflow)
    assert out.metadata["production_version"] == trained.model_version
    assert _production(mlflow, name) == trained.model_version


# =========================================================================== benchmark_report
class _BenchmarkStarted(Exception):
    pass


def _onnx(version: str, folder: Path) -> OnnxModelVersion:
    return OnnxModelVersion(model_version=version, run_id=f"r{version}", info=OnnxModelInfo(
        path=folder / "model.onnx", sha256="a" * 64, size_bytes=1, input_name="images",
        input_shape=["batch", 3, 320, 320], output_shape=["batch", 9, 2100], imgsz=320,
        class_names=CLASSES, opset=17))


def _quantized(version: str, path: Path, variants: dict[str, Path] | None = None,
               sha256: str | None = None) -> QuantizedModelVersion:
    def info(p: Path, sha: str | None = None) -> QuantizedModelInfo:
        digest = sha or (hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "b" * 64)
        return QuantizedModelInfo(
            path=p, sha256=digest, size_bytes=1, fp32_path=p.with_suffix(".fp32.onnx"),
            fp32_sha256="a" * 64, excluded_nodes=0, quantized_nodes=0, calibration_frames=1,
            config=QuantConfig())

    return QuantizedModelVersion(
        model_version=version, run_id=f"r{version}", info=info(path, sha256),
        variants={label: info(p) for label, p in (variants or {}).items()})


def _run_benchmark_report(monkeypatch: pytest.MonkeyPatch, tmp: Path, mlflow: MlflowResource,
                          trained: str, onnx: str, quantized: str) -> dict[str, Any]:
    """Run the real asset; returns the models it would have benchmarked (a stub stops it)."""
    import assets.evaluation as ev

    seen: dict[str, Any] = {}

    def fake_benchmark(models: dict[str, Any], *_a: Any, **_k: Any) -> None:
        seen.update(models)
        raise _BenchmarkStarted

    monkeypatch.setattr(ev, "run_benchmark", fake_benchmark)
    monkeypatch.setattr(ev, "split_by_source", lambda *a, **k: {"all": tmp})
    monkeypatch.setattr(ev, "make_robustness_slices", lambda *a, **k: {})
    monkeypatch.setattr(ev, "_production_model_set", lambda *a, **k: None)
    dataset = CuratedDatasetVersion.model_construct(
        dataset=SimpleNamespace(path=tmp), version=SimpleNamespace(md5="x"),
        data_yaml=tmp / "data.yaml")
    model = TrainedModelVersion(registered_name="lc-bench", model_version=trained, run_id="r",
                                weights=tmp / trained / "best.pt", imgsz=320,
                                class_names=CLASSES, dataset_md5="x")
    with pytest.raises(_BenchmarkStarted):
        ev.benchmark_report(
            context=dg.build_asset_context(), curated_dataset=dataset, trained_model=model,
            onnx_model=_onnx(onnx, tmp / onnx),
            quantized_model=_quantized(quantized, tmp / quantized / "model.int8.onnx"),
            benchmark=BenchmarkResource(), mlflow=mlflow,
            artifacts=ArtifactStoreResource(root=str(tmp / "artifacts")))
    return seen


@pytest.mark.parametrize(("onnx", "quantized"), [("2", "3"), ("3", "2"), ("2", "2")])
def test_benchmark_report_refuses_onnx_or_int8_of_another_version(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mlflow: MlflowResource,
        onnx: str, quantized: str) -> None:
    # nightly_benchmark_job materializes benchmark_report alone: onnx_model/quantized_model
    # may still be an older version's.
    with pytest.raises(dg.Failure, match=r"cannot benchmark v3: .*v2, not v3"):
        _run_benchmark_report(monkeypatch, tmp_path, mlflow, "3", onnx, quantized)
    assert not (tmp_path / "artifacts" / "benchmarks").exists()  # refused up front


def test_benchmark_report_benchmarks_one_version_s_files(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mlflow: MlflowResource) -> None:
    seen = _run_benchmark_report(monkeypatch, tmp_path, mlflow, "3", "3", "3")
    cand = seen["candidate"]
    assert cand.version == "3"
    assert {cand.onnx_fp32.parent.name, cand.onnx_int8.parent.name} == {"3"}


# =========================================================================== model_rollout
class _StubFleet(FleetResource):
    """The real publish (manifest built and signed here); the gateway's answers stubbed."""

    def _request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        calls = Path(self.key_dir or ".") / "calls.txt"
        with calls.open("a") as f:
            f.write(path + "\n")
        if path == "/v1/models":
            return {"ok": True}
        return {"rollout_id": "ro-1", "status": "running", "stage": "shadow", "percent": 0,
                "cohort_size": 0, "devices": 0, "stages": [], "hold_seconds": 1}


class _RacingFleet(_StubFleet):
    """Rewrites the INT8 file as publish starts: after model_rollout's check, before hashing."""

    def publish(self, model_version: str, onnx_path: str | Path, *a: Any, **k: Any) -> dict[str, Any]:
        Path(onnx_path).write_bytes(b"rewritten while publishing")
        return super().publish(model_version, onnx_path, *a, **k)


def _calls(keys: Path) -> list[str]:
    f = keys / "calls.txt"
    return f.read_text().split() if f.exists() else []


@pytest.fixture()
def promoted(mlflow: MlflowResource, tmp_path: Path) -> tuple[TrainedModelVersion, Path, Path]:
    """A production version with its INT8 file and a 192x320 variant (recorded hashes real)."""
    name = f"lc-rollout-{tmp_path.name}"[:60]
    trained = _register(mlflow, name, tmp_path, checks="passed")
    mlflow.tracker().set_alias(name, PRODUCTION_ALIAS, trained.model_version)
    square = tmp_path / "model.int8.onnx"
    square.write_bytes(b"evaluated square bytes")
    wide = tmp_path / "model.192x320.int8.onnx"
    wide.write_bytes(b"evaluated wide bytes")
    return trained, square, wide


def _roll_out(trained: TrainedModelVersion, quant: QuantizedModelVersion, fleet: FleetResource,
              mlflow: MlflowResource) -> dg.MaterializeResult:
    from assets.rollout import model_rollout

    return model_rollout(context=dg.build_asset_context(), quantized_model=quant,
                         trained_model=trained, fleet=fleet, mlflow=mlflow)


@pytest.mark.parametrize("changed", ["square", "variant"])
def test_model_rollout_refuses_bytes_other_than_the_quantized_ones(
        promoted: tuple[TrainedModelVersion, Path, Path], mlflow: MlflowResource,
        tmp_path: Path, changed: str) -> None:
    trained, square, wide = promoted
    quant = _quantized(trained.model_version, square, {"192x320": wide})
    (square if changed == "square" else wide).write_bytes(b"other bytes written later")
    keys = tmp_path / "keys"
    fleet = _StubFleet(gateway_url="http://127.0.0.1:9", admin_token="x", key_dir=str(keys))
    with pytest.raises(dg.Failure, match="not the .* quantized_model recorded"):
        _roll_out(trained, quant, fleet, mlflow)
    assert _calls(keys) == []  # nothing published


def test_model_rollout_refuses_a_file_changed_while_it_was_published(
        promoted: tuple[TrainedModelVersion, Path, Path], mlflow: MlflowResource,
        tmp_path: Path) -> None:
    trained, square, wide = promoted
    quant = _quantized(trained.model_version, square, {"192x320": wide})
    keys = tmp_path / "keys"
    fleet = _RacingFleet(gateway_url="http://127.0.0.1:9", admin_token="x", key_dir=str(keys))
    with pytest.raises(dg.Failure, match="the file changed since it was made; nothing was published"):
        _roll_out(trained, quant, fleet, mlflow)
    assert _calls(keys) == []  # nothing signed, uploaded or rolled out


def test_model_rollout_signs_the_recorded_hashes(
        promoted: tuple[TrainedModelVersion, Path, Path], mlflow: MlflowResource,
        tmp_path: Path) -> None:
    trained, square, wide = promoted
    quant = _quantized(trained.model_version, square, {"192x320": wide})
    keys = tmp_path / "keys"
    fleet = _StubFleet(gateway_url="http://127.0.0.1:9", admin_token="x", key_dir=str(keys))
    out = _roll_out(trained, quant, fleet, mlflow)
    assert out.metadata["model_sha256"] == quant.info.sha256
    assert _calls(keys) == ["/v1/models", "/v1/rollouts"]


def test_build_manifest_checks_expected_hashes(tmp_path: Path) -> None:
    square, wide = tmp_path / "m.onnx", tmp_path / "w.onnx"
    square.write_bytes(b"square")
    wide.write_bytes(b"wide")
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (square, wide)}
    kw: dict[str, Any] = {"input_shape": (320, 320), "variants": {(192, 320): wide}}
    ok = build_manifest("1", square, 320, CLASSES, expected_sha256=sha[square],
                        expected_variant_sha256={(192, 320): sha[wide]}, **kw)
    assert ok["sha256"] == sha[square] and ok["variants"][0]["sha256"] == sha[wide]
    with pytest.raises(InvalidInputError, match="not the expected"):
        build_manifest("1", square, 320, CLASSES, expected_sha256=sha[wide], **kw)
    with pytest.raises(InvalidInputError, match="not the expected"):
        build_manifest("1", square, 320, CLASSES, expected_sha256=sha[square],
                       expected_variant_sha256={(192, 320): sha[square]}, **kw)
    with pytest.raises(ValueError, match="no expected SHA-256"):
        build_manifest("1", square, 320, CLASSES, expected_variant_sha256={}, **kw)


# =========================================================================== NaN figures
def _with(m: DetectionMetrics, **update: Any) -> DetectionMetrics:
    """``m`` with figures the model would refuse (as results written before it refused them)."""
    return m.model_copy(update=update)


@pytest.mark.parametrize("case", ["int8_overall_and_class", "int8_class_only", "reference"])
def test_int8_gate_cannot_judge_nan(case: str) -> None:
    ref, int8 = _m({"car": 0.30, "truck": 0.20}), _m({"car": 0.30, "truck": 0.20})
    if case == "int8_overall_and_class":
        int8 = _with(int8, map50_95=NAN, per_class_ap50_95={"car": NAN, "truck": NAN})
    elif case == "int8_class_only":
        int8 = _with(int8, per_class_ap50_95={"car": NAN, "truck": 0.20})
    else:  # a NaN reference used to read as "0 % lost"
        ref = _with(ref, map50_95=NAN, per_class_ap50_95={"car": NAN, "truck": NAN})
        int8 = _with(int8, map50_95=0.0, per_class_ap50_95={"car": 0.0, "truck": 0.0})
    out = check_int8_drop(_results(ref, int8), GateConfig())
    assert not out.passed
    assert out.description.startswith("Cannot judge quantization") and "nan" in out.description
    assert all(not isinstance(v, float) or math.isfinite(v) for v in out.measured.values())


def test_int8_class_drops_fail_a_gated_nan_class() -> None:
    rows = int8_class_drops(_m({"car": 0.30}), _with(_m({"car": 0.30}), per_class_ap50_95={"car": NAN}),
                            GateConfig())
    assert rows[0]["gated"] and rows[0]["failed"]


@pytest.mark.parametrize("figure", ["map50", "class_ap50", "thin_class_ap50"])
def test_quality_floor_cannot_judge_nan(figure: str) -> None:
    res = make_results()
    row = next(r for r in res.rows
               if (r.model, r.format, r.test_set) == ("candidate", "onnx_int8", "all"))
    row.metrics.per_class_instances = {"car": 289, "truck": 16, "two_wheeler": 2, "person": 30}
    if figure == "map50":
        row.metrics.map50 = NAN
    else:
        row.metrics.per_class_ap50 = {**row.metrics.per_class_ap50,
                                      ("car" if figure == "class_ap50" else "two_wheeler"): NAN}
    out = check_minimum_quality(res, GateConfig())
    assert not out.passed and out.description.startswith("Cannot judge quality")


def test_candidate_vs_production_cannot_judge_nan() -> None:
    res = make_results(prod={"onnx_int8": 0.30})
    row = next(r for r in res.rows
               if (r.model, r.format, r.test_set) == ("production", "onnx_int8", "all"))
    row.metrics.map50_95 = NAN
    out = check_candidate_vs_production(res, GateConfig())
    assert not out.passed and out.description.startswith("Cannot judge the comparison")


def test_latency_gate_cannot_judge_nan() -> None:
    res = make_results()
    row = next(r for r in res.latency_rows
               if (r.model, r.format, r.stats.batch) == ("candidate", "onnx_int8", 1))
    row.stats.p95_ms = NAN
    out = check_latency_budget(res, GateConfig())
    assert not out.passed and out.description.startswith("Cannot judge latency")


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
def test_detection_metrics_refuse_non_finite_figures(bad: float) -> None:
    good = _m({"car": 0.30}).model_dump()
    with pytest.raises(ValidationError):
        DetectionMetrics(**{**good, "map50_95": bad})
    with pytest.raises(ValidationError):
        DetectionMetrics(**{**good, "per_class_ap50": {"car": bad}})
    # Finite results still round-trip through the report's JSON.
    res = _results(_m({"car": 0.30}), _m({"car": 0.29}))
    assert BenchmarkResults.model_validate_json(res.model_dump_json()) == res
