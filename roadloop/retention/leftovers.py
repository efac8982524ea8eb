"""Frame files that no reader sees as a frame: an image without its sidecar, a sidecar that
does not parse or describes another frame, a sidecar without its image, an image that is a
symbolic link or empty.

``FrameStore.iter_frames`` skips them (with a warning), so retention and erasure, which work
from it, used to leave them on disk, and an erasure reported itself complete while a
camera's pixels stayed. Their capture time cannot be read, but their day folder is the UTC
day they were stored under (``roadloop.data.frames.date_folder``): retention takes them
once that whole day has expired, and an erasure takes them when their day overlaps its
range (a privacy request errs toward deleting).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel

from roadloop.data.frames import FrameStore


class Leftover(BaseModel):
    """One unreadable frame: its image path (which may be missing) and day folder."""

    camera_id: str
    frame_id: str  # the file stem
    day_start: datetime  # UTC midnight of its day folder
    image: Path
    size_bytes: int


def _day_start(name: str) -> datetime | None:
    try:
        return datetime.strptime(name, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None


def leftover_frames(store: FrameStore, camera_id: str, *, start: datetime | None = None,
                    end: datetime | None = None, whole_days: bool = False) -> list[Leftover]:
    """The camera's unreadable frames whose day folder overlaps ``[start, end)`` (with
    ``whole_days``: lies entirely inside it)."""
    report = store.fsck(camera_id)
    paths = [*report.orphan_images, *report.sidecars_without_image, *report.corrupt_sidecars,
             *report.bad_images]
    out: dict[Path, Leftover] = {}
    for path in paths:
        day = _day_start(path.parent.name)
        if day is None:
            continue
        day_end = day + timedelta(days=1)
        if whole_days:
            inside = (start is None or day >= start) and (end is None or day_end <= end)
        else:
            inside = (start is None or day_end > start) and (end is None or day < end)
        if not inside:
            continue
        image = path.with_suffix(".jpg")
        size = sum(p.lstat().st_size for p in (image, image.with_suffix(".json"))
                   if p.is_file() or p.is_symlink())  # a link's own size, not its target's
        out[image] = Leftover(camera_id=camera_id, frame_id=path.stem, day_start=day,
                              image=image, size_bytes=size)
    return sorted(out.values(), key=lambda x: (x.day_start, x.frame_id))
