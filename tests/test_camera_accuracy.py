"""Measured accuracy on a camera's reviewed frames: the library (roadloop.monitoring.accuracy),
the camera_accuracy asset, camera_accuracy_sensor, and drift_sensor acting on a drop.

Real frames and the shared atl_v2 checkpoint (320 px, a handful of frames); the review
export is written by the real ``write_review_export``.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from roadloop.data.datasets import Taxonomy
from roadloop.errors import InvalidInputError
from roadloop.labeling.review_items import ReviewedSample, ReviewExport, write_review_export
from roadloop.monitoring.accuracy import (
    AccuracyConfig,
    accuracy_verdict,
    measure_camera_accuracy,
    reviewed_cameras,
)

from .helpers import SHARED_DIR, needs_shared

ATL = ["bike", "bus", "car", "truck"]
ATL_DIR = SHARED_DIR / "datasets" / "atl_v2"
CHECKPOINT = SHARED_DIR / "models" / "atl_v2_yolo11n_320.pt"
ONNX = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"  # static 1x3x320x320
IMGSZ = 320

pytestmark = needs_shared(ATL_DIR / "images" / "val", CHECKPOINT, ONNX)


def _val_frames(n: int) -> list[Path]:
    return sorted((ATL_DIR / "images" / "val").glob("*.jpg"))[:n]


def _label_rows(image: Path) -> list[list[float]]:
    label = ATL_DIR / "labels" / "val" / f"{image.stem}.txt"
    if not label.is_file():
        return []
    return [[float(v) for v in line.split()] for line in label.read_text().splitlines() if line]


def _export(out: Path, cameras: list[str], images: list[Path]) -> ReviewExport:
    """A review export of ``images`` (atl_v2 labels as the annotators' boxes), one camera each."""
    samples = []
    for i, (camera, image) in enumerate(zip(cameras, images, strict=True)):
        boxes = []
        for c, cx, cy, w, h in _label_rows(image):
            x1, y1 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
            x2, y2 = min(1.0, cx + w / 2), min(1.0, cy + h / 2)
            boxes.append(SimpleNamespace(label=ATL[int(c)], bounding_box=[x1, y1, x2 - x1, y2 - y1]))
        samples.append(ReviewedSample(
            sample_id=f"s{i}", frame_key=f"{camera}/f{i}", filepath=str(image),
            ground_truth=SimpleNamespace(detections=boxes), split="train", camera_id=camera,
            source_image=None, batch_id="b1", pending=True,
        ))
    export = write_review_export(samples, out, Taxonomy(classes=ATL))
    assert len(export.frames) == len(images), export.rejected
    return export


def _hashes(export: ReviewExport, camera: str) -> list[str]:
    rows = [json.loads(line) for line in (export.path / "manifest.jsonl").read_text().splitlines()]
    return [r["sha256"] for r in rows if r["camera_id"] == camera]


# --------------------------------------------------------------------------- library


def test_verdict_lines() -> None:
    config = AccuracyConfig()
    assert (config.minor, config.significant, config.min_frames) == (0.1, 0.2, 20)
    assert [accuracy_verdict(d, config) for d in (-0.3, 0.0, 0.0999, 0.1, 0.1999, 0.2, 0.9)] == [
        "ok", "ok", "ok", "minor", "minor", "significant", "significant"]
    strict = AccuracyConfig(minor=0.05, significant=0.1)
    assert accuracy_verdict(0.07, strict) == "minor" and accuracy_verdict(0.1, strict) == "significant"


def test_too_few_reviewed_frames_is_not_enough_data_never_an_alarm(tmp_path: Path) -> None:
    images = _val_frames(5)
    export = _export(tmp_path / "export", ["cam_a", "cam_a", "cam_a", "cam_b", "seed"], images)
    assert reviewed_cameras(export) == {"cam_a": 3, "cam_b": 1, "seed": 1}
    absent = tmp_path / "no-model.onnx"  # never opened: nothing is evaluated

    r = measure_camera_accuracy(export, "cam_a", absent, imgsz=IMGSZ, class_names=ATL,
                                benchmark_map50=0.9, model_version="7")
    assert (r.verdict, r.frames, r.reviewed_frames, r.alarm) == ("not_enough_data", 3, 3, False)
    assert r.map50 is None and r.drop is None and r.benchmark_map50 == 0.9
    assert "3 reviewed frame(s)" in r.reason and "needs 20" in r.reason
    assert (r.model_version, r.review_export_hash) == ("7", export.content_hash)

    # Frames the model trained on do not count, and the reason says so.
    trained = measure_camera_accuracy(export, "cam_a", absent, imgsz=IMGSZ, class_names=ATL,
                                      benchmark_map50=0.9,
                                      exclude_sha256=_hashes(export, "cam_a")[:1],
                                      config=AccuracyConfig(min_frames=3))
    assert (trained.verdict, trained.frames, trained.excluded_training_frames) == (
        "not_enough_data", 2, 1)
    assert "1 more were in the model's training data" in trained.reason

    nobody = measure_camera_accuracy(export, "cam_z", absent, imgsz=IMGSZ, class_names=ATL,
                                     benchmark_map50=0.9, config=AccuracyConfig(min_frames=1))
    assert (nobody.verdict, nobody.frames) == ("not_enough_data", 0)

    with pytest.raises(InvalidInputError, match="label ids would mean other classes"):
        measure_camera_accuracy(export, "cam_a", absent, imgsz=IMGSZ,
                                class_names=["car", "bus", "bike", "truck"], benchmark_map50=0.9)


def test_drop_and_verdict_measured_with_a_real_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from roadloop.models.training import configure_ultralytics

    configure_ultralytics(tmp_path / "ultralytics")
    images = _val_frames(8)
    export = _export(tmp_path / "export", ["atl"] * 6 + ["other"] * 2, images)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    config = AccuracyConfig(min_frames=5)
    r = measure_camera_accuracy(export, "atl", CHECKPOINT, imgsz=IMGSZ, class_names=ATL,
                                benchmark_map50=0.95, model_version="3", config=config)
    assert (r.frames, r.reviewed_frames, r.excluded_training_frames) == (6, 6, 0)
    # The camera's six frames were evaluated with their reviewed labels, not the others'.
    assert r.instances == sum(len(_label_rows(p)) for p in images[:6]) > 0
    assert r.map50 is not None and 0.0 <= r.map50 <= 1.0 and r.map50_95 <= r.map50
    assert r.drop == pytest.approx(0.95 - r.map50)
    assert r.verdict == accuracy_verdict(r.drop, config)
    # The atl_v2 checkpoint scores well under 0.75 mAP50 on these frames (models/README.md).
    assert r.map50 < 0.75 and r.verdict == "significant" and r.alarm
    assert not list(scratch.glob("roadloop-*"))  # the temporary YOLO subset is gone


# --------------------------------------------------------------------------- Dagster


class FakeFleet:
    """What drift_sensor asks of the gateway: a sampling boost (recorded)."""

    def __init__(self) -> None:
        self.boosts: list[tuple[str, float]] = []

    def boost_sampling(self, camera: str, *, factor: float, until, reason: str) -> None:
        self.boosts.append((camera, factor))


@pytest.fixture()
def atl_taxonomy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, roadloop_home: Path) -> None:
    """The ATL classes as the platform's taxonomy (the shared checkpoint's classes)."""
    from roadloop.settings import get_settings

    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text("classes: [bike, bus, car, truck]\nsources: {}\n")
    monkeypatch.setenv("ROADLOOP_TAXONOMY_FILE", str(taxonomy))
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    """MLflow with a promoted version (its run: the INT8 file and the benchmark metric), a
    DVC version of its training data and a review export; built once (MLflow's and DVC's
    start-up cost most of this module's time), never changed by a test."""
    from resources import ArtifactStoreResource, DvcResource, MlflowResource
    from roadloop.data.versioning import DvcStore
    from roadloop.models.tracking import PRODUCTION_ALIAS, Tracker

    tmp_path = tmp_path_factory.mktemp("platform")
    export = _export(tmp_path / "handoff" / "reviews", ["atl"] * 7, _val_frames(7))
    trained_on = _hashes(export, "atl")[0]

    # The serving model's training data: one of the reviewed frames is in its train split.
    dvc = DvcStore(tmp_path / "dvc", str(tmp_path / "dvc-remote"))
    data = tmp_path / "dvc" / "data" / "curated"
    data.mkdir(parents=True)
    (data / "manifest.jsonl").write_text(
        json.dumps({"split": "train", "sha256": trained_on}) + "\n"
        + json.dumps({"split": "test", "sha256": _hashes(export, "atl")[1]}) + "\n")
    md5 = dvc.add_and_push(data).md5

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "camacc", tmp_path / "mlartifacts")
    run_id = tracker.start_run("train")
    int8 = tmp_path / "upload" / "model.int8.onnx"
    int8.parent.mkdir()
    shutil.copy2(ONNX, int8)  # stands in for the INT8 file: same classes, same static size
    tracker.log_artifact(run_id, int8, "onnx")
    tracker.log_metrics(run_id, {"bench/int8/map50": 0.95})
    version = tracker.register_version("camacc-detector", run_id, "onnx/model.int8.onnx",
                                       tags={"imgsz": str(IMGSZ), "dataset_md5": md5})
    tracker.set_alias("camacc-detector", PRODUCTION_ALIAS, version.version)
    tracker.end_run(run_id)

    artifacts = ArtifactStoreResource(root=str(tmp_path / "artifacts"),
                                      review_export_dir=str(export.path))
    mlflow = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "camacc",
              "artifact_root": str(tmp_path / "mlartifacts"),
              "registered_model_name": "camacc-detector"}
    return SimpleNamespace(
        export=export, md5=md5, run_id=run_id, version=version.version, artifacts=artifacts,
        mlflow=mlflow,
        resources={
            "artifacts": artifacts,
            "mlflow": MlflowResource(**mlflow),
            "dvc": DvcResource(repo_dir=str(tmp_path / "dvc"),
                               remote_url=str(tmp_path / "dvc-remote")),
        },
    )


def test_camera_accuracy_asset_measures_the_serving_model_and_drift_sensor_acts(
    platform, atl_taxonomy
) -> None:
    from assets.camera_accuracy import ACCURACY_CHECK, camera_accuracy
    from assets.partitions import camera_partitions
    from sensors.drift import drift_sensor

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(camera_partitions.name, ["atl"])
    result = dg.materialize(
        [camera_accuracy], partition_key="atl", instance=instance, resources=platform.resources,
        run_config={"ops": {"camera_accuracy": {"config": {"min_frames": 5}}}},
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    meta = {k: v.value for k, v in
            result.get_asset_materialization_events()[0].materialization.metadata.items()}
    # Seven reviewed frames, one of them in the serving model's training split.
    assert (meta["reviewed_frames"], meta["excluded_training_frames"], meta["frames"]) == (7, 1, 6)
    assert meta["benchmark_map50"] == 0.95
    assert meta["benchmark"] == f"MLflow metric bench/int8/map50 of run {platform.run_id}"
    assert 0.0 <= meta["map50"] < 0.75 and meta["drop"] == pytest.approx(0.95 - meta["map50"])
    assert (meta["verdict"], meta["model_version"]) == ("significant", platform.version)
    assert (meta["metric"], meta["threshold"]) == ("reviewed_accuracy_drop", 0.2)
    assert meta["review_export_hash"] == platform.export.content_hash
    cached = Path(platform.artifacts.root) / "camera_accuracy" / "training_frames"
    assert (cached / f"{platform.md5}.json").is_file()  # the DVC version is restored once

    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == ACCURACY_CHECK and not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    assert "significant: mAP50" in check.description

    # drift_sensor answers a significant drop as it answers significant drift.
    fleet = FakeFleet()
    ctx = dg.build_sensor_context(instance=instance, resources={"fleet": fleet})
    tick = drift_sensor(ctx)
    assert isinstance(tick, dg.SensorResult)
    (queue,) = tick.run_requests
    assert queue.job_name == "review_queue"
    assert queue.run_key == f"drift-queue|atl|reviews-{platform.export.content_hash}"
    assert queue.run_config == {"ops": {"frame_embeddings": {"config": {"cameras": ["atl"]}}}}
    assert queue.tags["roadloop/drift_metric"] == "reviewed_accuracy_drop"
    assert queue.tags["roadloop/drift_verdict"] == "significant"
    assert queue.tags["roadloop/drift_review_export"] == platform.export.content_hash
    assert float(queue.tags["roadloop/drift_score"]) == pytest.approx(meta["drop"], abs=1e-4)
    assert fleet.boosts == [("atl", 4.0)]
    state = json.loads(tick.cursor)
    assert "atl" in state["owed"] and state["accuracy_after"] is not None
    again = drift_sensor(dg.build_sensor_context(instance=instance, cursor=tick.cursor,
                                                 resources={"fleet": fleet}))
    assert isinstance(again, dg.SkipReason) and "owed learning_loop for ['atl']" in str(
        again.skip_message)


def test_camera_accuracy_without_a_benchmark_figure_fails_clearly(platform, atl_taxonomy) -> None:
    from assets.camera_accuracy import camera_accuracy
    from assets.partitions import camera_partitions
    from resources import MlflowResource
    from roadloop.models.tracking import PRODUCTION_ALIAS

    # A version promoted by hand, never benchmarked (its own registered model here).
    mlflow = MlflowResource(**{**platform.mlflow, "registered_model_name": "camacc-by-hand"})
    tracker = mlflow.tracker()
    run_id = tracker.start_run("hand-promoted")
    bare = tracker.register_version("camacc-by-hand", run_id, "onnx/model.int8.onnx")
    tracker.set_alias("camacc-by-hand", PRODUCTION_ALIAS, bare.version)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(camera_partitions.name, ["atl"])
    result = dg.materialize([camera_accuracy], partition_key="atl", instance=instance,
                            resources={**platform.resources, "mlflow": mlflow},
                            raise_on_error=False)
    assert not result.success
    message = " ".join(e.step_failure_data.error.message for e in result.all_events
                       if e.is_step_failure)
    assert f"production v{bare.version} has no `bench/int8/map50` metric" in message


def test_camera_accuracy_sensor_measures_reviewed_cameras_after_an_import(tmp_path: Path) -> None:
    from assets.partitions import camera_partitions
    from resources import ArtifactStoreResource
    from sensors.camera_accuracy import camera_accuracy_sensor

    export = _export(tmp_path / "reviews", ["cam_a", "cam_a", "cam_b", "seed"], _val_frames(4))
    artifacts = ArtifactStoreResource(root=str(tmp_path / "a"), review_export_dir=str(export.path))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(camera_partitions.name, ["cam_a", "cam_c"])

    def tick(cursor: str | None):
        return camera_accuracy_sensor(dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"artifacts": artifacts}))

    quiet = tick(None)
    assert isinstance(quiet, dg.SkipReason) and "no finished review import" in quiet.skip_message

    instance.report_runless_asset_event(dg.AssetMaterialization("reviewed_labels"))
    unserved = tick(None)  # no promoted model yet: nothing to measure, the import is consumed
    assert not unserved.run_requests and "no model was promoted" in unserved.skip_reason.skip_message
    assert tick(unserved.cursor).skip_message.startswith("no finished review import")

    instance.report_runless_asset_event(dg.AssetMaterialization("production_model"))
    instance.report_runless_asset_event(dg.AssetMaterialization("reviewed_labels"))
    fired = tick(unserved.cursor)
    # cam_b is not a camera partition and seed frames are not a camera: only cam_a.
    assert [(r.partition_key, r.run_key) for r in fired.run_requests] == [
        ("cam_a", f"cam_a|{export.content_hash}")]
    assert fired.run_requests[0].tags["roadloop/reviewed_frames"] == "2"
    assert isinstance(tick(fired.cursor), dg.SkipReason)
