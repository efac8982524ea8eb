"""Frame files that no reader sees as a frame: an image without its sidecar, a sidecar that
does not parse or describes another frame, a sidecar without its image, an image that is a
symbolic link or empty.

``iter_frames`` skips them (with a warning), so retention and erasure, which once worked
from it, left them in the store, and an erasure reported itself complete while a camera's
pixels stayed. Their capture time cannot be read, but their day folder is the UTC day they
were stored under (``roadloop.data.frames.date_folder``): retention takes them once that
whole day has expired, and an erasure takes them when their day overlaps its range (a
privacy request errs toward deleting). They come from the store's listing
(``FrameStorage.stored_frames``, record None), in the folder store and the object store
alike, with the bytes the store holds for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import BaseModel

from roadloop.data.frames import FrameStorage, StoredFrame, day_start


class Leftover(BaseModel):
    """One unreadable frame: its image path (which may be missing) and day folder."""

    camera_id: str
    frame_id: str  # the file stem
    day_start: datetime  # UTC midnight of its day folder
    image: Path
    size_bytes: int


def select_leftovers(frames: Iterable[StoredFrame], *, start: datetime | None = None,
                     end: datetime | None = None, whole_days: bool = False) -> list[Leftover]:
    """The unreadable ones of ``frames`` (a ``stored_frames`` listing) whose day folder
    overlaps ``[start, end)`` (with ``whole_days``: lies entirely inside it)."""
    out: dict[Path, Leftover] = {}
    for frame in frames:
        if frame.record is not None:
            continue
        day = day_start(frame.day)
        if day is None:
            continue
        day_end = day + timedelta(days=1)
        if whole_days:
            inside = (start is None or day >= start) and (end is None or day_end <= end)
        else:
            inside = (start is None or day_end > start) and (end is None or day < end)
        if not inside:
            continue
        out[frame.image] = Leftover(camera_id=frame.camera_id, frame_id=frame.frame_id,
                                    day_start=day, image=frame.image,
                                    size_bytes=frame.size_bytes)
    return sorted(out.values(), key=lambda x: (x.day_start, x.frame_id))


def leftover_frames(store: FrameStorage, camera_id: str, *, start: datetime | None = None,
                    end: datetime | None = None, whole_days: bool = False) -> list[Leftover]:
    """The camera's unreadable frames whose day folder overlaps ``[start, end)`` (with
    ``whole_days``: lies entirely inside it)."""
    return select_leftovers(store.stored_frames(camera_id, start=start, end=end),
                            start=start, end=end, whole_days=whole_days)
