"""Start-up repair of an object-store frame store (``ROADLOOP_FRAME_STORE_URL=s3://...``).

The object-store twin of ``fleet.reconcile``. ``S3FrameStore.write_frame`` PUTs the JPEG,
then the create-only record; the gateway commits the row after both. A crash between the
PUTs leaves a JPEG without a record (never acknowledged, invisible to readers); a crash
between the record and the row leaves a complete frame without a row. This reconcile
gives the second kind its row (``recovered=True``) and deletes the first kind.

Unlike a gateway's own folder, the bucket is shared by every replica, so:

* **Only old objects are touched.** A JPEG without a record, or a record without a row,
  younger than ``grace`` may be an upload in flight on another replica (its own commit
  adds the row); both wait for a later start. The orphan delete checks the JPEG's age and
  the record's absence again right before deleting (``S3FrameStore.delete_orphan_image``).
* **Two replicas may run it at once.** Deletes of a missing key are no-ops; a row the
  other replica inserted first hits the unique ``(camera_id, frame_id)`` and is skipped.
* **An erased frame gets no row.** A complete frame without a row that an erasure covers
  (``frame_erasures``) is deleted instead: rows are inserted in a transaction that checks
  that under the cameras' shared locks (``fleet.db.erased_frames``), as intake's are.
* **Work per start is bounded.** The store is walked in key order, one date folder at a
  time, until ``max_objects`` keys were listed; the last key read is kept in
  ``gateway_state`` and the next start continues after it (from the top once the end is
  reached), so a large bucket is covered over several starts. Progress is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from fleet.db import Database, FrameRow, erased_frames
from fleet.reconcile import (
    camera_owners,
    is_unstored_copy,
    known_frame_paths,
    recovered_row,
    remove_erased,
)
from roadloop.data.object_frames import FolderListing, S3FrameStore

logger = logging.getLogger(__name__)

CURSOR_STATE_KEY = "object_frames_reconcile_cursor"
PROGRESS_EVERY = 10_000  # keys listed between two progress lines


class ObjectReconcileReport(BaseModel):
    started_after: str  # the cursor this run began after ("" = the top of the store)
    finished: bool = False  # reached the end of the store (the next run starts at the top)
    scanned_folders: int = 0
    scanned_objects: int = 0
    recovered_rows: int = 0
    rows_inserted_elsewhere: int = 0  # another replica recovered them first
    removed_orphan_images: int = 0
    removed_unstored_copies: int = 0  # copies of a frame whose row names another path
    removed_erased_frames: int = 0  # frames without a row that an erasure covers
    young_objects_left: int = 0  # within the grace period: maybe an upload in flight
    unreadable_records: int = 0
    unowned_frames: int = 0  # camera never enrolled here: no device to credit a row to


def reconcile_object_store(
    db: Database, store: S3FrameStore, clock: Callable[[], datetime], *,
    grace: timedelta, max_objects: int,
    wall: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ObjectReconcileReport:
    """One bounded reconcile pass over the object store; see the module docstring.

    ``clock`` stamps ``received_at`` of recovered rows (the gateway's clock); ``wall`` is
    compared with the objects' ``LastModified`` (the storage server's clock).
    """
    with db.read() as session:
        cursor = db.get_state(session, CURSOR_STATE_KEY) or ""
    owner = camera_owners(db)
    cutoff = wall() - grace
    report = ObjectReconcileReport(started_after=cursor)
    next_progress = PROGRESS_EVERY
    next_cursor = ""
    for folder in store.scan_folders(cursor):
        report.scanned_folders += 1
        report.scanned_objects += folder.n_objects
        _reconcile_folder(db, store, clock, folder, owner.get(folder.camera_id), cutoff,
                          report)
        next_cursor = folder.last_key
        if report.scanned_objects >= next_progress:
            logger.info("reconcile of %s: %d keys in %d folders so far (at %s)", store.url,
                        report.scanned_objects, report.scanned_folders, next_cursor)
            next_progress += PROGRESS_EVERY
        if report.scanned_objects >= max_objects:
            break
    else:
        report.finished, next_cursor = True, ""
    try:
        with db.write() as session:
            db.set_state(session, CURSOR_STATE_KEY, next_cursor)
            session.commit()
    except IntegrityError:  # another replica created the state row at the same moment
        logger.info("reconcile cursor written by another replica; keeping theirs")
    if (report.recovered_rows or report.removed_orphan_images or report.removed_unstored_copies
            or report.removed_erased_frames):
        logger.warning("reconciled object frame store after an unclean stop: %s", report)
    return report


def _reconcile_folder(
    db: Database, store: S3FrameStore, clock: Callable[[], datetime], folder: FolderListing,
    device_id: str | None, cutoff: datetime, report: ObjectReconcileReport,
) -> None:
    complete: list[str] = []
    for frame_id, listed in sorted(folder.frames.items()):
        if listed.record_modified is None:
            if listed.image_modified is None:
                continue
            if listed.image_modified >= cutoff:
                report.young_objects_left += 1
            elif store.delete_orphan_image(folder.stem(frame_id), older_than=cutoff):
                report.removed_orphan_images += 1
        elif listed.image_modified is not None:  # a record alone is invisible: fsck's job
            if listed.record_modified >= cutoff:
                report.young_objects_left += 1
            else:
                complete.append(frame_id)
    if not complete:
        return
    known = known_frame_paths(db, folder.camera_id, complete)
    rows: list[dict[str, Any]] = []
    for frame_id in complete:
        image_rel = f"{folder.stem(frame_id)}.jpg"
        if is_unstored_copy(known, frame_id, image_rel):
            logger.warning("reconcile: removing %s/%s, a copy of frame %s/%s stored at %s",
                           store.url, image_rel, folder.camera_id, frame_id, known[frame_id])
            store.remove_frame(store.root / image_rel)
            report.removed_unstored_copies += 1
            continue
        if frame_id in known:
            continue
        if device_id is None:
            report.unowned_frames += 1
            continue
        loaded = store.load_frame(folder.stem(frame_id))
        if loaded is None:
            report.unreadable_records += 1
            continue
        rec, image = loaded
        rows.append(recovered_row(rec, device_id, f"{folder.stem(frame_id)}.jpg", image, clock()))
    _insert(db, store, rows, report)


def _insert(db: Database, store: S3FrameStore, rows: list[dict[str, Any]],
            report: ObjectReconcileReport) -> None:
    """All rows in one commit; when another replica got some in first, one by one. Rows an
    erasure covers are not inserted: their frames are deleted."""
    if not rows:
        return
    try:
        inserted, erased = _insert_rows(db, rows)
    except IntegrityError:
        inserted, erased = 0, []
        for r in rows:
            try:
                one, gone = _insert_rows(db, [r])
            except IntegrityError:
                report.rows_inserted_elsewhere += 1
                continue
            inserted += one
            erased += gone
    report.recovered_rows += inserted
    remove_erased(store, erased, report)


def _insert_rows(db: Database, rows: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Insert ``rows`` but those an erasure covers, in one transaction; (rows inserted,
    paths of the covered ones)."""
    with db.write() as session:
        keys = [(r["camera_id"], r["frame_id"], r["captured_at"]) for r in rows]
        erased = erased_frames(session, keys)
        kept = [r for r, key in zip(rows, keys, strict=True) if key not in erased]
        session.add_all([FrameRow(**r) for r in kept])
        session.commit()
    return len(kept), [r["path"] for r, key in zip(rows, keys, strict=True) if key in erased]
