"""Review/active-learning audit: defects found by probing the review loop end to end.

1. label_quality rewrites the review export, so flagged frames leave the next curated dataset;
2. the reviews sensor launches a failed or canceled import again (new run key, backoff);
3. an imported sample deleted in FiftyOne keeps its exported labels (erasure removes them);
4. a lost review dataset is an error, not a silent new empty one.

No postponed annotations: Dagster resolves the stub asset's types at definition time.
"""

import logging
import uuid
from pathlib import Path

import cv2
import dagster as dg
import numpy as np
import pytest

from resources import ArtifactStoreResource
from resources.fiftyone_resource import FiftyOneResource
from roadloop.labeling.review_dataset import TAG_IMPORTED, TAG_REVIEWED
from roadloop.labeling.review_items import ReviewBox, ReviewItem, load_review_export
from roadloop.labeling.review_store import ReviewStore, pending_key


@pytest.fixture()
def fiftyone(fiftyone_db: Path):
    res = FiftyOneResource(
        database_dir=str(fiftyone_db), dataset_name=f"test-audit-{uuid.uuid4().hex[:8]}"
    )
    yield res
    res.store().delete()


@pytest.fixture()
def artifacts(tmp_path: Path) -> ArtifactStoreResource:
    return ArtifactStoreResource(root=str(tmp_path / "artifacts"))


def _items(tmp_path: Path, n: int) -> list[ReviewItem]:
    out = []
    for i in range(n):
        img = np.full((60, 80, 3), 30 + 40 * i, np.uint8)
        cv2.rectangle(img, (10, 10), (40, 30), (0, 0, 255), -1)
        path = tmp_path / f"frame_{i}.jpg"
        cv2.imwrite(str(path), img)
        out.append(
            ReviewItem(
                camera_id="cam_a",
                frame_id=f"f{i:03d}",
                image=path,
                width=80,
                height=60,
                al_score=0.1 * (i + 1),
                predictions=[ReviewBox(label="car", box=(0.125, 1 / 6, 0.375, 1 / 3), confidence=0.6)],
            )
        )
    return out


def _imported(store: ReviewStore, tmp_path: Path, out: Path, n: int = 3) -> dict[str, str]:
    """Push ``n`` frames, review them all, export to ``out`` and tag them imported."""
    store.push_queue(_items(tmp_path, n), "b1")
    ids = {s.frame_key: s.id for s in store.dataset()}
    store.tag_reviewed(list(ids.values()))
    store.mark_imported(store.export_reviewed(out, erased=[]).new_sample_ids)
    return ids


# --------------------------------------------------------------------------- 3. deleted samples


def test_deleted_sample_keeps_its_imported_labels(
    fiftyone: FiftyOneResource, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "export"
    store = fiftyone.store().guarded_by(out)
    ids = _imported(store, tmp_path, out)
    label = next((out / "labels").glob("cam_a_f001*.txt")).read_text()

    store.dataset().delete_samples([ids["cam_a/f001"]])  # an annotator deletes it in the App
    with caplog.at_level(logging.WARNING, logger="roadloop.labeling.review_store"):
        export = store.export_reviewed(out, erased=[])
    assert export.frame_keys == ["cam_a/f000", "cam_a/f001", "cam_a/f002"]
    assert export.carried_over == ["cam_a/f001"] and export.vanished == ["cam_a/f001"]
    assert "cam_a/f001" in caplog.text and "no longer in review dataset" in caplog.text
    kept = export.frames[1]
    assert kept.image.is_file() and kept.label.read_text() == label
    assert load_review_export(out).frame_keys == export.frame_keys  # what curated_dataset reads
    # Not a queue candidate again, although FiftyOne no longer has it.
    assert "cam_a/f001" in store.reviewed_frame_keys()

    # The next export still carries it, and says so once only.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="roadloop.labeling.review_store"):
        again = store.export_reviewed(out, erased=[])
    assert again.carried_over == ["cam_a/f001"] and again.vanished == []
    assert "no longer in review dataset" not in caplog.text
    assert again.content_hash == store.export_reviewed(out, erased=[]).content_hash

    # Explicit ways out: an erasure drops it; a flag or a send-back holds a live sample out.
    erased = store.export_reviewed(out, erased=["cam_a/f001"])
    assert erased.frame_keys == ["cam_a/f000", "cam_a/f002"] and erased.carried_over == []
    store.dataset().select([ids["cam_a/f002"]]).untag_samples([TAG_REVIEWED, TAG_IMPORTED])
    assert store.export_reviewed(out, erased=[]).frame_keys == ["cam_a/f000"]


def test_erased_frames_come_from_the_privacy_ledger(
    fiftyone: FiftyOneResource, tmp_path: Path, roadloop_home: Path
) -> None:
    from roadloop.retention.ledger import PrivacyLedger
    from roadloop.settings import get_settings

    out = tmp_path / "export"
    store = fiftyone.store()
    ids = _imported(store, tmp_path, out, n=2)
    PrivacyLedger(get_settings().privacy_dir).add_exclusions(["cam_a/f000"], "req-1")
    store.delete_frames(["cam_a/f000"])  # what the erasure does next
    assert ids["cam_a/f000"] not in store.dataset().values("id")
    assert store.export_reviewed(out).frame_keys == ["cam_a/f001"]


# --------------------------------------------------------------------------- 4. lost dataset


def test_lost_review_dataset_is_an_error_not_a_new_empty_one(
    fiftyone: FiftyOneResource, artifacts: ArtifactStoreResource, tmp_path: Path
) -> None:
    from roadloop.labeling.review_store import ReviewDatasetMissingError

    out = artifacts.review_export_path()
    store = fiftyone.store().guarded_by(out)
    _imported(store, tmp_path, out, n=2)
    fo = store.fo()
    renamed = f"{fiftyone.dataset_name}-renamed"
    store.dataset().name = renamed  # renamed in the App or by a script
    try:
        for call in (store.dataset, store.pending_reviews, store.reviewed_frame_keys):
            with pytest.raises(ReviewDatasetMissingError, match="2 imported frames") as exc:
                call()
            assert "start_new_review_dataset" in str(exc.value) and str(out) in str(exc.value)
        # An unbound store guards the export it writes to.
        with pytest.raises(ReviewDatasetMissingError):
            fiftyone.store().export_reviewed(out, erased=[])
        assert fiftyone.store().delete_frames(["cam_a/f000"]) == 0  # and creates nothing
        assert not fo.dataset_exists(fiftyone.dataset_name)

        # The sensor says so instead of launching anything.
        from sensors.reviews import reviews_finished_sensor

        ctx = dg.build_sensor_context(
            instance=dg.DagsterInstance.ephemeral(),
            resources={"fiftyone": fiftyone, "artifacts": artifacts},
        )
        skip = reviews_finished_sensor(ctx)
        assert isinstance(skip, dg.SkipReason) and "does not exist" in skip.skip_message

        # Starting a new one on purpose: the exported frames stay, and are not queued again.
        fresh = fiftyone.store().guarded_by(out)
        assert len(fresh.start_new_dataset()) == 0
        assert fresh.reviewed_frame_keys() == {"cam_a/f000", "cam_a/f001"}
        assert fresh.export_reviewed(out, erased=[]).frame_keys == ["cam_a/f000", "cam_a/f001"]
    finally:
        if fo.dataset_exists(renamed):
            fo.delete_dataset(renamed)


# --------------------------------------------------------------------------- 2. sensor retries


def test_reviews_sensor_relaunches_failed_or_canceled_imports(
    fiftyone: FiftyOneResource,
    artifacts: ArtifactStoreResource,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster._core.test_utils import create_run_for_test

    from jobs import review_import_job
    from sensors import reviews

    store = fiftyone.store()
    store.push_queue(_items(tmp_path, 1), "b1")
    store.tag_reviewed(store.dataset().values("id"))
    key = pending_key(store.pending_reviews())

    with dg.instance_for_test() as instance:

        def tick(cursor: str | None):
            ctx = dg.build_sensor_context(
                instance=instance,
                cursor=cursor,
                resources={"fiftyone": fiftyone, "artifacts": artifacts},
            )
            return reviews.reviews_finished_sensor(ctx)

        def run(status: dg.DagsterRunStatus):
            return create_run_for_test(
                instance,
                job_name=review_import_job.name,
                status=status,
                tags={reviews.TAG_REVIEW_KEY: key},
            )

        first = tick(None)
        assert [r.run_key for r in first.run_requests] == [f"reviews-{key}"]
        assert first.run_requests[0].tags[reviews.TAG_REVIEW_KEY] == key

        failed = run(dg.DagsterRunStatus.FAILURE)  # e.g. the disk was full
        wait = tick(first.cursor)
        assert isinstance(wait, dg.SkipReason) and "retrying in" in wait.skip_message
        monkeypatch.setattr(reviews, "RETRY_BASE_S", 0.0)
        retry = tick(first.cursor)
        assert isinstance(retry, dg.SensorResult), getattr(retry, "skip_message", None)
        assert [r.run_key for r in retry.run_requests] == [f"reviews-{key}-retry1"]
        assert retry.cursor == f"{key}#1"

        canceling = run(dg.DagsterRunStatus.CANCELING)  # still executing
        busy = tick(retry.cursor)
        assert isinstance(busy, dg.SkipReason) and "in flight" in busy.skip_message
        instance.delete_run(canceling.run_id)
        run(dg.DagsterRunStatus.CANCELED)
        again = tick(retry.cursor)
        assert [r.run_key for r in again.run_requests] == [f"reviews-{key}-retry2"]

        run(dg.DagsterRunStatus.SUCCESS)
        done = tick(again.cursor)
        assert isinstance(done, dg.SkipReason) and "already launched" in done.skip_message
        assert failed.run_id  # kept for the record: the first failure is still listed


# --------------------------------------------------------------------------- 1. label_quality


def test_label_quality_rewrites_the_export_so_flagged_frames_are_held_out(
    fiftyone: FiftyOneResource,
    artifacts: ArtifactStoreResource,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import assets.active_learning as al
    from assets.records import CuratedDatasetVersion
    from resources import TrainerResource
    from roadloop.data.datasets import build_curated_dataset, load_taxonomy
    from roadloop.data.versioning import DatasetVersion
    from roadloop.labeling.label_quality import ImageQuality, LabelQualityReport

    out = artifacts.review_export_path()
    store = fiftyone.store()
    _imported(store, tmp_path, out, n=3)
    frames = load_review_export(out).frames
    curated = build_curated_dataset(
        [],
        tmp_path / "curated",
        load_taxonomy(),
        replay_fraction=0.3,
        extra_frames=[*frames[:2], frames[2].model_copy(update={"split": "val"})],
        progress=False,
    )
    cdv = CuratedDatasetVersion(
        dataset=curated,
        version=DatasetVersion(
            md5="1" * 32, nfiles=1, size=1, dvc_file=tmp_path / "x.dvc", remote_url="none"
        ),
        data_yaml=curated.path / "data.yaml",
    )
    train = sorted((curated.path / "images" / "train").glob("*"))
    flagged = next(p for p in train if "cam_a_f000" in p.name)
    seed = tmp_path / "seed.jpg"  # a seed frame (not from a review)
    cv2.imwrite(str(seed), np.zeros((50, 100, 3), np.uint8))

    def fake_find(labels, predictions, class_names, **kw):
        return LabelQualityReport(
            class_names=class_names,
            images=[
                ImageQuality(image=str(flagged), quality_score=0.1, flagged=True, n_labels=1),
                ImageQuality(image=str(seed), quality_score=0.2, flagged=True, n_labels=0),
            ],
            n_flagged=2,
            issue_counts={},
            flagged_by_type={},
        )

    class FakeOOS:
        labels, predictions, class_names = [], [], list(load_taxonomy().classes)

    monkeypatch.setattr(al, "out_of_sample_predictions", lambda d, **kw: FakeOOS())
    monkeypatch.setattr(al, "find_label_issues", fake_find)
    start = tmp_path / "start.pt"
    start.write_bytes(b"weights")

    @dg.asset(name="curated_dataset")
    def curated_stub() -> CuratedDatasetVersion:
        return cdv

    result = dg.materialize(
        [curated_stub, al.label_quality],
        resources={
            "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
            "fiftyone": fiftyone,
            "artifacts": artifacts,
            "trainer": TrainerResource(model=str(start), imgsz=64, epochs=1, batch=2),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    # What the next curated_dataset reads: the flagged review frame is out, the seed excluded.
    after = load_review_export(out)
    assert after.frame_keys == ["cam_a/f001", "cam_a/f002"]
    assert after.held_out[0] == "cam_a/f000" and after.held_out[1].startswith("seed/")
    assert after.exclude_images == [seed]
    meta = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }["label_quality"]
    assert meta["review_export"].value == after.content_hash
    # 5. the start weights of the K-fold models are on record.
    assert meta["start_weights"].value == str(start.absolute())
    assert result.output_for_node("label_quality").start_weights == str(start.absolute())
