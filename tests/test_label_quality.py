"""Label quality (cleanlab) on fixed synthetic predictions: no training."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from roadloop.errors import InvalidInputError
from roadloop.labeling.label_quality import (
    detections_to_cleanlab,
    find_label_issues,
    hold_out_flagged,
    out_of_sample_predictions,
    read_yolo_label,
    write_report,
)

NAMES = ["car", "truck", "person"]
# Three well-separated objects per image (pixel xyxy on a 200x200 frame), one per class.
BOXES = np.array([[10, 10, 60, 50], [80, 20, 150, 90], [120, 130, 140, 190]], float)
CLASSES = np.array([0, 1, 2])


def _clean_set(n: int = 12):
    labels, preds = [], []
    for i in range(n):
        labels.append({"bboxes": BOXES.copy(), "labels": CLASSES.copy(), "image_name": f"img{i}"})
        preds.append(detections_to_cleanlab(BOXES, CLASSES, np.full(3, 0.99), len(NAMES)))
    return labels, preds


def test_planted_errors_are_flagged_by_type():
    labels, preds = _clean_set()
    labels[3]["labels"] = np.array([0, 0, 2])  # truck labelled as car: wrong class
    labels[5] = {  # person box dropped: missing box
        "bboxes": BOXES[:2].copy(),
        "labels": CLASSES[:2].copy(),
        "image_name": "img5",
    }
    shifted = BOXES.copy()
    shifted[1] += np.array([45, 45, 45, 45])  # truck box moved off the truck: bad localisation
    labels[7]["bboxes"] = shifted

    report = find_label_issues(labels, preds, NAMES)

    by_name = {i.image: i for i in report.images}
    assert by_name["img3"].flagged and "swap" in by_name["img3"].issue_types
    assert by_name["img5"].flagged and "overlooked" in by_name["img5"].issue_types
    assert by_name["img7"].flagged and "badloc" in by_name["img7"].issue_types
    clean = [by_name[f"img{i}"] for i in (0, 1, 2, 4, 6, 8, 9, 10, 11)]
    assert not any(i.flagged for i in clean)
    # Planted images score lower than every clean one.
    worst_clean = min(i.quality_score for i in clean)
    for name in ("img3", "img5", "img7"):
        assert by_name[name].quality_score < worst_clean
    assert report.n_flagged == 3
    assert report.issue_counts["swap"] >= 1 and report.issue_counts["overlooked"] >= 1
    swap = next(x for x in by_name["img3"].issues if x.type == "swap")
    assert swap.box == 1 and swap.class_name == "car" and swap.description == "wrong class"
    assert report.flagged_images()[0] in {"img3", "img5", "img7"}
    assert "wrong class" in report.to_markdown()


def test_cleanlab_never_forks(monkeypatch):
    """cleanlab's AP pools run as threads: a fork from this threaded process can deadlock.

    cleanlab 2.9 opens a fork ``multiprocessing.Pool`` it never closes; inside the full
    suite a worker inherited a held lock and the suite hung at exit. Any fork here fails.
    """
    import os

    def no_fork() -> int:
        raise AssertionError("cleanlab forked a worker process")

    monkeypatch.setattr(os, "fork", no_fork)
    labels, preds = _clean_set(4)
    labels[1]["labels"] = np.array([0, 0, 2])
    report = find_label_issues(labels, preds, NAMES)
    assert report.images[1].flagged
    from cleanlab.object_detection import filter as clf

    assert clf.Pool.__module__ == "multiprocessing.context"  # restored after the call


def test_hold_out_flagged_until_reviewed(tmp_path: Path):
    labels, preds = _clean_set(6)
    labels[2]["labels"] = np.array([0, 0, 2])
    report = find_label_issues(labels, preds, NAMES)
    frames = [f"img{i}" for i in range(6)]
    keep, held = hold_out_flagged(frames, report, key=str)
    assert held == ["img2"] and len(keep) == 5
    keep, held = hold_out_flagged(frames, report, key=str, reviewed={"img2"})
    assert held == [] and len(keep) == 6
    out = write_report(report, tmp_path / "r" / "quality.json")
    assert out.is_file() and not list(out.parent.glob(".*tmp"))


def test_mismatched_inputs_raise():
    labels, preds = _clean_set(3)
    with pytest.raises(ValueError, match="label entries"):
        find_label_issues(labels, preds[:2], NAMES)
    bad = [p[:2] for p in preds]
    with pytest.raises(InvalidInputError, match="class arrays"):
        find_label_issues(labels, bad, NAMES)


def _write_dataset(root: Path, n: int = 6) -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    for i in range(n):
        img = np.full((100, 200, 3), 90, np.uint8)
        cv2.imwrite(str(root / "images" / "train" / f"f{i}.jpg"), img)
        (root / "labels" / "train" / f"f{i}.txt").write_text("1 0.5 0.5 0.2 0.4\n")
    (root / "data.yaml").write_text(
        "train: images/train\nval: images/val\nnames:\n  0: car\n  1: truck\n  2: person\n"
    )
    return root


def test_read_yolo_label_pixels_and_errors(tmp_path: Path):
    root = _write_dataset(tmp_path / "ds", 1)
    img = root / "images" / "train" / "f0.jpg"
    lab = read_yolo_label(img, root / "labels" / "train" / "f0.txt", 3)
    np.testing.assert_allclose(lab["bboxes"], [[80, 30, 120, 70]])
    assert lab["labels"].tolist() == [1]
    assert read_yolo_label(img, tmp_path / "missing.txt", 3)["labels"].size == 0  # background
    bad = tmp_path / "bad.txt"
    bad.write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(InvalidInputError, match="bad.txt"):
        read_yolo_label(img, bad, 3)


def test_out_of_sample_predictions_never_predict_a_training_frame(tmp_path: Path):
    root = _write_dataset(tmp_path / "ds", 7)
    calls = []

    def fake_fit_predict(train, heldout, fold_dir, names):
        assert not set(train) & set(heldout)
        calls.append((list(train), list(heldout)))
        # Predict exactly the labelled truck box.
        return [
            detections_to_cleanlab([[80, 30, 120, 70]], [1], [0.9], len(names)) for _ in heldout
        ]

    oos = out_of_sample_predictions(
        root, k_folds=3, work_dir=tmp_path / "w", fit_predict=fake_fit_predict
    )
    assert len(calls) == 3
    assert sorted(p for _, h in calls for p in h) == sorted(oos.images)
    assert len(oos.predictions) == len(oos.labels) == 7
    assert set(oos.folds) == {0, 1, 2}
    report = find_label_issues(oos.labels, oos.predictions, oos.class_names)
    assert report.n_flagged == 0
    with pytest.raises(ValueError, match="train_cfg"):
        out_of_sample_predictions(root, k_folds=2, work_dir=tmp_path / "w2")


def test_out_of_sample_predictions_with_real_training(tmp_path: Path):
    """The default K-fold step trains (1 epoch, 64 px, scratch YOLO11n) and predicts."""
    from roadloop.data.datasets import build_curated_dataset, load_taxonomy, make_synthetic_dataset
    from roadloop.models.training import TrainConfig, configure_ultralytics

    configure_ultralytics(tmp_path / "ultralytics")
    synth = make_synthetic_dataset(tmp_path / "synth", n_train=6, n_val=2, n_test=0, imgsz=64)
    ds = build_curated_dataset([synth], tmp_path / "curated", load_taxonomy(), 0.0, progress=False)
    cfg = TrainConfig(
        model="yolo11n.yaml", fallback_weights=[], imgsz=64, epochs=1, batch=4, workers=0
    )
    oos = out_of_sample_predictions(ds.path, k_folds=2, train_cfg=cfg, work_dir=tmp_path / "kf")
    assert len(oos.images) == len(oos.predictions) == 6
    assert all(len(p) == len(oos.class_names) for p in oos.predictions)
    assert (tmp_path / "kf" / "fold_0" / "run" / "train" / "weights").is_dir()
    assert not list((ds.path / "labels").glob("*.cache"))  # caches stay in the fold folders
    find_label_issues(oos.labels, oos.predictions, oos.class_names)  # runs on real output


def _yolo_like_set(n: int = 6):
    """A wrong-class label (img3) under predictions as sure as a YOLO model gets (0.8)."""
    labels, preds = _clean_set(n)
    labels[3]["labels"] = np.array([0, 0, 2])
    preds = [detections_to_cleanlab(BOXES, CLASSES, np.full(3, 0.8), len(NAMES))] * n
    return labels, preds


def test_calibrated_confidence_lets_the_swap_check_fire():
    labels, preds = _yolo_like_set()
    # cleanlab's 0.95: no prediction counts as confident, the wrong class goes unseen.
    default = find_label_issues(labels, preds, NAMES)
    assert default.n_flagged == 0 and default.high_probability_threshold == 0.95
    calibrated = find_label_issues(labels, preds, NAMES, high_probability_threshold=0.7)
    assert [i.flagged for i in calibrated.images] == [i == 3 for i in range(6)]
    assert calibrated.images[3].issue_types == ["swap"]
    assert calibrated.images[3].quality_score < default.images[3].quality_score


def test_platform_quality_threshold_flags_low_score_images_only():
    from roadloop.settings import Settings

    s = Settings()
    assert s.label_qa_flag_by == "score" and 0 < s.label_qa_max_quality < 1
    labels, preds = _yolo_like_set()
    report = find_label_issues(
        labels,
        preds,
        NAMES,
        high_probability_threshold=s.label_qa_high_probability,
        max_quality=s.label_qa_max_quality,
    )
    scores = [i.quality_score for i in report.images]
    assert scores[3] < s.label_qa_max_quality < min(scores[:3] + scores[4:])
    assert [i.flagged for i in report.images] == [i == 3 for i in range(6)]
    assert report.images[3].low_quality and "low_quality" in report.images[3].issue_types
    assert report.n_low_quality == 1 and report.max_quality == s.label_qa_max_quality
    # A threshold below every score flags nothing, whatever the per-box checks say.
    none = find_label_issues(labels, preds, NAMES, high_probability_threshold=0.7, max_quality=0)
    assert none.n_flagged == 0 and none.images[3].issue_types == ["swap"]
    with pytest.raises(ValueError):
        find_label_issues(labels, preds, NAMES, max_quality=1.5)


def test_quality_threshold_for_budget():
    from roadloop.labeling.label_qa_calibration import quality_threshold_for_budget

    scores = [0.9, 0.1, 0.8, 0.3, 0.95, 0.7, 0.6, 0.85, 0.2, 0.99]
    t = quality_threshold_for_budget(scores, 0.2)  # 2 of 10 may be flagged
    assert 0.2 < t < 0.3 and sum(x < t for x in scores) == 2
    assert quality_threshold_for_budget(scores, 0.0) == 0.0
    assert sum(x < quality_threshold_for_budget(scores, 1.0) for x in scores) == 10
    # Images flagged by other checks spend the budget first.
    anyway = [False, True, False, False, False, False, False, False, False, False]
    t = quality_threshold_for_budget(scores, 0.2, anyway)
    assert 0.2 < t < 0.3 and sum(x < t for x, a in zip(scores, anyway) if not a) == 1


def test_confidence_at_precision():
    from roadloop.labeling.label_qa_calibration import confidence_at_precision

    box = np.array([[10.0, 10, 50, 50]])
    far = np.array([[100.0, 100, 140, 140]])
    labels = [{"bboxes": box, "labels": np.array([0])} for _ in range(4)]
    # One prediction per image: correct at 0.9, 0.8 and 0.6, a false positive at 0.7.
    preds = [
        detections_to_cleanlab(b, np.array([0]), np.array([c]), 2)
        for b, c in ((box, 0.9), (box, 0.8), (far, 0.7), (box, 0.6))
    ]
    assert confidence_at_precision(labels, preds, target_precision=0.95) == pytest.approx(0.8)
    assert confidence_at_precision(labels, preds, target_precision=0.75) == pytest.approx(0.6)
    # A right box with the wrong class does not count.
    wrong = [detections_to_cleanlab(box, np.array([1]), np.array([0.9]), 2)]
    assert confidence_at_precision(labels[:1], wrong) == pytest.approx(0.9)  # best it has
    with pytest.raises(ValueError):
        confidence_at_precision(labels[:1], [detections_to_cleanlab(box[:0], [], [], 2)])


def test_label_qa_settings_from_environment(monkeypatch: pytest.MonkeyPatch):
    from pydantic import ValidationError

    from roadloop.settings import Settings

    monkeypatch.setenv("ROADLOOP_LABEL_QA_FLAG_BY", "boxes")
    monkeypatch.setenv("ROADLOOP_LABEL_QA_HIGH_PROBABILITY", "0.95")
    s = Settings()
    assert (s.label_qa_flag_by, s.label_qa_high_probability) == ("boxes", 0.95)
    monkeypatch.setenv("ROADLOOP_LABEL_QA_FLAG_BY", "sometimes")
    with pytest.raises(ValidationError):
        Settings()
