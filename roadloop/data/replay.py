"""Camera replay: play the shared datasets and videos as cameras into the frame store.

Until real edge agents stream frames, each replay camera writes frames into the
:class:`~roadloop.data.frames.FrameStore` exactly as the fleet gateway will.

* Dataset cameras replay only the *replay* share of a source's ``train`` split
  (:func:`roadloop.data.splits.is_replay_frame`): never a ``val``/``test`` frame and never a
  seed-training frame. Their records carry ``source_ref`` (``<source>/train/<file>``) and
  ``labels_ref`` (the ground-truth YOLO label file) for provenance, leakage checks and the
  simulated annotator.
* ``atl_v2`` mixes day CCTV with night broadcast views, so it is played as two cameras split
  by mean luma: ``atl_night`` takes frames darker than :data:`NIGHT_MAX_BRIGHTNESS`,
  ``atl_day`` the rest. The threshold is the 25th percentile of mean luma over atl_v2
  ``train`` (measured: percentiles 5/25/50/75 = 29/60/115/128 on 234 frames), matching the
  dataset's "about a quarter dark". The distribution is not cleanly bimodal because the
  frames carry ±40 % brightness augmentation: below 60 the frames are almost all night
  highway views (plus a few darkened day frames), while night views up to ~100 land in
  ``atl_day``. It is a "dark vs. bright" split, good enough to simulate a domain shift.
* Video cameras sample one frame every ``every_n_seconds`` of video time, JPEG quality 90,
  with frame ids ``<camera_id>-f<frame index>`` so re-running a replay adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field, model_validator
from tqdm.auto import tqdm

from roadloop.data.frame_quality import compute_quality
from roadloop.data.frame_records import FrameRecord, safe_id, validate_id
from roadloop.data.frames import FrameStore
from roadloop.data.splits import REPLAYABLE_SPLIT, is_replay_frame
from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.settings import Settings

logger = logging.getLogger(__name__)

NIGHT_MAX_BRIGHTNESS = 60.0
"""Mean luma (0-255) below which an atl_v2 frame counts as night; see the module docstring."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
JPEG_QUALITY = 90


class ReplayCamera(BaseModel):
    """One simulated camera: a labelled dataset's replay share, or a video file."""

    camera_id: str
    kind: Literal["dataset", "video"]
    path: Path = Field(description="Dataset root (with images/train) or video file.")
    # Dataset cameras.
    source: str | None = Field(default=None, description="Source name, e.g. 'atl_v2'.")
    condition: Literal["day", "night"] | None = None
    night_max_brightness: float = NIGHT_MAX_BRIGHTNESS
    interval_seconds: float = Field(default=10.0, gt=0, description="Time between frames.")
    # Video cameras.
    every_n_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ReplayCamera:
        validate_id("camera_id", self.camera_id)
        if self.kind == "dataset" and not self.source:
            raise ValueError(f"dataset camera {self.camera_id!r} needs a source name")
        return self


class ReplayStats(BaseModel):
    """What one ``replay_camera`` call did."""

    camera_id: str
    written: int = 0
    already_present: int = 0
    skipped_invalid: int = 0
    filtered_out: int = Field(default=0, description="Dataset frames outside the condition.")


def default_replay_cameras(settings: Settings) -> list[ReplayCamera]:
    """The standard replay cameras whose data exists under ``settings.shared_dir``."""
    cams: list[ReplayCamera] = []
    atl = settings.datasets_dir / "atl_v2"
    manaus = settings.datasets_dir / "manaus_v4"
    if (atl / "images" / REPLAYABLE_SPLIT).is_dir():
        cams.append(
            ReplayCamera(
                camera_id="atl_day", kind="dataset", path=atl, source="atl_v2", condition="day"
            )
        )
        cams.append(
            ReplayCamera(
                camera_id="atl_night", kind="dataset", path=atl, source="atl_v2", condition="night"
            )
        )
    if (manaus / "images" / REPLAYABLE_SPLIT).is_dir():
        cams.append(
            ReplayCamera(
                camera_id="manaus_intersections", kind="dataset", path=manaus, source="manaus_v4"
            )
        )
    if settings.videos_dir.is_dir():
        for video in sorted(settings.videos_dir.iterdir()):
            if video.is_file() and video.suffix.lower() in VIDEO_SUFFIXES:
                cams.append(ReplayCamera(camera_id=safe_id(video.stem), kind="video", path=video))
    return cams


def dataset_replay_candidates(camera: ReplayCamera, replay_fraction: float) -> list[Path]:
    """Images of ``camera``'s train split reserved for replay, sorted (file names only)."""
    if camera.kind != "dataset" or camera.source is None:
        raise ValueError(f"camera {camera.camera_id!r} is not a dataset camera")
    images_dir = camera.path / "images" / REPLAYABLE_SPLIT
    if not images_dir.is_dir():
        raise MissingDataError(f"no {REPLAYABLE_SPLIT} images for {camera.camera_id}", images_dir)
    return [
        p
        for p in sorted(images_dir.iterdir())
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and is_replay_frame(camera.source, REPLAYABLE_SPLIT, p.stem, replay_fraction)
    ]


def replay_camera(
    camera: ReplayCamera,
    store: FrameStore,
    *,
    start_time: datetime,
    max_frames: int | None = None,
    replay_fraction: float,
) -> ReplayStats:
    """Write ``camera``'s frames into ``store`` (idempotent: present frames are skipped).

    ``max_frames`` bounds the frames this camera yields (written + already present).
    """
    if start_time.tzinfo is None:
        raise ValueError("start_time must be timezone-aware")
    if camera.kind == "dataset":
        return _replay_dataset(camera, store, start_time, max_frames, replay_fraction)
    return _replay_video(camera, store, start_time, max_frames)


def _encode_jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _store(store: FrameStore, record: FrameRecord, jpeg: bytes, stats: ReplayStats) -> None:
    result = store.write_frame(record, jpeg)
    if result.already_existed:
        stats.already_present += 1
    else:
        stats.written += 1


def _replay_dataset(
    camera: ReplayCamera,
    store: FrameStore,
    start_time: datetime,
    max_frames: int | None,
    replay_fraction: float,
) -> ReplayStats:
    assert camera.source is not None
    stats = ReplayStats(camera_id=camera.camera_id)
    candidates = dataset_replay_candidates(camera, replay_fraction)
    labels_dir = camera.path / "labels" / REPLAYABLE_SPLIT
    logger.info(
        "replaying %d %s train frames as camera %s (condition=%s)",
        len(candidates),
        camera.source,
        camera.camera_id,
        camera.condition,
    )
    emitted = 0
    for image_path in tqdm(candidates, desc=f"replay {camera.camera_id}", unit="frame"):
        if max_frames is not None and emitted >= max_frames:
            break
        data = image_path.read_bytes()
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            logger.warning("skipping %s: image does not decode", image_path)
            stats.skipped_invalid += 1
            continue
        quality = compute_quality(image)
        if camera.condition is not None:
            is_night = quality.brightness < camera.night_max_brightness
            if is_night != (camera.condition == "night"):
                stats.filtered_out += 1
                continue
        if not data.startswith(b"\xff\xd8\xff"):
            data = _encode_jpeg(image)
        label_file = labels_dir / f"{image_path.stem}.txt"
        h, w = image.shape[:2]
        record = FrameRecord(
            frame_id=safe_id(image_path.stem),
            camera_id=camera.camera_id,
            captured_at=start_time + timedelta(seconds=emitted * camera.interval_seconds),
            reasons=["replay"],
            source=f"replay:{camera.source}",
            source_ref=f"{camera.source}/{REPLAYABLE_SPLIT}/{image_path.name}",
            labels_ref=str(label_file.absolute()) if label_file.is_file() else None,
            width=w,
            height=h,
            quality=quality,
        )
        try:
            _store(store, record, data, stats)
        except InvalidInputError as exc:
            logger.warning("skipping %s: %s", image_path, exc.reason)
            stats.skipped_invalid += 1
            continue
        emitted += 1
    logger.info("camera %s: %s", camera.camera_id, stats.model_dump())
    return stats


def _sampled_video_frames(
    video: Path, every_n_seconds: float, max_frames: int | None
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (frame index, seconds into the video, BGR frame) every ``every_n_seconds``."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise InvalidInputError(video, "video cannot be opened")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        if fps <= 0:
            logger.warning("%s reports no frame rate; assuming 25 fps", video)
            fps = 25.0
        step = max(1, round(fps * every_n_seconds))
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        expected = (total + step - 1) // step if total > 0 else None
        if max_frames is not None and expected is not None:
            expected = min(expected, max_frames)
        yielded = 0
        index = 0
        with tqdm(total=expected, desc=f"replay {video.stem}", unit="frame") as bar:
            while max_frames is None or yielded < max_frames:
                if not cap.grab():
                    break
                if index % step == 0:
                    ok, frame = cap.retrieve()
                    if ok and frame is not None:
                        yield index, index / fps, frame
                        yielded += 1
                        bar.update(1)
                    else:
                        logger.warning("%s: frame %d does not decode", video, index)
                index += 1
    finally:
        cap.release()


def _replay_video(
    camera: ReplayCamera,
    store: FrameStore,
    start_time: datetime,
    max_frames: int | None,
) -> ReplayStats:
    stats = ReplayStats(camera_id=camera.camera_id)
    if not camera.path.is_file():
        raise MissingDataError(f"video for camera {camera.camera_id} is missing", camera.path)
    logger.info(
        "replaying %s as camera %s, one frame every %.1f s",
        camera.path.name,
        camera.camera_id,
        camera.every_n_seconds,
    )
    for index, offset, frame in _sampled_video_frames(
        camera.path, camera.every_n_seconds, max_frames
    ):
        frame_id = safe_id(f"{camera.camera_id}-f{index:07d}")
        if store.find_frame(camera.camera_id, frame_id) is not None:
            stats.already_present += 1
            continue
        h, w = frame.shape[:2]
        record = FrameRecord(
            frame_id=frame_id,
            camera_id=camera.camera_id,
            captured_at=start_time + timedelta(seconds=offset),
            reasons=["base_rate"],
            source=f"video:{camera.path.stem}",
            source_ref=f"videos/{camera.path.name}#frame={index}",
            width=w,
            height=h,
            quality=compute_quality(frame),
        )
        _store(store, record, _encode_jpeg(frame), stats)
    logger.info("camera %s: %s", camera.camera_id, stats.model_dump())
    return stats
