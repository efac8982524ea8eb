"""Curation of sampled frames: near-duplicate removal (``DedupePolicy``) and a partition's
summary for asset metadata."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

import numpy as np
from pydantic import BaseModel, Field

from roadloop.data.frame_records import FrameRecord


class DedupePolicy(BaseModel):
    """When a sampled frame counts as a near-duplicate of one already kept.

    A traffic camera's view hardly changes: a whole-frame dhash of a static street stays
    within a few bits while different vehicles pass (``window_street``: 20 of 24 frames
    sampled every 2 s lie within 4 bits of its first). So a frame is a near-duplicate only
    when all hold: its dhash is within ``max_hamming`` bits of a kept frame of the same
    camera, that frame was captured at most ``max_age_s`` earlier (``None``: any time), and
    both saw the same objects (equal per-class detection counts; frames without detections,
    e.g. replays, compare equal). ``per_camera_max_hamming`` overrides the bit threshold
    per camera (0 keeps all but exact copies).
    """

    max_hamming: int = Field(default=4, ge=0, le=64)
    max_age_s: float | None = Field(default=600.0, gt=0)
    same_detections: bool = True
    per_camera_max_hamming: dict[str, Annotated[int, Field(ge=0, le=64)]] = Field(
        default_factory=dict)  # a dhash has 64 bits, as max_hamming

    def threshold(self, camera_id: str) -> int:
        return self.per_camera_max_hamming.get(camera_id, self.max_hamming)


def _detection_signature(rec: FrameRecord) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(Counter(d.class_name for d in rec.detections).items()))


def dedupe_near_duplicates(
    records: Sequence[FrameRecord],
    max_hamming: int = 4,
    window: int | None = None,
    policy: DedupePolicy | None = None,
) -> tuple[list[FrameRecord], list[FrameRecord]]:
    """Split ``records`` into (kept, dropped): near-duplicates of an earlier kept frame drop.

    Per camera, in ``captured_at`` order, a frame is dropped when it is a near-duplicate
    (see :class:`DedupePolicy`; without one, dhash within ``max_hamming`` bits of any kept
    frame, detections ignored) of one of the last ``window`` kept frames (all of them when
    ``window`` is None). Frames without a quality record are always kept. Both lists come
    back in time order.
    """
    if policy is None:
        policy = DedupePolicy(max_hamming=max_hamming, max_age_s=None, same_detections=False)
    ordered = sorted(records, key=lambda r: (r.captured_at, r.camera_id, r.frame_id))
    kept_by_camera: dict[str, list[tuple[int, datetime, tuple]]] = {}
    kept: list[FrameRecord] = []
    dropped: list[FrameRecord] = []
    for rec in ordered:
        if rec.quality is None:
            kept.append(rec)
            continue
        h = int(rec.quality.dhash, 16)
        sig = _detection_signature(rec) if policy.same_detections else ()
        bits = policy.threshold(rec.camera_id)
        recent = kept_by_camera.setdefault(rec.camera_id, [])
        pool = recent if window is None else recent[-window:]
        duplicate = any(
            (h ^ other_hash).bit_count() <= bits
            and (policy.max_age_s is None
                 or (rec.captured_at - other_at).total_seconds() <= policy.max_age_s)
            and other_sig == sig
            for other_hash, other_at, other_sig in pool
        )
        if duplicate:
            dropped.append(rec)
        else:
            kept.append(rec)
            recent.append((h, rec.captured_at, sig))
    return kept, dropped


class PartitionSummary(BaseModel):
    """What one camera partition of sampled frames holds (for asset metadata)."""

    frames: int
    cameras: list[str]
    per_reason: dict[str, int]
    duplicates_dropped: int
    mean_brightness: float | None
    mean_sharpness: float | None
    first_captured_at: datetime | None
    last_captured_at: datetime | None

    def to_markdown(self) -> str:
        rows = [
            "| metric | value |",
            "|---|---|",
            f"| frames | {self.frames} |",
            f"| duplicates dropped | {self.duplicates_dropped} |",
            f"| cameras | {', '.join(self.cameras) or '-'} |",
        ]
        for reason, n in sorted(self.per_reason.items()):
            rows.append(f"| reason `{reason}` | {n} |")
        if self.mean_brightness is not None:
            rows.append(f"| mean brightness | {self.mean_brightness:.1f} |")
        if self.mean_sharpness is not None:
            rows.append(f"| mean sharpness | {self.mean_sharpness:.1f} |")
        if self.first_captured_at is not None:
            rows.append(f"| first | {self.first_captured_at.isoformat()} |")
            rows.append(
                f"| last | {self.last_captured_at.isoformat() if self.last_captured_at else '-'} |"
            )
        return "\n".join(rows)


def summarize_partition(
    kept: Sequence[FrameRecord], dropped: Sequence[FrameRecord]
) -> PartitionSummary:
    """Counts and means over the kept frames; ``dropped`` only counts as duplicates."""
    reasons: Counter[str] = Counter()
    for rec in kept:
        reasons.update(set(rec.reasons))
    qualities = [r.quality for r in kept if r.quality is not None]
    times = [r.captured_at for r in kept]
    return PartitionSummary(
        frames=len(kept),
        cameras=sorted({r.camera_id for r in kept}),
        per_reason=dict(sorted(reasons.items())),
        duplicates_dropped=len(dropped),
        mean_brightness=float(np.mean([q.brightness for q in qualities])) if qualities else None,
        mean_sharpness=float(np.mean([q.sharpness for q in qualities])) if qualities else None,
        first_captured_at=min(times) if times else None,
        last_captured_at=max(times) if times else None,
    )
