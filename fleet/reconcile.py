"""Start-up repair of the frame store: make the ``frames`` table agree with the files.

``POST /v1/frames`` writes the image and its sidecar first and commits the row second
(``fleet.intake``). A crash between the two leaves a complete frame without a row; a crash
inside the write leaves a temp file or an image without a sidecar (never acknowledged).
``reconcile_frame_store`` gives the first kind its row (``recovered=True``) and deletes the
second, so the store and the table agree even when the agent never comes back. It runs once
before serving (``Gateway.prepare_storage``); an object-store frame store has its own
(``fleet.reconcile_objects``). A frame without a row that an erasure covers
(``frame_erasures``; e.g. written by an upload after the erasure walked the store, whose
refusal a crash cut short) is deleted, never given a row: the rows are inserted in a
transaction that checks that (``fleet.db.erased_frames``), as intake's are.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from fleet.bounds import unstorable_string
from fleet.db import Database, Device, FrameRow, erased_frames, stored_frame_paths
from fleet.jpeg import JpegError, inspect_jpeg
from roadloop.data.frame_records import ID_RE, FrameRecord, is_date_folder
from roadloop.data.frames import FrameStore

logger = logging.getLogger(__name__)

RECONCILE_STATE_KEY = "frames_reconciled_at"
RECONCILE_SLACK = timedelta(minutes=5)


class ReconcileReport(BaseModel):
    full_scan: bool
    scanned_dirs: int = 0
    recovered_rows: int = 0
    removed_temp_files: int = 0
    removed_orphan_images: int = 0
    unreadable_sidecars: int = 0
    removed_torn_frames: int = 0
    removed_unstored_copies: int = 0  # copies of a frame whose row names another path
    removed_erased_frames: int = 0  # frames without a row that an erasure covers


def camera_owners(db: Database) -> dict[str, str]:
    """camera_id -> the device a recovered row is credited to (the live one, else the
    latest enrolled)."""
    with db.read() as session:
        devices = session.execute(
            select(Device.camera_id, Device.device_id, Device.revoked_at)
            .order_by(Device.enrolled_at)
        ).all()
    owner: dict[str, str] = {}
    for camera_id, device_id, revoked_at in devices:
        if revoked_at is None or camera_id not in owner:
            owner[camera_id] = device_id
    return owner


def reconcile_frame_store(
    db: Database, store: FrameStore, clock: Callable[[], datetime], *, full: bool = False
) -> ReconcileReport:
    """Make the ``frames`` table agree with the frame store after a crash.

    Looks only at cameras with an enrolled device and, after the first run, only at day
    folders modified since the previous reconcile (a file landing in a folder bumps its
    mtime), so start-up stays fast on a large store. Complete frames without a row get
    one; temp files and images without a sidecar (never acknowledged) are deleted.
    ``clock`` stamps ``received_at`` of the recovered rows (the gateway's clock).
    """
    started = datetime.now(UTC)  # wall clock: compared with file mtimes
    with db.read() as session:
        last = db.get_state(session, RECONCILE_STATE_KEY)
    owner = camera_owners(db)
    since = None if (full or last is None) else datetime.fromisoformat(last) - RECONCILE_SLACK
    report = ReconcileReport(full_scan=since is None)
    new_rows: list[FrameRow] = []
    for camera_id, device_id in sorted(owner.items()):
        cam_dir = store.root / camera_id
        if not cam_dir.is_dir():
            continue
        for day in sorted(cam_dir.iterdir()):
            # Only the folders write_frame makes: an image an operator keeps in, say,
            # <camera>/backup/ is no leftover of an upload, and is not deleted.
            if not is_date_folder(day.name) or not day.is_dir():
                continue
            if since is not None and datetime.fromtimestamp(day.stat().st_mtime, UTC) < since:
                continue
            report.scanned_dirs += 1
            new_rows.extend(_reconcile_day(db, store, clock, camera_id, device_id, day, report))
    with db.write() as session:
        erased = erased_frames(session, [(r.camera_id, r.frame_id, r.captured_at)
                                         for r in new_rows])
        kept = [r for r in new_rows if (r.camera_id, r.frame_id, r.captured_at) not in erased]
        session.add_all(kept)
        db.set_state(session, RECONCILE_STATE_KEY, started.isoformat())
        session.commit()
    report.recovered_rows = len(kept)
    remove_erased(store, [r.path for r in new_rows
                          if (r.camera_id, r.frame_id, r.captured_at) in erased], report)
    if (kept or report.removed_temp_files or report.removed_orphan_images
            or report.removed_torn_frames or report.removed_unstored_copies
            or report.removed_erased_frames):
        logger.warning("reconciled frame store after an unclean stop: %s", report)
    return report


def _reconcile_day(
    db: Database, store: FrameStore, clock: Callable[[], datetime], camera_id: str,
    device_id: str, day: Path, report: ReconcileReport,
) -> list[FrameRow]:
    sidecars: dict[str, Path] = {}
    images: dict[str, Path] = {}
    for p in day.iterdir():
        if p.name.startswith("."):
            if ".tmp-" in p.name:
                p.unlink(missing_ok=True)
                report.removed_temp_files += 1
            continue
        if not ID_RE.fullmatch(p.stem):
            continue
        if p.suffix == ".json":
            sidecars[p.stem] = p
        elif p.suffix == ".jpg":
            images[p.stem] = p
    for stem, image in images.items():
        if stem not in sidecars:
            image.unlink(missing_ok=True)
            report.removed_orphan_images += 1
    complete = sorted(s for s in sidecars if s in images)
    known = known_frame_paths(db, camera_id, complete)
    rows = []
    now = clock()
    for stem in complete:
        if is_unstored_copy(known, stem, images[stem].relative_to(store.root).as_posix()):
            logger.warning("reconcile: removing %s, a copy of frame %s/%s stored at %s",
                           images[stem], camera_id, stem, known[stem])
            store.remove_frame(images[stem])
            report.removed_unstored_copies += 1
            continue
        if stem in known:
            continue
        try:
            rec = FrameRecord.model_validate_json(sidecars[stem].read_bytes())
        except (OSError, ValidationError, ValueError) as exc:
            logger.warning("reconcile: unreadable sidecar %s: %s", sidecars[stem], exc)
            report.unreadable_sidecars += 1
            _remove_torn(store, images[stem], report)
            continue
        if rec.camera_id != camera_id or rec.frame_id != stem:
            report.unreadable_sidecars += 1
            continue
        unstorable = _unstorable(rec)
        if unstorable is not None:
            # Written by a gateway that let such a string through, whose insert then
            # failed: never acknowledged, and a row for it would fail again (PostgreSQL),
            # at every start.
            logger.warning("reconcile: sidecar %s cannot become a row (%s)", sidecars[stem],
                           unstorable)
            report.unreadable_sidecars += 1
            _remove_torn(store, images[stem], report)
            continue
        image_path = images[stem]
        try:
            image = image_path.read_bytes()
        except OSError:
            image = b""
        if not _whole_jpeg(image, rec):
            _remove_torn(store, image_path, report)
            continue
        rows.append(FrameRow(**recovered_row(
            rec, device_id, image_path.relative_to(store.root).as_posix(), image, now)))
    return rows


def known_frame_paths(db: Database, camera_id: str, frame_ids: list[str]) -> dict[str, str]:
    """``frame_id -> path`` of those of ``frame_ids`` that already have a ``frames`` row."""
    with db.read() as session:
        stored = stored_frame_paths(session, [(camera_id, f) for f in frame_ids])
    return {frame_id: path for (_, frame_id), path in stored.items()}


def is_unstored_copy(known: dict[str, str], frame_id: str, path: str) -> bool:
    """The complete frame at ``path`` is a copy of a frame whose row names another path:
    a replay of a stored frame id under another capture day, written before its insert was
    refused, that a crash kept the gateway from removing (``fleet.intake``). It was never
    acknowledged, and readers would see the frame twice."""
    stored = known.get(frame_id)
    return stored is not None and stored != path


def recovered_row(rec: FrameRecord, owner_device_id: str, path: str, image: bytes,
                  now: datetime) -> dict[str, Any]:
    """The ``frames`` row of a complete frame found without one (``recovered=True``): its
    device is the one named by the record's ``agent:`` source, else the camera's owner."""
    source = rec.source
    device = source.split(":", 1)[1] if source.startswith("agent:") else owner_device_id
    return {
        "camera_id": rec.camera_id, "frame_id": rec.frame_id, "device_id": device,
        "captured_at": rec.captured_at, "received_at": now, "path": path,
        "width": rec.width, "height": rec.height, "size_bytes": len(image),
        "sha256": hashlib.sha256(image).hexdigest(), "model_version": rec.model_version,
        "importance": rec.importance, "reasons": rec.reasons,
        "n_detections": len(rec.detections), "recovered": True,
    }


def remove_erased(store: Any, paths: list[str], report: Any) -> None:
    """Delete the frames at ``paths`` (image paths relative to the store's root): complete
    frames without a row that an erasure covers. Never acknowledged after the erasure, and
    erased data whatever their story; counted in ``report.removed_erased_frames``."""
    for path in paths:
        logger.warning("reconcile: removing %s, a frame without a row in a range of its "
                       "camera that was erased", path)
        store.remove_frame(store.root / path)
        report.removed_erased_frames += 1


def _unstorable(rec: FrameRecord) -> str | None:
    """Why the record's strings that go into a ``frames`` row cannot, or None."""
    return unstorable_string(rec.model_dump(include={"source", "model_version", "reasons"}))


def _whole_jpeg(image: bytes, rec: FrameRecord) -> bool:
    """The image is a structurally complete JPEG of the record's size (header walk only)."""
    try:
        info = inspect_jpeg(image)
    except JpegError:
        return False
    return (info.width, info.height) == (rec.width, rec.height)


def _remove_torn(store: FrameStore, image: Path, report: ReconcileReport) -> None:
    """Delete a frame without a row whose files did not survive a power cut whole (with
    ``frame_sync=group`` files are synced once per group commit, so a power cut can leave
    a renamed but empty file). It has no row, so it was never acknowledged: the agent sends
    it again, and readers would skip it anyway."""
    logger.warning("reconcile: removing torn frame %s (never acknowledged)", image)
    store.remove_frame(image)
    report.removed_torn_frames += 1
