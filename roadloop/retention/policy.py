"""Retention policy: how long each kind of data is kept, and which stored frames expire.

Kinds (days, each configurable through ``ROADLOOP_RETENTION_*``):

- ``raw_frames_days``: sampled frames in the frame store (and their gateway rows and review
  queue samples). Frames that are labelled (reviewed in FiftyOne) or part of a curated
  dataset version are *not* expired here: they are kept with their dataset version.
- ``heartbeats_days``: the gateway's heartbeat rows (drift and rollout health read the
  recent ones only).
- ``traffic_days``: the gateway's per-interval traffic records; the daily report
  (``traffic_counts``) aggregates them first, so after this many days only the daily
  aggregates remain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, Field

from roadloop.data.frame_records import FrameStorage, in_window
from roadloop.errors import InvalidInputError
from roadloop.retention.derived import (
    DerivedScrub,
    default_artifacts_dir,
    has_embedding_caches,
    image_sha256,
    scrub_derived,
)
from roadloop.retention.leftovers import select_leftovers

logger = logging.getLogger(__name__)


class RetentionPolicy(BaseModel):
    """Days each kind of data is kept (a day is 24 h before the enforcement time)."""

    raw_frames_days: float = Field(default=30.0, gt=0)
    heartbeats_days: float = Field(default=30.0, gt=0)
    traffic_days: float = Field(default=90.0, gt=0)

    def cutoffs(self, now: datetime) -> RetentionCutoffs:
        """Everything older than these instants (strictly before) expires at ``now``."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise InvalidInputError("retention", f"now must be timezone-aware, got {now!r}")
        now = now.astimezone(UTC)
        return RetentionCutoffs(
            frames_before=now - timedelta(days=self.raw_frames_days),
            heartbeats_before=now - timedelta(days=self.heartbeats_days),
            traffic_before=now - timedelta(days=self.traffic_days),
        )


class RetentionCutoffs(BaseModel):
    frames_before: datetime
    heartbeats_before: datetime
    traffic_before: datetime


class ExpiredFrame(BaseModel):
    camera_id: str
    frame_id: str
    captured_at: datetime
    image: Path
    size_bytes: int

    @property
    def frame_key(self) -> str:
        return f"{self.camera_id}/{self.frame_id}"


class FrameExpiry(BaseModel):
    """What ``expire_frames`` did: per camera counts, bytes freed, frames kept on purpose."""

    deleted: list[ExpiredFrame] = Field(default_factory=list)
    kept_protected: int = 0
    per_camera: dict[str, int] = Field(default_factory=dict)
    derived: DerivedScrub | None = None  # embeddings and frame index lines removed

    @property
    def bytes_deleted(self) -> int:
        return sum(f.size_bytes for f in self.deleted)


def expired_frames(
    store: FrameStorage, before: datetime, protected: Collection[str] = ()
) -> tuple[list[ExpiredFrame], int]:
    """Frames captured strictly before ``before`` (every camera), minus ``protected`` frame
    keys (``camera/frame``); returns them and how many protected ones were spared. From the
    store's listing (``stored_frames``): no image is read, and on the object store none is
    downloaded; sizes are what the store holds (image + record)."""
    out: list[ExpiredFrame] = []
    spared = 0
    for camera in store.cameras():
        listed = store.stored_frames(camera, end=before)
        readable = sorted(((f.record, f) for f in listed
                           if f.record is not None and in_window(f.record, None, before)),
                          key=lambda rf: (rf[0].captured_at, rf[1].frame_id))
        for record, f in readable:
            if f"{camera}/{f.frame_id}" in protected:
                spared += 1
                continue
            out.append(ExpiredFrame(camera_id=camera, frame_id=f.frame_id,
                                    captured_at=record.captured_at, image=f.image,
                                    size_bytes=f.size_bytes))
        # Unreadable frames (no sidecar, a sidecar that does not parse) have no capture time:
        # they expire with the whole of their day folder.
        for left in select_leftovers(listed, end=before, whole_days=True):
            if f"{camera}/{left.frame_id}" in protected:
                spared += 1
                continue
            logger.warning("expiring unreadable frame %s (day %s)", left.image,
                           left.day_start.date())
            out.append(ExpiredFrame(camera_id=camera, frame_id=left.frame_id,
                                    captured_at=left.day_start, image=left.image,
                                    size_bytes=left.size_bytes))
    return out, spared


def expire_frames(
    store: FrameStorage,
    before: datetime,
    protected: Collection[str] = (),
    *,
    on_planned: Callable[[list[ExpiredFrame]], None] | None = None,
    on_deleted: Callable[[list[ExpiredFrame]], None] | None = None,
    artifacts_dir: Path | None = None,
    chosen: tuple[list[ExpiredFrame], int] | None = None,
) -> FrameExpiry:
    """Delete the expired frames from the store (sidecar first, then image: a frame stops
    being complete before its pixels go), then what was derived from them: their vectors in
    the embedding caches and their lines in the frame indexes under ``artifacts_dir``
    (default: the settings' artifacts folder; ``roadloop.retention.derived``).
    ``on_planned`` gets the frames about to go before the first is deleted (e.g. to journal
    them, so a run cut off halfway still knows whose gateway rows to delete; if it raises,
    nothing is deleted); ``on_deleted`` gets the deleted frames (e.g. to drop their
    review-queue samples and gateway rows). ``chosen``: the frames to delete and the
    protected ones spared, as ``expired_frames`` listed them (a caller that listed them
    already; ``protected`` is then not looked at again).

    No image is downloaded. The embedding caches are keyed by image hashes, taken from the
    local copies only: the folder store's files, or the object store's cached copies, which
    are the files the platform's embedding assets read (its cache has no TTL; a frame never
    downloaded there was never embedded by it)."""
    frames, spared = chosen if chosen is not None else expired_frames(store, before, protected)
    if on_planned is not None and frames:
        on_planned(frames)
    artifacts = artifacts_dir if artifacts_dir is not None else (
        default_artifacts_dir() if frames else None)
    hashing = bool(frames) and has_embedding_caches(artifacts)  # else no image is read
    hashes: list[str | None] = []
    per_camera: dict[str, int] = {}
    for f in frames:
        # before the image goes; a local read only (an object store's cached copy, if any)
        hashes.append(image_sha256(f.image) if hashing else None)
        store.remove_frame(f.image)
        per_camera[f.camera_id] = per_camera.get(f.camera_id, 0) + 1
    logger.info("retention: %d frames before %s deleted, %d protected kept",
                len(frames), before.isoformat(), spared)
    derived = (scrub_derived(artifacts, [(f.camera_id, f.frame_id) for f in frames], hashes)
               if frames else None)
    if on_deleted is not None and frames:
        on_deleted(frames)
    return FrameExpiry(deleted=frames, kept_protected=spared, per_camera=per_camera,
                       derived=derived)


__all__ = [
    "ExpiredFrame",
    "FrameExpiry",
    "RetentionCutoffs",
    "RetentionPolicy",
    "expire_frames",
    "expired_frames",
]


def policy_from_settings(settings: object | None = None) -> RetentionPolicy:
    """The policy ``ROADLOOP_RETENTION_*`` configure (``roadloop.settings``)."""
    from roadloop.settings import get_settings

    s = settings or get_settings()
    return RetentionPolicy(raw_frames_days=s.retention_raw_frames_days,  # type: ignore[attr-defined]
                           heartbeats_days=s.retention_heartbeats_days,  # type: ignore[attr-defined]
                           traffic_days=s.retention_traffic_days)  # type: ignore[attr-defined]
