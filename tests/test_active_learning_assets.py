"""Active-learning assets and the reviews sensor, materialized with their own Definitions.

No postponed annotations here: Dagster resolves the stub asset's types at definition time.
"""

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import dagster as dg
import numpy as np
import pytest

from resources.fiftyone_resource import FiftyOneResource
from roadloop.labeling.review_dataset import (
    TAG_IMPORTED,
    TAG_LABEL_ISSUE,
    TAG_REVIEWED,
    VIEW_LABEL_ISSUES,
    VIEW_QUEUE,
    VIEW_REVIEWED,
)
from roadloop.labeling.review_items import ReviewBox, ReviewItem
from roadloop.labeling.review_store import pending_key

from .helpers import require_shared


@pytest.fixture()
def fiftyone(fiftyone_db: Path):
    res = FiftyOneResource(
        database_dir=str(fiftyone_db), dataset_name=f"test-al-{uuid.uuid4().hex[:8]}"
    )
    yield res
    res.store().delete()


# --------------------------------------------------------------------------- sensor


def _push_frames(store, tmp_path: Path, n: int) -> list[str]:
    items = []
    for i in range(n):
        path = tmp_path / f"s{i}.jpg"
        cv2.imwrite(str(path), np.full((48, 64, 3), 20 * i, np.uint8))
        items.append(
            ReviewItem(
                camera_id="cam",
                frame_id=f"s{i}",
                image=path,
                width=64,
                height=48,
                al_score=i,
                predictions=[ReviewBox(label="car", box=(0.1, 0.1, 0.2, 0.2), confidence=0.5)],
            )
        )
    store.push_queue(items, "s")
    return [sid for sid, _ in store.queue_items()]


def _evaluate(sensor, instance, fiftyone: FiftyOneResource, cursor: str | None, root: Path):
    from resources import ArtifactStoreResource

    ctx = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"fiftyone": fiftyone, "artifacts": ArtifactStoreResource(root=str(root))},
    )
    return sensor(ctx)


def test_reviews_sensor_fires_only_on_new_reviews_and_is_idempotent(
    fiftyone, tmp_path: Path
) -> None:
    from sensors.reviews import reviews_finished_sensor

    instance = dg.DagsterInstance.ephemeral()
    store = fiftyone.store()
    ids = _push_frames(store, tmp_path, 3)
    root = tmp_path / "artifacts"

    quiet = _evaluate(reviews_finished_sensor, instance, fiftyone, None, root)
    assert isinstance(quiet, dg.SkipReason) and "no reviewed samples" in quiet.skip_message

    store.tag_reviewed(ids[:2])
    fired = _evaluate(reviews_finished_sensor, instance, fiftyone, None, root)
    assert isinstance(fired, dg.SensorResult)
    key = pending_key(ids[:2])
    assert [r.run_key for r in fired.run_requests] == [f"reviews-{key}"]
    assert fired.cursor == key

    # Same reviews, next tick: nothing new is launched.
    again = _evaluate(reviews_finished_sensor, instance, fiftyone, fired.cursor, root)
    assert isinstance(again, dg.SkipReason) and "already launched" in again.skip_message

    # A new review changes the pending set: one new run, with a new run key.
    store.tag_reviewed(ids[2:])
    more = _evaluate(reviews_finished_sensor, instance, fiftyone, fired.cursor, root)
    assert isinstance(more, dg.SensorResult)
    assert (
        more.run_requests[0].run_key
        == f"reviews-{pending_key(ids)}"
        != fired.run_requests[0].run_key
    )

    # Once imported, nothing is pending: the sensor is quiet again.
    export = store.export_reviewed(tmp_path / "export")
    store.mark_imported(export.new_sample_ids)
    done = _evaluate(reviews_finished_sensor, instance, fiftyone, more.cursor, root)
    assert isinstance(done, dg.SkipReason) and "no reviewed samples" in done.skip_message


def _job_assets() -> list:
    from assets import ALL_ASSETS
    from assets.active_learning import ACTIVE_LEARNING_ASSETS

    # Once definitions register them, ALL_ASSETS holds the active-learning assets already.
    out = list(ALL_ASSETS)
    return out + [a for a in ACTIVE_LEARNING_ASSETS if all(a is not b for b in out)]


def test_definitions_with_active_learning_load(fiftyone) -> None:
    from assets import ALL_CHECKS
    from jobs import review_import_job
    from resources import build_resources
    from sensors.reviews import reviews_finished_sensor

    defs = dg.Definitions(
        assets=_job_assets(),
        asset_checks=ALL_CHECKS,
        jobs=[review_import_job],
        sensors=[reviews_finished_sensor],
        resources={**build_resources(profile="test"), "fiftyone": fiftyone},
    )
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("review_import")  # the import + a new dataset version
    assert job.asset_layer.selected_asset_keys == {
        dg.AssetKey("reviewed_labels"),
        dg.AssetKey("curated_dataset"),
    }
    graph = defs.resolve_asset_graph()
    for key in ("frame_embeddings", "active_learning_queue", "reviewed_labels", "label_quality"):
        assert graph.get(dg.AssetKey(key)).group_name == "active_learning"


# --------------------------------------------------------------------------- review export


def test_review_export_location_is_owned_by_the_artifacts_resource(
    fiftyone, tmp_path: Path
) -> None:
    """reviewed_labels writes the export where ArtifactStoreResource.review_export_dir says,
    and curated_dataset reads it from there (synthetic seed data, a local DVC remote)."""
    from assets.active_learning import reviewed_labels
    from assets.datasets import curated_dataset, seed_datasets
    from resources import ArtifactStoreResource, DvcResource, LabelledSourcesResource
    from roadloop.labeling.review_items import load_review_export
    from roadloop.settings import get_settings

    store = fiftyone.store()
    ids = _push_frames(store, tmp_path, 2)
    store.set_ground_truth(ids[1], [ReviewBox(label="car", box=(0.1, 0.2, 0.5, 0.5))])
    store.tag_reviewed([ids[1]])

    export_dir = tmp_path / "handoff" / "reviews"
    artifacts = ArtifactStoreResource(
        root=str(tmp_path / "artifacts"), review_export_dir=str(export_dir)
    )
    assert artifacts.review_export_path() == export_dir
    assert ArtifactStoreResource(root=str(tmp_path / "a2")).review_export_path() == (
        tmp_path / "a2" / "reviewed_labels" / "export"
    )
    result = dg.materialize(
        [seed_datasets, reviewed_labels, curated_dataset],
        selection=dg.AssetSelection.assets(reviewed_labels, curated_dataset),
        resources={
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
            "artifacts": artifacts,
            "fiftyone": fiftyone,
            "labelled_sources": LabelledSourcesResource(
                shared_dir=str(tmp_path / "no-shared-data"),
                taxonomy_file=str(get_settings().taxonomy_file),
                synthetic_dir=str(tmp_path / "synthetic"),
                max_frames_per_split=2,
            ),
            "dvc": DvcResource(repo_dir=str(tmp_path / "dvc"), remote_url=str(tmp_path / "remote")),
        },
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    export = result.output_for_node("reviewed_labels")
    assert export.path == export_dir and len(export.frames) == 1
    assert load_review_export(export_dir).content_hash == export.content_hash
    assert not (tmp_path / "artifacts" / "reviewed_labels" / "export").exists()
    meta = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }["curated_dataset"]
    assert meta["reviewed_frames"].value == 1
    assert meta["review_export"].value == export.content_hash
    assert result.output_for_node("curated_dataset").dataset.source_counts["reviewed"]


# --------------------------------------------------------------------------- frame path


def _textured(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(
        rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (160, 120),
        interpolation=cv2.INTER_NEAREST,
    )


def _write_frame(store, camera: str, frame_id: str, seconds: int, img: np.ndarray) -> None:
    from roadloop.data.frame_quality import compute_quality
    from roadloop.data.frame_records import FrameRecord

    ok, jpg = cv2.imencode(".jpg", img)
    assert ok
    store.write_frame(
        FrameRecord(
            frame_id=frame_id,
            camera_id=camera,
            captured_at=datetime(2026, 3, 1, 8, 0, tzinfo=UTC) + timedelta(seconds=seconds),
            reasons=["base_rate"],
            source="agent",
            width=160,
            height=120,
            quality=compute_quality(img),
        ),
        jpg.tobytes(),
    )


def test_frame_embeddings_reads_the_ingested_frame_indexes(
    tmp_path: Path, fiftyone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Candidates are the frames the sampled_edge_frames partitions kept (near-duplicates
    dropped there), not a rescan of the frame store; a camera partition that was never
    materialized is skipped with a warning; an index that vanished is a clear failure."""
    import logging

    import assets.active_learning as al
    from assets.ingestion import read_frame_index, sampled_edge_frames
    from assets.records import CuratedDatasetVersion
    from resources import ArtifactStoreResource, FrameStoreResource, MlflowResource
    from roadloop.data.datasets import CuratedDataset
    from roadloop.data.frames import FrameStore
    from roadloop.data.versioning import DatasetVersion
    from roadloop.labeling.embeddings import EmbeddingTable

    store = FrameStore(tmp_path / "frames")
    _write_frame(store, "cam_a", "f0", 0, _textured(0))
    _write_frame(store, "cam_a", "f1", 1, _textured(0))  # near-duplicate of f0
    _write_frame(store, "cam_a", "f2", 2, _textured(2))
    _write_frame(store, "cam_b", "g0", 0, _textured(3))  # camera whose partition never ran
    resources = {
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
        "frame_store": FrameStoreResource(root=str(tmp_path / "frames")),
        "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
        "mlflow": MlflowResource(tracking_uri="sqlite:///unused.db"),
        "fiftyone": fiftyone,
    }
    instance = dg.DagsterInstance.ephemeral()
    _ingest(instance, resources, ["cam_a"])
    instance.add_dynamic_partitions("cameras", ["cam_b"])
    index = tmp_path / "artifacts" / "sampled_edge_frames" / "cam_a.jsonl"
    assert [f.record.frame_id for f in read_frame_index(index)] == ["f0", "f2"]
    _write_frame(store, "cam_a", "f3", 3, _textured(4))  # arrives after the partition ran
    _write_frame(store, "cam_a", "f4", 4, _textured(5))
    broken = store.find_frame("cam_a", "f4")

    # No model or backbone here: the current model and its embeddings are stand-ins.
    model = al.CurrentModel(
        registered_name="m", version="1", alias="candidate", weights=tmp_path / "w.pt", imgsz=96
    )
    monkeypatch.setattr(MlflowResource, "tracker", lambda self: None)
    monkeypatch.setattr(al, "current_model", lambda tracker, name, cache: model)
    embedded: list[list[Path]] = []

    def fake_embeddings(weights, images, **kw):
        embedded.append(list(images))
        return EmbeddingTable(
            model_version="1", imgsz=96, layers=[], keys=[str(p) for p in images],
            vectors=np.ones((len(images), 4), np.float32), images=list(images),
        )

    monkeypatch.setattr(al, "compute_embeddings", fake_embeddings)
    curated = CuratedDatasetVersion(
        dataset=CuratedDataset(
            path=tmp_path / "curated", class_names=["car"], split_counts={}, class_counts={},
            source_counts={}, quarantined=0, quarantine_reasons={}, skipped_replay=0,
        ),
        version=DatasetVersion(
            md5="0" * 32, nfiles=1, size=1, dvc_file=tmp_path / "x.dvc", remote_url="none"
        ),
        data_yaml=tmp_path / "curated" / "data.yaml",
    )

    @dg.asset(name="curated_dataset")
    def curated_stub() -> CuratedDatasetVersion:
        return curated

    def run() -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [curated_stub, sampled_edge_frames, al.frame_embeddings],
            selection=dg.AssetSelection.assets("curated_dataset", al.frame_embeddings),
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )

    # An indexed frame whose image no longer decodes is skipped with a warning naming it,
    # not the end of every camera's candidates.
    with index.open("a") as fh:
        fh.write(index.read_text().splitlines()[-1].replace('"f2"', '"f4"').replace(
            str(store.find_frame("cam_a", "f2")), str(broken)) + "\n")
    broken.write_bytes(b"")
    assert [f.record.frame_id for f in read_frame_index(index)] == ["f0", "f2", "f4"]
    result = run()
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    emb = result.output_for_node("frame_embeddings")
    assert [c.record.frame_id for c in emb.candidates] == ["f0", "f2"]
    assert embedded[0] == [store.find_frame("cam_a", "f0"), store.find_frame("cam_a", "f2")]
    meta = next(
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("frame_embeddings")
    )
    assert meta["cameras"].value == ["cam_a"] and meta["cameras_not_ingested"].value == ["cam_b"]
    warnings = [
        e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING
    ]
    assert any("camera cam_b" in w and "never materialized" in w for w in warnings), warnings
    assert any("do not decode" in w and "cam_a/f4" in w for w in warnings), warnings

    # The partition's index is gone (artifacts wiped): a clear error, not a silent rescan.
    index.unlink()
    failed = run()
    assert not failed.success
    messages = " ".join(
        e.step_failure_data.error.message for e in failed.all_events if e.is_step_failure
    )
    assert "cam_a" in messages and "materialize that partition again" in messages


# --------------------------------------------------------------------------- assets on real frames


@pytest.fixture()
def world(shared_dir: Path, tmp_path: Path, fiftyone):
    """A frame store with replayed atl_v2 frames, MLflow with the shared checkpoint as
    `candidate`, and a tiny curated dataset standing in for ``curated_dataset``."""
    from assets.records import CuratedDatasetVersion
    from resources import ArtifactStoreResource, FrameStoreResource, MlflowResource, TrainerResource
    from roadloop.data.datasets import build_curated_dataset, default_sources, load_taxonomy
    from roadloop.data.frame_quality import compute_quality
    from roadloop.data.frame_records import FrameRecord
    from roadloop.data.frames import FrameStore
    from roadloop.data.splits import is_replay_frame
    from roadloop.data.versioning import DatasetVersion
    from roadloop.models.tracking import CANDIDATE_ALIAS, Tracker
    from roadloop.settings import get_settings

    ckpt = shared_dir / "models" / "atl_v2_yolo11n_320.pt"
    require_shared(ckpt)

    # Frame store: replay frames of atl_v2 (the oracle can answer them from labels_ref); per
    # camera two clean frames and one with the source's salt-and-pepper augmentation (r2, r5:
    # checked by eye), which must not reach the review queue.
    atl = shared_dir / "datasets" / "atl_v2"
    images = atl / "images" / "train"
    clean = ["1025", "10260021", "10260033", "10260070011"]
    noisy = ["10218", "1022"]
    replay = [images / f"{stem}_png.jpg" for stem in clean[:2] + noisy[:1] + clean[2:] + noisy[1:]]
    for p in replay:
        require_shared(p)
        assert is_replay_frame("atl_v2", "train", p.stem, 0.3)
    store = FrameStore(tmp_path / "frames")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i, img_path in enumerate(replay):
        data = img_path.read_bytes()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        store.write_frame(
            FrameRecord(
                frame_id=f"r{i}",
                camera_id="atl_day" if i < 3 else "atl_night",
                captured_at=t0 + timedelta(seconds=i),
                reasons=["replay"],
                source="replay:atl_v2",
                labels_ref=str(atl / "labels" / "train" / f"{img_path.stem}.txt"),
                width=w,
                height=h,
                quality=compute_quality(img),
            ),
            data,
        )

    # MLflow: the shared checkpoint registered as the candidate (imgsz kept tiny).
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "al-test", tmp_path / "mlartifacts")
    run_id = tracker.start_run("shared-ckpt")
    weights = tmp_path / "w" / "best.pt"
    weights.parent.mkdir()
    shutil.copy2(ckpt, weights)
    tracker.log_artifact(run_id, weights, "weights")
    version = tracker.register_version(
        "al-detector", run_id, "weights/best.pt", tags={"imgsz": "96"}
    )
    tracker.set_alias("al-detector", CANDIDATE_ALIAS, version.version)
    tracker.end_run(run_id)

    settings = get_settings().model_copy(update={"shared_dir": shared_dir})
    curated = build_curated_dataset(
        default_sources(settings),
        tmp_path / "curated",
        load_taxonomy(),
        replay_fraction=0.3,
        max_frames_per_split=2,
        progress=False,
    )
    cdv = CuratedDatasetVersion(
        dataset=curated,
        version=DatasetVersion(
            md5="0" * 32, nfiles=1, size=1, dvc_file=tmp_path / "x.dvc", remote_url="none"
        ),
        data_yaml=curated.path / "data.yaml",
    )

    @dg.asset(name="curated_dataset")
    def curated_stub() -> CuratedDatasetVersion:
        return cdv

    resources = {
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
        "frame_store": FrameStoreResource(root=str(tmp_path / "frames")),
        "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
        "mlflow": MlflowResource(
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            experiment="al-test",
            artifact_root=str(tmp_path / "mlartifacts"),
            registered_model_name="al-detector",
        ),
        "trainer": TrainerResource(model=str(ckpt), imgsz=96, epochs=1, batch=4),
        "fiftyone": fiftyone,
    }
    # Both cameras ingested: frame_embeddings reads their sampled_edge_frames indexes.
    instance = dg.DagsterInstance.ephemeral()
    _ingest(instance, resources, ["atl_day", "atl_night"])
    return {
        "curated_stub": curated_stub,
        "resources": resources,
        "instance": instance,
        "tmp": tmp_path,
        "curated": cdv,
        "shared": shared_dir,
    }


def _ingest(instance: dg.DagsterInstance, resources: dict, cameras: list[str]) -> None:
    """Add the camera partitions and materialize sampled_edge_frames for each of them."""
    from assets.ingestion import sampled_edge_frames
    from assets.partitions import camera_partitions

    instance.add_dynamic_partitions(camera_partitions.name, cameras)
    for camera in cameras:
        result = dg.materialize(
            [sampled_edge_frames], partition_key=camera, resources=resources, instance=instance
        )
        assert result.success


def _materialize(world, assets: list, selection: list, run_config: dict | None = None):
    from assets.ingestion import sampled_edge_frames

    result = dg.materialize(
        [world["curated_stub"], sampled_edge_frames, *assets],
        selection=dg.AssetSelection.assets(*selection),
        resources=world["resources"],
        instance=world["instance"],
        run_config=run_config or {},
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def test_queue_review_import_round_trip(world, fiftyone) -> None:
    import fiftyone as fo

    from assets.active_learning import active_learning_queue, frame_embeddings, reviewed_labels
    from roadloop.data.datasets import build_curated_dataset, load_taxonomy
    from roadloop.labeling.oracle import SimulatedAnnotator, simulate_reviews

    budget = {"ops": {"active_learning_queue": {"config": {"budget": 4}}}}
    result = _materialize(
        world,
        [frame_embeddings, active_learning_queue],
        ["curated_dataset", frame_embeddings, active_learning_queue],
        budget,
    )
    emb = result.output_for_node("frame_embeddings")
    assert emb.model.alias == "candidate" and emb.candidate_table.dim > 0
    # The salt-and-pepper augmented frames are not candidates; the count is reported.
    assert sorted(c.record.frame_id for c in emb.candidates) == ["r0", "r1", "r3", "r4"]
    assert emb.skipped_noisy == 2
    meta = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert meta["frame_embeddings"]["excluded_noisy_frames"].value == 2
    assert meta["active_learning_queue"]["excluded_noisy_frames"].value == 2
    batch = result.output_for_node("active_learning_queue")
    assert batch.queued == 4 and batch.added == 4 and batch.excluded_noisy == 2
    assert sum(batch.per_camera.values()) == 4 and set(batch.per_camera) == {"atl_day", "atl_night"}
    assert batch.app_url.endswith(
        f"/datasets/{fiftyone.dataset_name}?view={batch.view.replace('_', '-')}"
    )

    store = fiftyone.store()
    ds = store.dataset()
    assert len(ds) == 4 and batch.view in ds.list_saved_views()
    view = ds.load_saved_view(batch.view)
    scores = view.values("al_score")
    assert scores == sorted(scores, reverse=True)
    taxonomy = set(load_taxonomy().classes)
    n_preds = n_drafts = 0
    for s in ds:
        assert s.labels_ref and s.source == "replay:atl_v2" and s.model_version == "1"
        assert {d.label for d in s.predictions.detections} <= taxonomy
        # The draft is the confident part of the predictions, which stay complete.
        confident = [d for d in s.predictions.detections if d.confidence >= store.draft_conf]
        boxes = {tuple(d.bounding_box) for d in confident}
        assert {tuple(d.bounding_box) for d in s.ground_truth.detections} <= boxes
        assert len(s.ground_truth.detections) <= len(confident)
        n_preds += len(s.predictions.detections)
        n_drafts += len(s.ground_truth.detections)
    assert 0 < n_drafts < n_preds  # two label sets that differ (and so render apart)

    # What an annotator sees: instructions, named task views, distinct colours, folded fields.
    assert "tag the sample `reviewed`" in ds.description
    assert {VIEW_QUEUE, VIEW_REVIEWED, VIEW_LABEL_ISSUES} <= set(ds.list_saved_views())
    assert "review_queue" not in ds.list_saved_views()
    assert ds.get_saved_view_info(VIEW_QUEUE)["description"]
    colors = {f["path"]: f["fieldColor"] for f in ds.app_config.color_scheme.fields}
    assert colors["predictions"] != colors["ground_truth"]
    groups = {g.name: g for g in ds.app_config.sidebar_groups}
    assert groups["review"].expanded and not groups["details"].expanded
    assert {"label_issue_score", "source_image", "suspect_boxes"} <= set(groups["details"].paths)
    assert ds.app_config.active_fields.paths == ["ground_truth", "predictions"]

    # Two frames answered by the simulated annotator; one edited badly by "a person".
    reviewed = simulate_reviews(store, SimulatedAnnotator(), 2)
    assert len(reviewed) == 2
    (bad_id, _), *_ = store.queue_items()
    s = ds[bad_id]
    s.ground_truth = fo.Detections(
        detections=[fo.Detection(label="tank", bounding_box=[0.1, 0.1, 0.2, 0.2])]
    )
    s.save()
    store.tag_reviewed([bad_id])

    imported = _materialize(world, [reviewed_labels], [reviewed_labels])
    export = imported.output_for_node("reviewed_labels")
    assert sorted(export.new_sample_ids) == sorted(reviewed)
    assert [r.sample_id for r in export.rejected] == [
        bad_id
    ] and "unknown class 'tank'" in export.rejected[0].error
    meta = imported.get_asset_materialization_events()[0].materialization.metadata
    assert meta["rejected"].value == 1 and meta["newly_imported"].value == 2
    assert store.pending_reviews() == []
    assert bad_id in ds.load_saved_view(VIEW_QUEUE).values("id")
    assert all(TAG_IMPORTED in ds[i].tags for i in reviewed)

    # What curated_dataset does with it: the reviewed frames enter as extra frames.
    curated = build_curated_dataset(
        [],
        world["tmp"] / "curated2",
        load_taxonomy(),
        replay_fraction=0.3,
        extra_frames=[
            f.model_copy(update={"split": "val"}) if i == 0 else f
            for i, f in enumerate(export.frames)
        ],
        progress=False,
    )
    assert curated.source_counts["reviewed"] == {"train": 1, "val": 1, "test": 0}

    # Next batch: reviewed frames are no longer candidates.
    again = _materialize(world, [frame_embeddings], ["curated_dataset", frame_embeddings])
    assert again.output_for_node("frame_embeddings").skipped_reviewed == 2


def test_label_quality_tags_flagged_frames_for_re_review(
    world, fiftyone, monkeypatch: pytest.MonkeyPatch
) -> None:
    import assets.active_learning as al
    from roadloop.labeling.label_quality import (
        BoxIssue,
        ImageQuality,
        LabelQualityReport,
        dataset_split_frames,
    )

    dataset_dir = world["curated"].dataset.path
    frames = dataset_split_frames(dataset_dir, "train")
    assert len(frames) >= 2
    seen = {}

    def fake_find(labels, predictions, class_names, **kw):
        seen["find"] = kw
        imgs = [
            ImageQuality(
                image=str(frames[0][0]),
                quality_score=0.2,
                flagged=True,
                n_labels=1,
                issues=[
                    BoxIssue(
                        type="swap",
                        description="wrong class",
                        box=0,
                        class_name="car",
                        xyxy=(1, 1, 20, 20),
                        score=0.1,
                    )
                ],
            ),
            ImageQuality(image=str(frames[1][0]), quality_score=0.9, flagged=False, n_labels=1),
        ]
        return LabelQualityReport(
            class_names=class_names,
            images=imgs,
            n_flagged=1,
            issue_counts={"swap": 1},
            flagged_by_type={"swap": 1},
        )

    class FakeOOS:
        labels, predictions, class_names = [], [], ["car", "truck", "bus", "two_wheeler", "person"]

    # K-fold training and cleanlab are covered by test_label_quality; this is the wiring.
    monkeypatch.setattr(
        al, "out_of_sample_predictions", lambda d, **kw: (seen.update(kw), FakeOOS())[1]
    )
    monkeypatch.setattr(al, "find_label_issues", fake_find)
    result = _materialize(
        world,
        [al.label_quality],
        ["curated_dataset", al.label_quality],
        {"ops": {"label_quality": {"config": {"k_folds": 2}}}},
    )
    out = result.output_for_node("label_quality")
    assert (out.n_flagged, out.tagged_in_fiftyone, out.added_to_fiftyone) == (1, 1, 1)
    assert seen["k_folds"] == 2 and seen["split"] == "train"
    # The calibrated label-QA settings reach cleanlab (docs: benchmarks/results/label_qa.md).
    from roadloop.settings import get_settings

    settings = get_settings()
    assert seen["find"] == {
        "high_probability_threshold": settings.label_qa_high_probability,
        "max_quality": settings.label_qa_max_quality,
    }
    assert out.report_json.is_file()

    store = fiftyone.store()
    ds = store.dataset()
    issues = ds.load_saved_view(VIEW_LABEL_ISSUES)
    assert len(issues) == 1
    sample = issues.first()
    assert TAG_LABEL_ISSUE in sample.tags and TAG_REVIEWED not in sample.tags
    assert sample.label_issue_score == pytest.approx(0.8) and sample.label_issue_types == ["swap"]
    # Seed frame: shown from its original image, its current labels to correct.
    original = Path(sample.source_image)
    assert original.is_file() and original.is_relative_to(world["shared"])
    assert sample.filepath == str(original)
    assert sample.suspect_boxes.detections[0].label == "wrong class: car"
    export = store.export_reviewed(world["tmp"] / "export")
    assert export.exclude_images == [original]  # held out of the next curated version


def test_sampled_edge_frames_names_what_is_no_frame(tmp_path: Path) -> None:
    """An unreadable sidecar, an image without one, an empty image: left out of the index
    (as before) and now named in the run's log and counted in the metadata."""
    import logging

    from assets.ingestion import sampled_edge_frames
    from assets.partitions import camera_partitions
    from resources import ArtifactStoreResource, FrameStoreResource
    from roadloop.data.frames import FrameStore

    store = FrameStore(tmp_path / "frames")
    _write_frame(store, "cam_a", "f0", 0, _textured(0))
    _write_frame(store, "cam_a", "f1", 1, _textured(1))
    _write_frame(store, "cam_a", "f2", 2, _textured(2))
    store.find_frame("cam_a", "f1").with_suffix(".json").write_text("{not json")
    store.find_frame("cam_a", "f2").write_bytes(b"")
    _write_frame(store, "cam_a", "f3", 3, _textured(3))
    cut = store.find_frame("cam_a", "f3")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # no end-of-image marker
    _write_frame(store, "cam_a", "f4", 4, _textured(4))
    png = store.find_frame("cam_a", "f4")
    png.write_bytes(cv2.imencode(".png", _textured(4))[1].tobytes())  # renamed .jpg
    day = store.find_frame("cam_a", "f0").parent
    (day / "orphan.jpg").write_bytes(b"x")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(camera_partitions.name, ["cam_a"])
    result = dg.materialize(
        [sampled_edge_frames], partition_key="cam_a", instance=instance,
        resources={"frame_store": FrameStoreResource(root=str(tmp_path / "frames")),
                   "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts"))})
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["frames"].value == 1 and meta["store_unreadable"].value == 5
    warnings = [e.user_message for e in instance.all_logs(result.run_id)
                if e.level == logging.WARNING]
    assert any("5 entries" in w and "orphan.jpg" in w and "f1.json" in w and "f2.json" in w
               and "f3.jpg is cut short" in w and "f4.jpg is not a JPEG" in w
               for w in warnings), warnings
