"""``benchmark_report`` with its blocking promotion checks, and ``production_model``."""

import logging
from pathlib import Path

import dagster as dg
from mlflow.exceptions import MlflowException

from resources import ArtifactStoreResource, BenchmarkResource, MlflowResource
from roadloop.evaluation.benchmark import benchmark as run_benchmark
from roadloop.evaluation.gates import (
    GateOutcome,
    check_candidate_vs_production,
    check_int8_drop,
    check_latency_budget,
    check_minimum_quality,
    evaluate_all_gates,
)
from roadloop.evaluation.report import HTML_NAME, TrainingProfile, render_report
from roadloop.evaluation.results import BenchmarkResults, LatencyConfig, ModelSet
from roadloop.evaluation.shape_accuracy import benchmark_shapes
from roadloop.evaluation.testsets import ALL, make_robustness_slices, split_by_source
from roadloop.evaluation.tracked_metrics import benchmark_metrics
from roadloop.models.export import shape_label
from roadloop.models.mlflow_model import checks_description
from roadloop.models.tracking import PRODUCTION_ALIAS, Tracker
from roadloop.settings import get_settings

from . import groups
from .records import (
    BenchmarkReportFiles,
    CuratedDatasetVersion,
    OnnxModelVersion,
    QuantizedModelVersion,
    TrainedModelVersion,
)
from .ui_metadata import benchmark_metadata, comparison_metadata, mlflow_artifact_url

_log = logging.getLogger(__name__)

SHAPE_GATE_PREFIX = "int8_drop@"  # gate_int8_per_shape's outcome names
PRODUCTION_ARTIFACTS = {"pytorch": "weights/best.pt", "onnx_fp32": "onnx/model.onnx", "onnx_int8": "onnx/model.int8.onnx"}


def _production_model_set(tracker: Tracker, name: str, candidate_version: str, cache: Path) -> ModelSet | None:
    """Fetch the current `production` version's files from MLflow (None if there is none)."""
    prod = tracker.version_by_alias(name, PRODUCTION_ALIAS)
    if prod is None or prod.version == candidate_version:
        return None
    files: dict[str, Path | None] = {}
    for fmt, artifact in PRODUCTION_ARTIFACTS.items():
        try:
            files[fmt] = tracker.download(prod.run_id, artifact, cache / prod.version)
        except (MlflowException, OSError) as exc:  # an older version may lack a format
            _log.warning("production v%s has no %s artifact (%s); the report says so",
                        prod.version, fmt, str(exc)[:200])
            files[fmt] = None
    return ModelSet(version=prod.version, **files)


def _training_profile(tracker: Tracker, run_id: str) -> tuple[TrainingProfile | None, str | None]:
    """How the candidate was trained (its run's params) and its MLflow experiment id."""
    try:
        run = tracker.client.get_run(run_id)
    except MlflowException as exc:
        _log.warning("cannot read training run %s (%s): the report omits its profile", run_id, exc)
        return None, None
    source = run.data.tags.get("roadloop.source", "central")
    profile = TrainingProfile.from_params(get_settings().profile, dict(run.data.params), source)
    return profile, run.info.experiment_id


@dg.asset(
    group_name=groups.EVALUATION,
    kinds={"onnx", "pytorch", "html"},
    description=(
        "Candidate vs current production on held-out test frames for PyTorch, ONNX fp32 and "
        "ONNX INT8: mAP, per-class AP, P/R/F1, count MAE, latency percentiles, robustness slices, "
        "and line-crossing counts on tracks in a synthetic scene (ONNX files, the agent's counter)."
    ),
)
def benchmark_report(
    context: dg.AssetExecutionContext,
    curated_dataset: CuratedDatasetVersion,
    trained_model: TrainedModelVersion,
    onnx_model: OnnxModelVersion,
    quantized_model: QuantizedModelVersion,
    benchmark: BenchmarkResource,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[BenchmarkReportFiles]:
    version = trained_model.model_version
    # nightly_benchmark_job materializes this asset alone: the ONNX/INT8 inputs are whatever
    # onnx_model/quantized_model materialized last, which may be another version's files.
    stale = {name: v for name, v in (("onnx_model", onnx_model.model_version),
                                     ("quantized_model", quantized_model.model_version))
             if v != version}
    if stale:
        raise dg.Failure(
            f"cannot benchmark v{version}: "
            + ", ".join(f"{name} is v{v}" for name, v in stale.items())
            + f", not v{version} (materialize them for v{version} first)"
        )
    tracker = mlflow.tracker()
    work = artifacts.path("benchmarks", version)
    dataset_dir = curated_dataset.dataset.path

    test_sets: dict[str, Path] = {}
    test_sets.update(split_by_source(dataset_dir, "test", work / "test_sets"))
    if not benchmark.per_source:
        test_sets = {"all": test_sets["all"]}
    test_sets.update(make_robustness_slices(dataset_dir, "test", work / "slices", slices=benchmark.slices))

    models = {
        "candidate": ModelSet(
            version=version,
            pytorch=trained_model.weights,
            onnx_fp32=onnx_model.info.path,
            onnx_int8=quantized_model.info.path,
        )
    }
    production = _production_model_set(
        tracker, trained_model.registered_name, version, artifacts.path("production_cache")
    )
    if production is not None:
        models["production"] = production
        context.log.info(f"comparing candidate v{version} against production v{production.version}")
    else:
        context.log.info("no production model yet: the report covers the candidate alone")

    latency = LatencyConfig(
        warmup=benchmark.warmup, runs=benchmark.runs, batch_sizes=benchmark.batch_sizes, threads=benchmark.threads
    )
    results = run_benchmark(
        models,
        test_sets,
        imgsz=trained_model.imgsz,
        latency=latency,
        counting=benchmark.counting_config(),
        crop_dataset=dataset_dir,
    )
    gate_config = benchmark.gate_config()
    gates = evaluate_all_gates(results, gate_config)
    shape_files = _shape_files(onnx_model, quantized_model)
    if len(shape_files) > 1:  # square only: the rows above and int8_drop cover it
        results.shape_rows, shape_gates = benchmark_shapes(
            shape_files, test_sets[ALL], gate_config, version=version,
            latency=latency,
        )
        gates += shape_gates
    training, experiment_id = _training_profile(tracker, trained_model.run_id)
    files = render_report(
        results,
        work / "report",
        title=f"roadloop benchmark — candidate v{version}",
        context={"dataset_md5": curated_dataset.version.md5},
        gates=gates,
        training=training,
    )
    for path in (files.html, files.json, files.markdown):
        tracker.log_artifact(trained_model.run_id, path, "reports")
    # Accuracy, latency and counting of every format (PyTorch, ONNX fp32, INT8), not INT8 alone.
    tracker.log_metrics(trained_model.run_id, benchmark_metrics(results))
    _link_version(tracker, trained_model, files.html.name, gates, context.run.run_id)

    return dg.Output(
        BenchmarkReportFiles(
            candidate_version=version,
            production_version=production.version if production else None,
            results_json=files.json,
            html=files.html,
            markdown=files.markdown,
            gates=gates,
        ),
        metadata=benchmark_metadata(
            results,
            gates,
            markdown=files.markdown,
            html=files.html,
            html_url=(
                mlflow_artifact_url(mlflow.ui_url, experiment_id, trained_model.run_id,
                                    f"reports/{HTML_NAME}")
                if experiment_id else None
            ),
            training=training,
        ),
    )


def _link_version(tracker: Tracker, model: TrainedModelVersion, report_name: str,
                  gates: list[GateOutcome], dagster_run_id: str) -> None:
    """Tag the registry version with the report and the checks' outcome, and say them in its
    description: the version page links to what decided its promotion."""
    name, version = model.registered_name, model.model_version
    report = tracker.artifact_uri(model.run_id, f"reports/{report_name}")
    tracker.tag_version(name, version, {
        "benchmark_report": report, "benchmark_dagster_run_id": dagster_run_id,
        "checks": "passed" if all(g.passed for g in gates) else "failed",
        **{f"check.{g.name}": "pass" if g.passed else "FAIL" for g in gates},
    })
    tracker.describe_version(name, version, checks_description(
        tracker.version_description(name, version), report, dagster_run_id,
        [(g.name, g.passed, g.description) for g in gates]))


def _shape_files(onnx: OnnxModelVersion, quantized: QuantizedModelVersion) -> dict[str, tuple[Path, Path]]:
    """Shape label -> (fp32, INT8) file of every shape both assets exported, the primary first."""
    int8 = {shape_label(onnx.info.input_hw): quantized.info, **quantized.variants}
    return {label: (info.path, int8[label].path) for label, info in onnx.shapes().items() if label in int8}


def _check_result(outcome: GateOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        description=outcome.description,
        metadata={k: v for k, v in outcome.measured.items()},
    )


def _results(report: BenchmarkReportFiles) -> BenchmarkResults:
    return BenchmarkResults.model_validate_json(Path(report.results_json).read_text())


@dg.asset_check(asset=benchmark_report, blocking=True, description="candidate is not worse than production beyond tolerance")
def candidate_not_worse_than_production(benchmark_report: BenchmarkReportFiles, benchmark: BenchmarkResource) -> dg.AssetCheckResult:
    cfg = benchmark.gate_config()
    results = _results(benchmark_report)
    outcome = check_candidate_vs_production(results, cfg)
    return dg.AssetCheckResult(
        passed=outcome.passed,
        description=outcome.description,
        metadata=comparison_metadata(outcome, results, cfg.comparison_format, cfg.primary_test_set),
    )


@dg.asset_check(asset=benchmark_report, blocking=True, description="INT8 mAP50-95 drop vs fp32 within budget")
def int8_accuracy_drop(benchmark_report: BenchmarkReportFiles, benchmark: BenchmarkResource) -> dg.AssetCheckResult:
    return _check_result(check_int8_drop(_results(benchmark_report), benchmark.gate_config()))


@dg.asset_check(asset=benchmark_report, blocking=True, description="INT8 drop vs fp32 within budget at every exported input shape")
def int8_accuracy_drop_per_shape(benchmark_report: BenchmarkReportFiles) -> dg.AssetCheckResult:
    shape_gates = [g for g in benchmark_report.gates if g.name.startswith(SHAPE_GATE_PREFIX)]
    if not shape_gates:
        return dg.AssetCheckResult(
            passed=True, description="One input shape only: int8_accuracy_drop judges it.",
            metadata={"shapes": 1},
        )
    failed = [g.name.removeprefix(SHAPE_GATE_PREFIX) for g in shape_gates if not g.passed]
    return dg.AssetCheckResult(
        passed=not failed,
        description=(f"INT8 gate failed at {', '.join(failed)}" if failed else
                     f"INT8 gate passed at every shape ({len(shape_gates)})")
        + ": " + " | ".join(f"{g.name}: {g.description}" for g in shape_gates),
        metadata={
            "shapes": len(shape_gates),
            "failed": dg.MetadataValue.json(failed),
            "per_shape": dg.MetadataValue.json({g.name: g.measured for g in shape_gates}),
        },
    )


@dg.asset_check(asset=benchmark_report, blocking=True, description="P95 latency (INT8, batch 1) within budget")
def p95_latency_within_budget(benchmark_report: BenchmarkReportFiles, benchmark: BenchmarkResource) -> dg.AssetCheckResult:
    return _check_result(check_latency_budget(_results(benchmark_report), benchmark.gate_config()))


def quality_floor_metadata(outcome: GateOutcome) -> dict[str, dg.MetadataValue]:
    """The floor check's metadata: numbers as floats (the Plots view draws them), one table of
    AP50 and labelled boxes per class, and whether the floor was a relaxed one."""
    measured = outcome.measured
    failed = str(measured.get("classes_below_floor", "")).split(", ")
    thin = str(measured.get("classes_not_gated_low_support", "")).split(", ")
    rows = ["| class | AP50 | labelled boxes | verdict |", "|---|---|---|---|"]
    for key in sorted(k for k in measured if k.startswith("ap50/")):
        cls = key.split("/", 1)[1]
        support = measured.get(f"support/{cls}")
        verdict = "below floor" if cls in failed else "not gated (support)" if cls in thin else "pass"
        boxes = f"{support:.0f}" if isinstance(support, float) else str(support)
        rows.append(f"| {cls} | {measured[key]:.3f} | {boxes} | {verdict} |")
    md: dict[str, dg.MetadataValue] = {
        k: dg.MetadataValue.float(v) if isinstance(v, float) else dg.MetadataValue.text(str(v))
        for k, v in measured.items()
        if not k.startswith(("ap50/", "support/"))
    }
    md["per_class"] = dg.MetadataValue.md("\n".join(rows))
    md["relaxed_floor"] = dg.MetadataValue.bool(measured.get("floor", "standard") != "standard")
    return md


@dg.asset_check(
    asset=benchmark_report,
    blocking=True,
    description=(
        "The candidate reaches the minimum quality floor (overall mAP50, and AP50 per class with "
        "enough labelled boxes), whether or not a production model exists."
    ),
)
def model_meets_quality_floor(
    context: dg.AssetCheckExecutionContext,
    benchmark_report: BenchmarkReportFiles,
    benchmark: BenchmarkResource,
) -> dg.AssetCheckResult:
    outcome = check_minimum_quality(_results(benchmark_report), benchmark.gate_config())
    if outcome.measured.get("floor", "standard") != "standard":
        context.log.warning(outcome.description)
    return dg.AssetCheckResult(passed=outcome.passed, description=outcome.description,
                               metadata=quality_floor_metadata(outcome))


@dg.asset(
    group_name=groups.EVALUATION,
    kinds={"mlflow"},
    description="Moves the MLflow alias `production` to the candidate — only when every gate passed.",
)
def production_model(
    context: dg.AssetExecutionContext,
    benchmark_report: BenchmarkReportFiles,
    trained_model: TrainedModelVersion,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    version = trained_model.model_version
    if benchmark_report.candidate_version != version:
        # e.g. the latest report judged vN and a later trained_model (vM) failed before its own
        # report: that verdict says nothing about vM.
        raise dg.Failure(
            f"not promoting v{version}: the latest benchmark report judged "
            f"v{benchmark_report.candidate_version}, not v{version}"
        )
    failed = [g.name for g in benchmark_report.gates if not g.passed]
    if failed:  # the blocking checks stop this asset first; this guards manual launches too
        raise dg.Failure(f"not promoting v{version}: gates failed: {', '.join(failed)}")
    tracker = mlflow.tracker()
    try:  # benchmark_report tags the version with its verdict (_link_version)
        checks = tracker.get_version(trained_model.registered_name, version).tags.get("checks")
    except MlflowException as exc:
        raise dg.Failure(f"not promoting v{version}: cannot read it from the registry ({exc})") from exc
    if checks != "passed":
        raise dg.Failure(
            f"not promoting v{version}: its registry tag checks is {checks or 'unset'}, not "
            "passed (benchmark_report did not pass it)"
        )
    floor = next((g for g in benchmark_report.gates if g.name == "minimum_quality"), None)
    floor_note = floor.description if floor is not None else "not evaluated (an older report)"
    if floor is not None and floor.measured.get("floor", "standard") != "standard":
        context.log.warning(f"promoting v{trained_model.model_version} under a relaxed quality "
                            f"floor: {floor.description}")
    previous = tracker.version_by_alias(trained_model.registered_name, PRODUCTION_ALIAS)
    tracker.set_alias(trained_model.registered_name, PRODUCTION_ALIAS, version)
    context.log.info(
        f"production: {f'v{previous.version}' if previous else 'none'} -> v{trained_model.model_version}"
    )
    return dg.MaterializeResult(
        metadata={
            "production_version": trained_model.model_version,
            "previous_production": previous.version if previous else "none",
            "registered_model": trained_model.registered_name,
            "quality_floor": floor_note,
        }
    )
