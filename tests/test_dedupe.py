"""Near-duplicate policy for sampled frames (``DedupePolicy``), on real camera footage."""

from __future__ import annotations

from datetime import timedelta

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from roadloop.data.curation import DedupePolicy, dedupe_near_duplicates
from roadloop.data.frame_records import Detection

from .helpers import SHARED_DIR, needs_shared, synthetic_image
from .test_frames import T0, record

WINDOW_STREET = SHARED_DIR / "videos" / "window_street.mp4"


def _car(n: int) -> list[Detection]:
    return [Detection(class_id=0, class_name="car", confidence=0.9, xyxy=(i, 0, i + 5, 5))
            for i in range(n)]


def test_same_view_with_other_vehicles_is_not_a_duplicate() -> None:
    img = synthetic_image(3)
    first = record("f1", image=img, at=T0).model_copy(update={"detections": _car(2)})
    same = record("f2", image=img, at=T0 + timedelta(seconds=5)).model_copy(
        update={"detections": _car(2)})
    other_traffic = record("f3", image=img, at=T0 + timedelta(seconds=6)).model_copy(
        update={"detections": _car(5)})
    kept, dropped = dedupe_near_duplicates([first, same, other_traffic], policy=DedupePolicy())
    assert [r.frame_id for r in kept] == ["f1", "f3"]
    assert [r.frame_id for r in dropped] == ["f2"]
    # Without the detection rule the identical view drops whatever it shows.
    _, dropped_blind = dedupe_near_duplicates(
        [first, same, other_traffic], policy=DedupePolicy(same_detections=False))
    assert [r.frame_id for r in dropped_blind] == ["f2", "f3"]


def test_only_recent_kept_frames_count() -> None:
    img = synthetic_image(4)
    frames = [record(f"f{i}", image=img, at=T0 + timedelta(minutes=4 * i)) for i in range(4)]
    kept, dropped = dedupe_near_duplicates(frames, policy=DedupePolicy(max_age_s=600))
    # t=0 kept; 4 and 8 min are within 10 min of it; 12 min is not: kept again.
    assert [r.frame_id for r in kept] == ["f0", "f3"]
    assert [r.frame_id for r in dropped] == ["f1", "f2"]
    kept_forever, _ = dedupe_near_duplicates(frames, policy=DedupePolicy(max_age_s=None))
    assert [r.frame_id for r in kept_forever] == ["f0"]


def test_per_camera_threshold_overrides_the_default() -> None:
    rng = np.random.default_rng(0)
    a = synthetic_image(10)
    noisy = np.clip(a.astype(np.int16) + 8 + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    recs = []
    for cam in ("cam_a", "cam_b"):
        recs += [record(f"{cam}-1", camera_id=cam, image=a, at=T0),
                 record(f"{cam}-2", camera_id=cam, image=noisy, at=T0 + timedelta(seconds=2))]
    policy = DedupePolicy(per_camera_max_hamming={"cam_b": 0})
    _, dropped = dedupe_near_duplicates(recs, policy=policy)
    assert [r.frame_id for r in dropped] == ["cam_a-2"]  # cam_b keeps its near (not exact) copy
    assert policy.threshold("cam_b") == 0 and policy.threshold("cam_a") == 4


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValidationError):
        DedupePolicy(max_hamming=65)
    with pytest.raises(ValidationError):
        DedupePolicy(max_age_s=0)


@needs_shared(WINDOW_STREET)
def test_static_street_keeps_frames_minutes_apart() -> None:
    """window_street's view barely changes: the age window keeps what a day-long pool drops."""
    cap = cv2.VideoCapture(str(WINDOW_STREET))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    frames, index = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % round(fps * 2) == 0:  # one frame every 2 s of video
            # played as a slow camera: one sampled frame every 2 minutes
            frames.append(record(f"w{index:05d}", camera_id="window_street", image=frame,
                                 at=T0 + timedelta(minutes=len(frames) * 2)))
        index += 1
    cap.release()
    assert len(frames) >= 20
    kept_all_time, _ = dedupe_near_duplicates(frames, policy=DedupePolicy(max_age_s=None))
    kept_recent, _ = dedupe_near_duplicates(frames, policy=DedupePolicy(max_age_s=600))
    # A whole-day pool keeps only a handful of a static street; a 10-minute window keeps
    # every fifth frame at least (one per window), and never fewer than the day-long pool.
    assert len(kept_all_time) < len(frames) // 2
    assert len(kept_recent) >= len(frames) // 6
    assert len(kept_recent) > len(kept_all_time)
