"""Frame files that no reader sees as a frame: an image without its sidecar, a sidecar that
does not parse or describes another frame, a sidecar without its image, an image that is a
symbolic link or empty.

``iter_frames`` skips them (with a warning), so retention and erasure, which once worked
from it, left them in the store, and an erasure reported itself complete while a camera's
pixels stayed. Their capture time cannot be read, but their day folder is the UTC day they
were stored under (``roadloop.data.frame_records.date_folder``): retention takes them once that
whole day has expired, and an erasure takes them when their day overlaps its range (a
privacy request errs toward deleting). They come from the store's listing
(``FrameStorage.stored_frames``, record None), in the folder store and the object store
alike, with the bytes the store holds for them.

One kind is not a leftover yet: an upload writes a frame's image, then its record (two files,
or two PUTs on an object store), so between the two the frame lists as an image without its
record. Taken then, the image of a frame captured *outside* the range (same day folder) would
be deleted and the upload would answer 201 for a frame without pixels. So an unreadable frame
written less than ``roadloop.data.frame_records.IN_FLIGHT_GRACE`` ago is left for a later run;
one in the range is not kept by this: its upload's insert sees the erasure and removes its
files itself (``fleet.intake``), and a gateway that died mid-upload repairs it at start-up
(``fleet.reconcile``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel

from roadloop.data import frame_records  # IN_FLIGHT_GRACE, read at each call
from roadloop.data.frame_records import FrameStorage, StoredFrame, day_start

logger = logging.getLogger(__name__)


class Leftover(BaseModel):
    """One unreadable frame: its image path (which may be missing) and day folder."""

    camera_id: str
    frame_id: str  # the file stem
    day_start: datetime  # UTC midnight of its day folder
    image: Path
    size_bytes: int


def select_leftovers(frames: Iterable[StoredFrame], *, start: datetime | None = None,
                     end: datetime | None = None, whole_days: bool = False,
                     settled_before: datetime | None = None) -> list[Leftover]:
    """The unreadable ones of ``frames`` (a ``stored_frames`` listing) whose day folder
    overlaps ``[start, end)`` (with ``whole_days``: lies entirely inside it), written before
    ``settled_before`` (default: ``IN_FLIGHT_GRACE`` ago by the wall clock, which the stores'
    modification times follow; a frame whose time the store did not give counts as settled)."""
    settled = settled_before or datetime.now(UTC) - frame_records.IN_FLIGHT_GRACE
    out: dict[Path, Leftover] = {}
    young = 0
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
        if frame.modified is not None and frame.modified >= settled:
            young += 1
            continue
        out[frame.image] = Leftover(camera_id=frame.camera_id, frame_id=frame.frame_id,
                                    day_start=day, image=frame.image,
                                    size_bytes=frame.size_bytes)
    if young:
        logger.info("%d unreadable frame(s) written since %s left in place: uploads may be in "
                    "flight (a later run takes them)", young, settled.isoformat())
    return sorted(out.values(), key=lambda x: (x.day_start, x.frame_id))


def leftover_frames(store: FrameStorage, camera_id: str, *, start: datetime | None = None,
                    end: datetime | None = None, whole_days: bool = False) -> list[Leftover]:
    """The camera's unreadable frames whose day folder overlaps ``[start, end)`` (with
    ``whole_days``: lies entirely inside it)."""
    return select_leftovers(store.stored_frames(camera_id, start=start, end=end),
                            start=start, end=end, whole_days=whole_days)
