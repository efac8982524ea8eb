"""FiftyOne review round trip: queue → annotator edits + `reviewed` tag → validated import."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from roadloop.labeling.fiftyone_setup import FiftyOneUnavailable
from roadloop.labeling.review_dataset import (
    TAG_IMPORTED,
    TAG_LABEL_ISSUE,
    TAG_REVIEW_ERROR,
    TAG_REVIEWED,
    VIEW_LABEL_ISSUES,
    VIEW_QUEUE,
    app_url,
)
from roadloop.labeling.review_items import (
    LabelIssueItem,
    ReviewBox,
    ReviewItem,
    items_from_queue,
    load_review_export,
)
from roadloop.labeling.review_store import ReviewStore, pending_key


@pytest.fixture()
def store(fiftyone_db: Path):
    s = ReviewStore(f"test-review-{uuid.uuid4().hex[:8]}", database_dir=fiftyone_db)
    yield s
    s.delete()


def _frames(tmp_path: Path, n: int, w: int = 80, h: int = 60) -> list[ReviewItem]:
    items = []
    for i in range(n):
        img = np.full((h, w, 3), 30 + 40 * i, np.uint8)
        cv2.rectangle(img, (10, 10), (40, 30), (0, 0, 255), -1)
        path = tmp_path / f"frame_{i}.jpg"
        cv2.imwrite(str(path), img)
        items.append(
            ReviewItem(
                camera_id="cam_a" if i % 2 == 0 else "cam_b",
                frame_id=f"f{i:03d}",
                image=path,
                width=w,
                height=h,
                al_score=0.1 * (i + 1),
                predictions=[
                    ReviewBox(label="car", box=(0.125, 1 / 6, 0.375, 1 / 3), confidence=0.4)
                ],
                model_version="3",
            )
        )
    return items


def _rows(label_file: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in label_file.read_text().splitlines()]


def test_round_trip_queue_review_import(store: ReviewStore, tmp_path: Path) -> None:
    import fiftyone as fo

    items = _frames(tmp_path, 4)
    pushed = store.push_queue(items, "0001")
    assert (pushed.added, pushed.updated) == (4, 0)

    ds = store.dataset()
    assert ds.persistent
    assert ds.active_label_schemas == ["ground_truth"]  # editable in the App; predictions read-only
    assert ds.label_schemas["ground_truth"]["classes"] == [
        "car",
        "truck",
        "bus",
        "two_wheeler",
        "person",
    ]
    assert ds.label_schemas["predictions"]["read_only"] is True
    assert {"batch_0001", VIEW_QUEUE, VIEW_LABEL_ISSUES} <= set(ds.list_saved_views())
    batch = ds.load_saved_view("batch_0001")
    assert batch.values("frame_key") == ["cam_b/f003", "cam_a/f002", "cam_b/f001", "cam_a/f000"]
    sample = ds.match(fo.ViewField("frame_key") == "cam_a/f000").first()
    assert sample.camera_id == "cam_a" and sample.frame_id == "f000" and sample.batch_id == "0001"
    assert sample.al_score == pytest.approx(0.1)
    assert sample.predictions.detections[0].label == "car"
    assert sample.predictions.detections[0].confidence == pytest.approx(0.4)
    # Pre-annotation: ground truth starts as the model's boxes, for correction.
    assert sample.ground_truth.detections[0].bounding_box == pytest.approx(
        [0.125, 1 / 6, 0.375, 1 / 3]
    )

    # An annotator corrects one frame (moves the box, adds a truck) and tags two frames reviewed.
    queue = store.queue_items()
    assert queue[0][1].frame_key == "cam_b/f003"  # highest al_score first
    first_id, second_id = queue[0][0], queue[1][0]
    s = ds[first_id]
    s.ground_truth.detections[0].bounding_box = [0.5, 0.5, 0.25, 0.25]
    s.ground_truth.detections.append(fo.Detection(label="truck", bounding_box=[0.0, 0.0, 0.5, 0.5]))
    s.save()
    ds.select([first_id, second_id]).tag_samples(TAG_REVIEWED)  # what the App's tag editor does

    assert store.pending_reviews() == sorted([first_id, second_id])
    out = tmp_path / "export"
    export = store.export_reviewed(out)
    assert sorted(export.new_sample_ids) == sorted([first_id, second_id])
    assert export.new_per_camera == {"cam_a": 1, "cam_b": 1}  # what drift_sensor waits for
    assert export.rejected == []
    assert sorted(export.frame_keys) == ["cam_a/f002", "cam_b/f003"]
    frame = export.frames[export.frame_keys.index("cam_b/f003")]
    assert frame.image.is_file() and frame.image.parent == out / "images"
    assert frame.class_names is None and frame.split == "train"  # taxonomy ids
    assert _rows(frame.label) == [
        pytest.approx([0, 0.625, 0.625, 0.25, 0.25]),
        pytest.approx([1, 0.25, 0.25, 0.5, 0.5]),
    ]
    assert (out / "manifest.jsonl").is_file() and (out / "data.yaml").is_file()

    assert store.mark_imported(export.new_sample_ids) == 2
    assert store.pending_reviews() == []
    assert set(ds[first_id].tags) == {TAG_REVIEWED, TAG_IMPORTED}
    assert len(ds.load_saved_view(VIEW_QUEUE)) == 2  # the other two still wait

    # The export is cumulative: imported frames stay in later exports (nothing is lost).
    again = store.export_reviewed(out)
    assert sorted(again.frame_keys) == ["cam_a/f002", "cam_b/f003"] and again.new_sample_ids == []
    assert again.new_per_camera == {}
    assert again.content_hash == export.content_hash
    # curated_dataset reads the last export back from disk (empty before the first one).
    assert load_review_export(out) == again
    assert load_review_export(tmp_path / "no-export-yet").frames == []

    # Re-queueing a reviewed frame keeps the annotator's work; an unreviewed one moves batch.
    repush = store.push_queue(items, "0002")
    assert (repush.added, repush.updated, repush.skipped_reviewed) == (0, 2, 2)
    assert ds[first_id].ground_truth.detections[1].label == "truck"
    assert len(ds.load_saved_view("batch_0002")) == 2


def test_exported_labels_feed_the_curated_dataset(store: ReviewStore, tmp_path: Path) -> None:
    from roadloop.data.datasets import (
        SourceSpec,
        build_curated_dataset,
        load_taxonomy,
        make_synthetic_dataset,
    )

    items = _frames(tmp_path, 2)
    store.push_queue(items, "b")
    ids = store.pending_reviews() or [sid for sid, _ in store.queue_items()]
    store.tag_reviewed(ids)
    export = store.export_reviewed(tmp_path / "export")
    source: SourceSpec = make_synthetic_dataset(
        tmp_path / "synth", n_train=4, n_val=2, n_test=2, imgsz=64
    )
    curated = build_curated_dataset(
        [source],
        tmp_path / "curated",
        load_taxonomy(),
        replay_fraction=0.0,
        extra_frames=export.frames,
        progress=False,
    )
    assert curated.source_counts["reviewed"]["train"] == 2
    assert curated.quarantined == 0


@pytest.mark.parametrize(
    ("label", "box", "expected"),
    [
        ("car", [0.9, 0.1, 0.3, 0.2], "lies outside the image"),
        ("car", [-0.2, 0.1, 0.3, 0.2], "lies outside the image"),
        ("van", [0.1, 0.1, 0.3, 0.2], "unknown class 'van'"),
        ("car", [0.1, 0.1, 0.0, 0.2], "width and height must be > 0"),
    ],
)
def test_bad_edits_are_rejected_and_stay_in_queue(
    store: ReviewStore, tmp_path: Path, label: str, box: list[float], expected: str
) -> None:
    import fiftyone as fo

    store.push_queue(_frames(tmp_path, 2), "b1")
    ds = store.dataset()
    (bad_id, bad), (good_id, _) = store.queue_items()
    s = ds[bad_id]
    s.ground_truth.detections.append(fo.Detection(label=label, bounding_box=box))
    s.save()
    store.tag_reviewed([bad_id, good_id])

    export = store.export_reviewed(tmp_path / "export")
    assert export.new_sample_ids == [good_id]
    assert [r.sample_id for r in export.rejected] == [bad_id]
    message = export.rejected[0].error
    assert expected in message and bad.frame_key in message and str(bad.image) in message
    assert export.frame_keys == [ds[good_id].frame_key]
    assert not any(bad.frame_id in p.name for p in (tmp_path / "export" / "labels").iterdir())

    s = ds[bad_id]
    assert TAG_REVIEWED not in s.tags and TAG_REVIEW_ERROR in s.tags
    assert expected in s.review_error
    assert bad_id in ds.load_saved_view(VIEW_QUEUE).values("id")  # back in the queue
    assert store.pending_reviews() == [good_id]  # the sensor would not re-fire on the bad one

    # The annotator fixes the edit and tags it again: it imports, the error is cleared.
    s.ground_truth.detections = s.ground_truth.detections[:1]
    s.save()
    store.tag_reviewed([bad_id])
    fixed = store.export_reviewed(tmp_path / "export")
    assert bad_id in fixed.new_sample_ids and fixed.rejected == []
    s = ds[bad_id]
    assert s.review_error is None and TAG_REVIEW_ERROR not in s.tags


def test_failed_export_leaves_previous_export_and_tags(
    store: ReviewStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fiftyone as fo

    from roadloop.labeling import review_items

    store.push_queue(_frames(tmp_path, 2), "b1")
    ds = store.dataset()
    (a, _), (b, _) = store.queue_items()
    store.tag_reviewed([a])
    out = tmp_path / "export"
    first = store.export_reviewed(out)
    before = sorted(p.name for p in (out / "labels").iterdir())

    s = ds[b]
    s.ground_truth.detections.append(fo.Detection(label="van", bounding_box=[0.1, 0.1, 0.2, 0.2]))
    s.save()
    store.tag_reviewed([b])

    def boom(tmp: Path, dest: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(review_items, "swap_dir_into_place", boom)
    with pytest.raises(OSError, match="disk full"):
        store.export_reviewed(out)
    assert sorted(p.name for p in (out / "labels").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-export")]
    # FiftyOne untouched: the bad sample is still tagged reviewed, no error recorded yet.
    assert TAG_REVIEWED in ds[b].tags and ds[b].review_error is None
    assert first.frame_keys == [ds[a].frame_key]


def test_label_issues_are_tagged_and_held_out_until_re_reviewed(
    store: ReviewStore, tmp_path: Path
) -> None:
    items = _frames(tmp_path, 2)
    store.push_queue(items, "b1")
    ds = store.dataset()
    ids = [sid for sid, _ in store.queue_items()]
    store.tag_reviewed(ids)
    store.mark_imported(store.export_reviewed(tmp_path / "export").new_sample_ids)

    seed_img = tmp_path / "seed.jpg"
    cv2.imwrite(str(seed_img), np.zeros((50, 100, 3), np.uint8))
    flagged_key = ds[ids[0]].frame_key
    result = store.tag_label_issues(
        [
            LabelIssueItem(
                image=ds[ids[0]].filepath, score=0.7, frame_key=flagged_key, issue_types=["swap"]
            ),
            LabelIssueItem(
                image=seed_img,
                score=0.9,
                source_image=seed_img,
                width=100,
                height=50,
                labels=[ReviewBox(label="bus", box=(0.1, 0.1, 0.2, 0.2))],
                suspect=[ReviewBox(label="wrong class: bus", box=(0.1, 0.1, 0.2, 0.2))],
                issue_types=["swap"],
            ),
        ]
    )
    assert (result.tagged, result.added) == (2, 1)
    view = ds.load_saved_view(VIEW_LABEL_ISSUES)
    assert view.values("label_issue_score") == pytest.approx([0.9, 0.7])  # worst first
    flagged = ds[ids[0]]
    assert TAG_LABEL_ISSUE in flagged.tags and TAG_REVIEWED not in flagged.tags
    assert TAG_IMPORTED not in flagged.tags

    held = store.export_reviewed(tmp_path / "export")
    assert flagged_key not in held.frame_keys and flagged_key in held.held_out
    assert held.exclude_images == [seed_img]  # the seed copy stays out of training
    seed = view.first()
    assert seed.ground_truth.detections[0].label == "bus" and seed.source_image == str(seed_img)

    # Re-review both: they import again and the label issue closes.
    store.tag_reviewed(view.values("id"))
    again = store.export_reviewed(tmp_path / "export")
    assert flagged_key in again.frame_keys and again.held_out == []
    assert again.exclude_images == [seed_img]  # replaced by its reviewed copy
    store.mark_imported(again.new_sample_ids)
    assert len(ds.load_saved_view(VIEW_LABEL_ISSUES)) == 0


def test_simulated_annotator_reviews_through_fiftyone(store: ReviewStore, tmp_path: Path) -> None:
    from roadloop.labeling.oracle import ANNOTATOR_NAME, SimulatedAnnotator, simulate_reviews

    src = tmp_path / "src"
    (src / "labels" / "train").mkdir(parents=True)
    (src / "data.yaml").write_text("names: {0: bike, 1: car}\n")
    items = _frames(tmp_path, 3)
    for i, it in enumerate(items[:2]):
        label = src / "labels" / "train" / f"{it.frame_id}.txt"
        label.write_text("1 0.5 0.5 0.2 0.4\n0 0.25 0.25 0.1 0.1\n" if i == 0 else "")
        items[i] = it.model_copy(update={"labels_ref": str(label), "source": "replay:atl_v2"})
    store.push_queue(items, "b1")  # items[2] has no ground truth: a person must review it

    done = simulate_reviews(store, SimulatedAnnotator(), n=5)
    assert len(done) == 2
    ds = store.dataset()
    assert sorted(store.pending_reviews()) == sorted(done)
    first = (
        ds.match_tags(TAG_REVIEWED)
        .match(__import__("fiftyone").ViewField("frame_id") == "f000")
        .first()
    )
    assert first.annotated_by == ANNOTATOR_NAME
    gt = [(d.label, d.bounding_box) for d in first.ground_truth.detections]
    assert gt[0][0] == "car" and gt[0][1] == pytest.approx([0.4, 0.3, 0.2, 0.4])
    assert gt[1][0] == "two_wheeler"
    assert [i.frame_id for _, i in store.queue_items()] == ["f002"]
    export = store.export_reviewed(tmp_path / "export")
    assert len(export.frames) == 2 and export.rejected == []


def test_items_from_active_learning_queue(store: ReviewStore, tmp_path: Path) -> None:
    from roadloop.data.frame_records import Detection
    from roadloop.labeling.active_learning import FramePrediction, build_queue

    items = _frames(tmp_path, 3, w=100, h=50)
    preds = [
        FramePrediction(
            frame_id=it.frame_id,
            camera_id=it.camera_id,
            image=it.image,
            model_version="7",
            detections=[
                Detection(
                    class_id=0, class_name="bike", confidence=0.3 + 0.2 * i, xyxy=(10, 5, 60, 25)
                )
            ],
        )
        for i, it in enumerate(items)
    ]
    queue = build_queue(preds, None, None, {}, budget=2, strategy="uncertainty")
    converted = items_from_queue(queue)
    assert len(converted) == 2
    assert converted[0].width == 100 and converted[0].height == 50
    assert converted[0].predictions[0].box == pytest.approx((0.1, 0.1, 0.5, 0.4))
    assert converted[0].al_score == pytest.approx(queue.rows[0].scores.total)
    store.push_queue(queue, "q1")  # an ALQueue is accepted directly
    ds = store.dataset()
    labels = {d.label for s in ds for d in s.predictions.detections}
    assert labels == {"two_wheeler"}  # a source head's class name mapped onto the taxonomy


def test_push_drafts_ground_truth_and_keeps_predictions_complete(
    store: ReviewStore, tmp_path: Path
) -> None:
    item = _frames(tmp_path, 1)[0].model_copy(
        update={
            "predictions": [
                ReviewBox(label="car", box=(0.1, 0.1, 0.4, 0.4), confidence=0.8),
                ReviewBox(label="truck", box=(0.12, 0.1, 0.4, 0.4), confidence=0.7),  # same car
                ReviewBox(label="bus", box=(0.6, 0.5, 0.3, 0.3), confidence=0.2),  # unsure
            ]
        }
    )
    store.push_queue([item], "d1")
    sample = store.dataset().first()
    assert [(d.label, d.confidence) for d in sample.predictions.detections] == [
        ("car", pytest.approx(0.8)),
        ("truck", pytest.approx(0.7)),
        ("bus", pytest.approx(0.2)),
    ]
    assert [(d.label, d.confidence) for d in sample.ground_truth.detections] == [("car", None)]


def test_pending_key_is_order_independent() -> None:
    assert pending_key(["b", "a"]) == pending_key(["a", "b"]) != pending_key(["a"])


def test_one_database_per_process(fiftyone_db: Path, tmp_path: Path) -> None:
    with pytest.raises(FiftyOneUnavailable, match="already connected"):
        ReviewStore("x", database_dir=tmp_path / "other-db").dataset()


def test_app_url() -> None:
    assert (
        app_url("roadloop-review", 5151)
        == "http://127.0.0.1:5151/datasets/roadloop-review?view=to-review"
    )
    assert (
        app_url("d", 6000, view="batch_20260101-1")
        == "http://127.0.0.1:6000/datasets/d?view=batch-20260101-1"
    )


def test_annotate_command_prints_the_url(
    store: ReviewStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    import launch.annotate as cli

    store.push_queue(_frames(tmp_path, 1), "b1")
    launched = {}

    def fake_launch(dataset, **kwargs):
        launched.update(kwargs, dataset=dataset.name)
        return object()

    fo = store.fo()
    monkeypatch.setattr(fo, "launch_app", fake_launch)
    monkeypatch.setattr(cli, "review_store", lambda: store)
    app = typer.Typer()
    app.command()(cli.annotate)
    result = CliRunner().invoke(app, ["--port", "5199", "--no-wait"])
    assert result.exit_code == 0, result.output
    assert f"http://127.0.0.1:5199/datasets/{store.dataset_name}?view=to-review" in result.output
    assert launched["port"] == 5199 and launched["address"] == "127.0.0.1"
    assert launched["dataset"] == store.dataset_name and launched["remote"] is True


def test_fresh_process_after_mlflow_uses_the_configured_database(tmp_path: Path) -> None:
    """The Dagster code location imports mlflow first (which makes ``import fiftyone`` fail
    on voxel51-eta's metadata) and never configures FiftyOne by hand: the store must."""
    import subprocess

    db = tmp_path / "db"
    img = tmp_path / "x.jpg"
    cv2.imwrite(str(img), np.zeros((20, 30, 3), np.uint8))
    script = (
        "import mlflow, sys\n"
        "from roadloop.labeling.review_items import ReviewItem\n"
        "from roadloop.labeling.review_store import ReviewStore\n"
        f"s = ReviewStore('fresh', database_dir={str(db)!r})\n"
        f"s.push_queue([ReviewItem(camera_id='c', frame_id='f', image={str(img)!r}, width=30, height=20)], 'b')\n"
        "import fiftyone as fo\n"
        "print('OK', len(s.dataset()), fo.config.database_dir)\n"
        "s.delete()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"OK 1 {db}" in out.stdout


def test_the_annotate_cli_store_is_bound_to_the_assets_review_export() -> None:
    """``roadloop annotate`` uses the store the assets use, bound to the same export, so a lost
    review dataset is an error there too, never a new empty one (``ReviewStore.guarded_by``)."""
    from launch import annotate as cli
    from resources import build_resources
    from roadloop.settings import get_settings

    expected = build_resources(get_settings(), profile="test")["artifacts"].review_export_path()
    assert cli.review_store().export_dir == expected
