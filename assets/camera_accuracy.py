"""``camera_accuracy``: the serving model's measured mAP50 on one camera's reviewed frames,
against the mAP50 its benchmark recorded (one partition per camera).

- **Serving model**: the MLflow ``production`` version's INT8 ONNX file
  (``onnx/model.int8.onnx`` of its run), the file ``model_rollout`` ships to the cameras.
- **Benchmark figure**: the run metric ``bench/int8/map50`` that ``benchmark_report`` logged
  for that same file (ONNX INT8 on the curated test split, all sources). Same file, same
  ``evaluate_detector``, so the two numbers compare.
- **Frames**: the camera's frames in the last review export (``reviewed_labels``), less the
  frames the serving model trained on: the image hashes of its dataset version's train and
  val splits (the version's ``dataset_md5`` tag, restored from DVC once and cached).
- ``roadloop.monitoring.accuracy`` does the measuring; the check
  ``camera_accuracy_within_benchmark`` is WARN for a minor drop (≥ 0.1) and ERROR for a
  significant one (≥ 0.2). ``drift_sensor`` answers a significant drop like significant drift.

Launched by ``camera_accuracy_sensor`` (``sensors/camera_accuracy.py``) after each review
import; a partitioned asset cannot join the unpartitioned ``review_import`` job.
"""

import json
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field

from resources import ArtifactStoreResource, DvcResource, MlflowResource
from roadloop.data.datasets import load_taxonomy
from roadloop.errors import RoadloopError
from roadloop.fsutil import write_text_atomic
from roadloop.labeling.review_items import load_review_export
from roadloop.models.tracking import PRODUCTION_ALIAS, Tracker
from roadloop.models.training import configure_ultralytics
from roadloop.monitoring.accuracy import (
    AccuracyConfig,
    CameraAccuracy,
    camera_frames,
    measure_camera_accuracy,
)
from roadloop.settings import get_settings

from . import groups
from .active_learning import reviewed_labels
from .evaluation import PRODUCTION_ARTIFACTS, production_model
from .partitions import camera_partitions

ACCURACY_CHECK = "camera_accuracy_within_benchmark"
ACCURACY_METRIC = "reviewed_accuracy_drop"  # the metric name drift_sensor's tags carry
BENCHMARK_METRIC = "bench/int8/map50"  # logged by benchmark_report on the model's run
SERVING_ARTIFACT = PRODUCTION_ARTIFACTS["onnx_int8"]
TRAINING_SPLITS = ("train", "val")


class CameraAccuracyConfig(dg.Config):
    min_frames: int = Field(default=20, ge=1, description=(
        "Reviewed frames (not trained on) a measurement needs; fewer: not_enough_data. On "
        "fewer frames the noise of mAP50 is as large as the 0.1 line (docs/drift.md)."))


class ServingModel(BaseModel):
    version: str
    run_id: str
    imgsz: int
    benchmark_map50: float
    dataset_md5: str | None


def serving_model(tracker: Tracker, name: str) -> ServingModel:
    """The ``production`` version and its recorded benchmark mAP50 (``dg.Failure`` if none)."""
    prod = tracker.version_by_alias(name, PRODUCTION_ALIAS)
    if prod is None:
        raise dg.Failure(f"no `{PRODUCTION_ALIAS}` version of {name!r} in MLflow: no model "
                         "serves the cameras yet", allow_retries=False)
    metrics = tracker.run_metrics(prod.run_id)
    if BENCHMARK_METRIC not in metrics:
        raise dg.Failure(f"production v{prod.version} has no `{BENCHMARK_METRIC}` metric on run "
                         f"{prod.run_id}: materialize benchmark_report for it",
                         allow_retries=False)
    return ServingModel(version=prod.version, run_id=prod.run_id,
                        imgsz=int(prod.tags.get("imgsz", 320)),
                        benchmark_map50=float(metrics[BENCHMARK_METRIC]),
                        dataset_md5=prod.tags.get("dataset_md5") or None)


def training_frame_hashes(dvc: DvcResource, md5: str, cache_dir: Path) -> set[str]:
    """sha256 of the train and val images of curated dataset version ``md5`` (its
    ``manifest.jsonl``), restored from DVC the first time and cached as JSON."""
    cached = cache_dir / f"{md5}.json"
    if not cached.is_file():
        with tempfile.TemporaryDirectory(prefix=".restore-", dir=cache_dir) as tmp:
            root = dvc.store().restore(md5, Path(tmp) / "dataset")
            rows = [json.loads(line) for line in
                    (root / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line]
        hashes = sorted({r["sha256"] for r in rows if r.get("split") in TRAINING_SPLITS})
        write_text_atomic(cached, json.dumps(hashes))
    return set(json.loads(cached.read_text(encoding="utf-8")))


def _metadata(r: CameraAccuracy, serving: ServingModel, result_path: Path) -> dict[str, Any]:
    nan = float("nan")
    crossed = r.significant if r.verdict == "significant" else r.minor
    return {
        "camera_id": r.camera_id,
        "verdict": r.verdict,
        "alarm": r.alarm,
        "reason": r.reason,
        "map50": r.map50 if r.map50 is not None else nan,
        "map50_95": r.map50_95 if r.map50_95 is not None else nan,
        "benchmark_map50": r.benchmark_map50,
        "benchmark": f"MLflow metric {BENCHMARK_METRIC} of run {serving.run_id}",
        "drop": r.drop if r.drop is not None else nan,
        "frames": r.frames,
        "reviewed_frames": r.reviewed_frames,
        "excluded_training_frames": r.excluded_training_frames,
        "instances": r.instances,
        "min_frames": r.min_frames,
        "model_version": serving.version,
        "review_export_hash": r.review_export_hash,
        "review_export": dg.MetadataValue.path(r.review_export),
        # What drift_sensor reads from every verdict it acts on (see sensors/drift.py).
        "metric": ACCURACY_METRIC,
        "score": r.drop if r.drop is not None else 0.0,
        "threshold": crossed,
        "reference_id": f"benchmark v{serving.version}",
        "result_json": dg.MetadataValue.path(str(result_path)),
    }


def _check(r: CameraAccuracy) -> dg.AssetCheckResult:
    if r.drop is None:
        description = f"{r.verdict}: {r.reason}"
    else:
        description = (f"{r.verdict}: mAP50 {r.map50:.3f} on {r.frames} reviewed frames vs "
                       f"benchmark {r.benchmark_map50:.3f} (drop {r.drop:+.3f}; lines "
                       f"{r.minor:.2f} / {r.significant:.2f})")
    return dg.AssetCheckResult(
        check_name=ACCURACY_CHECK, passed=not r.alarm,
        severity=(dg.AssetCheckSeverity.ERROR if r.verdict == "significant"
                  else dg.AssetCheckSeverity.WARN),
        description=description,
        metadata={"verdict": r.verdict, "drop": r.drop if r.drop is not None else float("nan"),
                  "frames": r.frames},
    )


@dg.asset(
    partitions_def=camera_partitions,
    group_name=groups.MONITORING,
    kinds={"onnx", "mlflow"},
    deps=[reviewed_labels, production_model],
    check_specs=[dg.AssetCheckSpec(
        ACCURACY_CHECK, asset="camera_accuracy",
        description="Serving model's mAP50 on the camera's reviewed frames within the drift "
        "lines of its benchmark mAP50 (WARN minor ≥ 0.1, ERROR significant ≥ 0.2).",
    )],
    # Restoring a dataset version runs `dvc pull`; partitions launched together may find the
    # DVC repo locked. Failures marked allow_retries=False (no model, no figure) never retry.
    retry_policy=dg.RetryPolicy(max_retries=2, delay=15, jitter=dg.Jitter.PLUS_MINUS),
    description=(
        "Measured accuracy of the serving model (MLflow production, INT8 ONNX) on one "
        "camera's reviewed frames it was not trained on, against its benchmark mAP50 "
        "(bench/int8/map50); drop = benchmark − camera. drift_sensor acts on a significant drop."
    ),
)
def camera_accuracy(
    context: dg.AssetExecutionContext,
    config: CameraAccuracyConfig,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    camera = context.partition_key
    settings = get_settings()
    try:
        export = load_review_export(artifacts.review_export_path())
        reviewed = len(camera_frames(export, camera))
    except RoadloopError as exc:  # the next import writes a new export; retrying will not help
        raise dg.Failure(f"review export unreadable: {exc}", allow_retries=False) from exc
    tracker = mlflow.tracker()
    serving = serving_model(tracker, mlflow.registered_model_name)
    exclude: set[str] = set()
    if serving.dataset_md5 is None:
        context.log.warning(f"production v{serving.version} has no dataset_md5 tag: frames it "
                            "was trained on cannot be told apart and are measured too")
    elif reviewed >= config.min_frames:  # else there is nothing to measure
        try:
            exclude = training_frame_hashes(dvc, serving.dataset_md5,
                                            artifacts.path("camera_accuracy", "training_frames"))
        except RoadloopError as exc:  # an unreadable version would bias the figure upward
            raise dg.Failure(f"training frames of production v{serving.version} (dataset "
                             f"{serving.dataset_md5}) unavailable: {exc}") from exc
    configure_ultralytics(settings.home / "ultralytics")
    with tempfile.TemporaryDirectory(prefix="roadloop-serving-") as tmp:
        model_file = tracker.download(serving.run_id, SERVING_ARTIFACT, Path(tmp))
        try:
            result = measure_camera_accuracy(
                export, camera, model_file, imgsz=serving.imgsz,
                class_names=load_taxonomy().classes, benchmark_map50=serving.benchmark_map50,
                model_version=serving.version, exclude_sha256=exclude,
                config=AccuracyConfig(minor=settings.drift_minor,
                                      significant=settings.drift_significant,
                                      min_frames=config.min_frames),
            )
        except RoadloopError as exc:  # a bad model file or export: the same on a retry
            raise dg.Failure(f"camera {camera}: {exc}", allow_retries=False) from exc
    result = result.model_copy(update={"model_file": f"runs:/{serving.run_id}/{SERVING_ARTIFACT}"})
    context.log.info(
        f"camera {camera}: {result.verdict} — "
        + (f"mAP50 {result.map50:.3f} on {result.frames} frames vs benchmark "
           f"{result.benchmark_map50:.3f} (drop {result.drop:+.3f})" if result.drop is not None
           else result.reason)
    )
    path = artifacts.path("camera_accuracy", "results") / f"{camera}.json"
    write_text_atomic(path, result.model_dump_json(indent=1))
    return dg.MaterializeResult(metadata=_metadata(result, serving, path),
                                check_results=[_check(result)])


CAMERA_ACCURACY_ASSETS = [camera_accuracy]
