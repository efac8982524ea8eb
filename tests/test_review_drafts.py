"""Pre-annotation drafts and the salt-and-pepper frame filter of the review queue (no DB)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from roadloop.labeling.drafts import DEFAULT_DRAFT_CONF, DEFAULT_DRAFT_NMS_IOU, draft_boxes
from roadloop.labeling.frame_noise import (
    DEFAULT_MAX_IMPULSE_SHARE,
    image_impulse_share,
    impulse_share,
    is_noisy,
)
from roadloop.labeling.review_items import ReviewBox
from roadloop.settings import Settings

from .helpers import require_shared


def _box(label: str, box, conf: float | None) -> ReviewBox:
    return ReviewBox(label=label, box=box, confidence=conf)


def test_draft_drops_low_confidence_and_cross_class_duplicates() -> None:
    preds = [
        _box("car", (0.10, 0.10, 0.20, 0.20), 0.90),
        _box("truck", (0.11, 0.10, 0.20, 0.21), 0.60),  # the same vehicle, second class
        _box("car", (0.60, 0.60, 0.10, 0.10), 0.30),  # below the draft confidence
        _box("bus", (0.50, 0.10, 0.30, 0.20), 0.55),  # another object
        _box("car", (0.70, 0.70, 0.10, 0.10), None),  # a human box: always kept
    ]
    draft = draft_boxes(preds, min_confidence=0.4, nms_iou=0.5)
    assert [(b.label, b.box) for b in draft] == [
        ("car", (0.10, 0.10, 0.20, 0.20)),
        ("bus", (0.50, 0.10, 0.30, 0.20)),
        ("car", (0.70, 0.70, 0.10, 0.10)),
    ]
    assert all(b.confidence is None for b in draft)  # editable boxes carry no model score
    assert [b.confidence for b in preds] == [0.90, 0.60, 0.30, 0.55, None]  # input untouched
    # The more confident of a duplicate pair wins, whatever its class.
    swapped = [preds[0].model_copy(update={"confidence": 0.5}), preds[1]]
    assert [b.label for b in draft_boxes(swapped, min_confidence=0.4)] == ["truck"]
    # Boxes that merely touch are two objects.
    apart = [_box("car", (0.0, 0.0, 0.2, 0.2), 0.9), _box("car", (0.15, 0.0, 0.2, 0.2), 0.9)]
    assert len(draft_boxes(apart, min_confidence=0.4, nms_iou=0.5)) == 2
    assert draft_boxes([], min_confidence=0.4) == []
    with pytest.raises(ValueError):
        draft_boxes(preds, min_confidence=1.5)


def test_settings_defaults_are_the_measured_ones() -> None:
    s = Settings()
    assert s.review_draft_conf == DEFAULT_DRAFT_CONF
    assert s.review_draft_nms_iou == DEFAULT_DRAFT_NMS_IOU
    assert s.review_max_impulse_share == DEFAULT_MAX_IMPULSE_SHARE


def test_impulse_share_separates_augmented_from_clean_frames(
    shared_dir: Path, tmp_path: Path
) -> None:
    # Real atl_v2 train frames, checked by eye: 1022 carries the source's heavy
    # salt-and-pepper augmentation, 1025 is a clean night frame of the same road.
    images = shared_dir / "datasets" / "atl_v2" / "images" / "train"
    noisy, clean = images / "1022_png.jpg", images / "1025_png.jpg"
    video = shared_dir / "videos" / "window_street.mp4"  # real camera footage, much texture
    for p in (noisy, clean, video):
        require_shared(p)
    assert is_noisy(image_impulse_share(noisy))
    assert not is_noisy(image_impulse_share(clean))
    # As replay stores it (JPEG quality 90), the augmented frame is still caught.
    img = cv2.imread(str(noisy))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok and is_noisy(impulse_share(cv2.imdecode(buf, cv2.IMREAD_COLOR)))
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    assert ok and not is_noisy(impulse_share(frame))
    # Synthetic check of the measure itself: 2 % specks on a smooth gradient.
    grad = np.tile(np.linspace(40, 200, 200, dtype=np.uint8), (100, 1))
    rng = np.random.default_rng(0)
    specks = grad.copy()
    idx = rng.choice(grad.size, size=grad.size // 50, replace=False)
    specks.flat[idx] = np.where(rng.random(idx.size) < 0.5, 0, 255)
    assert impulse_share(grad) == 0.0
    assert impulse_share(specks) == pytest.approx(0.02, abs=0.004)
