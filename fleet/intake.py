"""Frame intake: validate an upload, store it durably, acknowledge it exactly once.

Durability order for ``POST /v1/frames`` and each frame of ``POST /v1/frames/batch``
(``fleet.intake_batch``; 201 only when all of it is done):

1. the record is checked to read back as written (``frame_sidecar``, in memory: a frame whose
   sidecar the platform's readers would skip is refused before anything is written);
2. the JPEG and its sidecar go into the frame store (``write_frame``: each file written whole,
   then named — on Linux an unnamed file linked into place, else a temp file renamed; sidecar
   last). ``frame_sync=per_file``: each file fsynced before it is named and the day
   folder after; ``group`` (default): no fsync here;
3. the ``frames`` row goes to the group committer (``fleet.committer``), a whole batch as one
   item, its rows in one ``INSERT ... ON CONFLICT DO NOTHING`` (a duplicate is a 409 for
   that frame only). With ``group`` the committer first syncs the frame store
   once (``FrameStorage.sync``: ``syncfs(2)``; a no-op on object storage, whose PUTs are
   durable when answered) — so every file of every frame in that commit is durable before
   the commit, and a failed sync fails the commit (503, nothing acknowledged);
4. the row is committed; then the answer.

A frame of a camera and capture time an erasure covers (``POST /v1/privacy/erase``: its
``frame_erasures`` row) is refused in step 3, in the transaction that would insert its row
(``fleet.db.erased_frames``: on PostgreSQL under the camera's shared advisory lock, which the
erasure takes exclusively while it writes that row), with 410 Gone — final, the agent drops
it — and the files it has in the store are removed: an upload in flight while another
process or replica erased the range never answers 201 for a frame whose files the erasure
deleted, and a late upload of an erased frame does not bring it back.

Before any of that the upload's cost is bounded (``fleet.jpeg``): metadata size and strict
JSON, the JPEG's structure and claimed size from its header, then one strict reduced decode
in one of ``max_concurrent_decodes`` slots.

A crash between 2 and 4 leaves a complete frame without a row. It is neither lost nor
duplicated: the agent got no 201, so it retries; ``write_frame`` sees the frame already
there (a no-op) and the row is inserted then. Independently, start-up runs
``fleet.reconcile.reconcile_frame_store``, which gives such frames their row
(``recovered=True``) and deletes what was never acknowledged (temp files, images without a
sidecar, torn files). The unique ``(camera_id, frame_id)`` constraint makes every path
idempotent; a replay of an acknowledged frame is a 409.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from fleet.auth import DevicePrincipal, Principal
from fleet.auth_first import AuthFirstRoute
from fleet.bodies import JsonRejected, loads, read_form
from fleet.committer import CommitFailed
from fleet.config import GatewaySettings
from fleet.db import (
    database_unavailable,
    erased_frames,
    insert_new_frames,
    stored_frame_paths,
    touch_device,
)
from fleet.frame_checks import CheckedFrame, check_frames, validation_message
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut, FrameMetadata, FrameStored
from roadloop.data.frame_records import FrameRecord, FrameWrite
from roadloop.data.object_frames import FrameWriteInProgress
from roadloop.errors import InvalidInputError
from roadloop.fsutil import fsync_dir

__all__ = ["CheckedFrame", "check_frames", "router", "store_frame", "store_frames",
           "validate_metadata"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metadata
def parse_metadata(text: str) -> FrameMetadata:
    """Strict JSON (no NaN/Infinity anywhere: Python's json takes them by default and a
    sidecar cannot hold them), then the schema (which refuses non-finite values too)."""
    try:
        raw = loads(text, "metadata")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"metadata is not valid JSON: {exc}") from exc
    except JsonRejected as exc:
        raise HTTPException(422, str(exc)) from exc
    return validate_metadata(raw)


def validate_metadata(raw: Any) -> FrameMetadata:
    """The schema check of ``parse_metadata``, for metadata already parsed (a batch's
    manifest entry)."""
    if not isinstance(raw, dict):
        raise HTTPException(422, "metadata must be a JSON object")
    try:
        return FrameMetadata.model_validate(raw)
    except ValidationError as exc:
        raise HTTPException(422, validation_message(exc, "metadata is invalid")) from exc


# --------------------------------------------------------------------------- the form
async def read_upload(request: Request, settings: GatewaySettings) -> tuple[str, bytes]:
    """(metadata text, JPEG bytes) of a ``POST /v1/frames`` body.

    ``metadata`` is held to ``max_metadata_bytes`` whether it comes as a text field (the
    parser stops reading at the cap) or as a file part (read no further than the cap);
    ``image`` must be a file part (a text field is re-encoded by the form parser).
    """
    limit = settings.max_metadata_bytes
    form = await read_form(request, max_files=2, max_fields=4, max_part_size=limit,
                           part_too_large=lambda: metadata_too_large(limit))
    try:
        image = form.get("image")
        metadata = form.get("metadata")
        if image is None or metadata is None:
            missing = [n for n, v in (("image", image), ("metadata", metadata)) if v is None]
            raise HTTPException(
                422, f"missing form field(s) {', '.join(missing)}: send multipart/form-data "
                "with 'image' (JPEG file) and 'metadata' (JSON text)"
            )
        if not isinstance(image, UploadFile):
            raise HTTPException(422, "form field 'image' must be a file part (multipart "
                                "with a filename), not a text field")
        if isinstance(metadata, UploadFile):
            data = await metadata.read(limit + 1)
            if len(data) > limit:
                raise metadata_too_large(limit)
            try:
                metadata_text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HTTPException(422, f"metadata is not UTF-8 text: {exc}") from exc
        else:
            metadata_text = metadata
        image_bytes = await image.read()
    finally:
        await form.close()
    return metadata_text, image_bytes


def metadata_too_large(limit: int) -> HTTPException:
    return HTTPException(
        413, f"metadata is larger than the {limit}-byte limit (max_metadata_bytes), "
        "as a text field or a file part; send 'image' as a file part"
    )


# --------------------------------------------------------------------------- storing
def ensure_readable(gw: Gateway, record: FrameRecord, written: FrameWrite) -> None:
    """A frame already in the store must read back with the platform's reader (an older
    gateway may have written it) and be this upload's: another record under its id is a
    409 here, before any row is inserted — the row is built from this upload, and had it
    won the insert (the store's frame an upload in flight on another worker or replica, or
    a crash's) it would describe pixels the store does not hold. A new frame is read back
    from the store only with ``frame_read_back`` (``frame_sidecar`` has already checked it in
    memory). A frame this request wrote that does not read back as written is removed
    (422)."""
    if not written.already_existed and not gw.settings.frame_read_back:
        return
    back = gw.store.read_record(record.camera_id, record.frame_id,
                                captured_at=record.captured_at)
    if written.already_existed:
        if back is None:
            raise HTTPException(
                422, f"frame {record.frame_id} is already in the frame store but its sidecar "
                "does not read back (written by an older gateway?); send it as a new frame_id"
            )
        if not same_upload(back, record):
            gw.stats.count("frames_other_content_refused")
            raise HTTPException(409, f"frame {record.frame_id} already stored (with other "
                                "content: this upload was not stored)")
        return
    if back is not None and same_upload(back, record):
        return
    gw.stats.count("frames_unreadable_removed")
    logger.error("sidecar of %s/%s does not read back as written; removing the frame",
                 record.camera_id, record.frame_id)
    gw.store.remove_frame(written.path)
    if gw.settings.fsync_directories and gw.store.is_local:
        fsync_dir(written.path.parent)
    raise HTTPException(
        422, f"frame {record.frame_id}: its record does not read back from the frame store as "
        "written; nothing was stored"
    )


def same_upload(stored: FrameRecord, record: FrameRecord) -> bool:
    """Whether the stored record is ``record`` (as data). A record written before records
    stated their image's hash (``image_sha256`` None) is compared without it."""
    a, b = stored.model_dump(mode="json"), record.model_dump(mode="json")
    if a["image_sha256"] is None:
        b["image_sha256"] = None
    return a == b


# write_checked's answers when the store itself failed (not the frame): 503 down, 507 full.
STORE_FAILED = (503, 507)


def write_checked(gw: Gateway, frame: CheckedFrame) -> FrameWrite:
    """Write one frame's files (caller holds its key lock); ``HTTPException`` on failure.
    ``frame_sync=per_file``: fsynced files and folder; ``group``: the committer syncs the
    store once before the batch's commit (``fleet.runtime``)."""
    stats, record, meta = gw.stats, frame.record, frame.meta
    per_file = gw.settings.frame_sync == "per_file"
    try:
        with stats.span("write_frame"):
            written = gw.store.write_frame(record, frame.image, durable=per_file,
                                           decoded_size=(frame.info.width, frame.info.height),
                                           look_in_other_days=False, sidecar=frame.sidecar)
        if (per_file and gw.settings.fsync_directories and gw.store.is_local
                and not written.already_existed):
            with stats.span("fsync_dir"):
                fsync_dir(written.path.parent)
        ensure_readable(gw, record, written)
    except InvalidInputError as exc:
        raise HTTPException(422, f"frame {meta.frame_id}: {exc.reason}") from exc
    except FrameWriteInProgress as exc:  # this frame only: the store works (store_frames)
        logger.warning("frame %s: %s", frame.key, exc.strerror)
        raise HTTPException(503, f"gateway could not store frame {meta.frame_id} "
                            f"({exc.strerror}); retry later",
                            headers={"Retry-After": str(RECORD_RETRY_AFTER_S)}) from exc
    except OSError as exc:
        logger.exception("frame store write failed for %s", frame.key)
        status = 507 if exc.errno == 28 else 503  # ENOSPC
        raise HTTPException(status, f"gateway could not store frame {meta.frame_id} "
                            f"({exc.strerror}); retry later") from exc
    if written.already_existed:
        stats.count("frames_file_already_there")
    return written


def _under_root(path: Path, root: str) -> str:
    """``path`` relative to the store's ``root`` (ending in a separator), POSIX: the frames
    row's ``path``. A string prefix, not ``Path.relative_to``, which showed in the profile
    at one call per frame."""
    text = os.fspath(path)
    if not text.startswith(root):
        return path.relative_to(root).as_posix()  # raises ValueError, naming both
    return text[len(root):].replace(os.sep, "/")


def store_frames(gw: Gateway, principal: Principal,
                 frames: list[CheckedFrame]) -> list[HTTPException | None]:
    """Write ``frames`` and commit their rows as ONE group-commit item (one INSERT that skips
    frame ids already stored, so a duplicate is a 409 for that frame only); per frame, None
    when it is stored and durable, else the refusal ``POST /v1/frames`` would give it
    alone."""
    stats = gw.stats
    outcomes: list[HTTPException | None] = [None] * len(frames)
    # No "already stored?" query first: a replay costs one stat in write_frame (a no-op
    # for a frame already there) and is skipped by the insert (ON CONFLICT DO NOTHING) ->
    # 409, so the common path saves a database round trip.
    with gw.frame_locks.hold([f.key for f in frames]):
        pending: list[tuple[int, CheckedFrame, FrameWrite, str]] = []
        root = os.path.join(gw.store.root, "")
        store_failed: HTTPException | None = None
        for i, frame in enumerate(frames):
            if store_failed is not None:
                # The store failed on an earlier frame of this request (down, stalled: an
                # object store's attempts take seconds; full): the rest would wait for it the
                # same way, one after another, past the agent's timeout. They get its answer.
                outcomes[i] = HTTPException(
                    store_failed.status_code, f"gateway could not store frame "
                    f"{frame.meta.frame_id}: the frame store failed on an earlier frame of this "
                    "request; retry later")
                continue
            try:
                written = write_checked(gw, frame)
            except HTTPException as exc:
                outcomes[i] = exc
                if (exc.status_code in STORE_FAILED
                        and not isinstance(exc.__cause__, FrameWriteInProgress)):
                    store_failed = exc
                continue
            pending.append((i, frame, written, _under_root(written.path, root)))
        if not pending:
            return outcomes
        now = gw.now()

        rows = [{
            "camera_id": f.record.camera_id, "frame_id": f.record.frame_id,
            "device_id": principal.device_id, "captured_at": f.record.captured_at,
            "received_at": now, "path": rel, "width": f.record.width, "height": f.record.height,
            "size_bytes": len(f.image), "sha256": f.record.image_sha256,
            "model_version": f.record.model_version, "importance": f.record.importance,
            "reasons": f.record.reasons, "n_detections": len(f.record.detections),
            "recovered": False,
        } for _, f, _, rel in pending]

        def insert_rows(session: Session) -> tuple[list[str], dict[tuple[str, str], str]]:
            """Per row ``stored``, ``duplicate`` or ``erased``: one INSERT that skips frames
            already stored and frames an erasure covers, looked up first in this transaction
            (``erased_frames``). Only the first copy of a frame id in the request can be
            stored or erased; a later one is a 409, as it is once the id is stored. A frame id
            already stored is a 409 whatever capture time the upload claims: an erasure
            covering that claimed time does not make it ``erased``, whose files would be
            removed — those of the stored frame. Also the stored path of each duplicate whose
            files this request wrote (see ``_drop_unstored_copies``). The device row is
            touched first: the erasure lock (PostgreSQL) is then taken just before the
            lookup."""
            touch_device(session, principal.device_id, now)
            keys = [(r["camera_id"], r["frame_id"]) for r in rows]
            first = {key: i for i, key in reversed(list(enumerate(keys)))}
            covered = erased_frames(
                session, [(r["camera_id"], r["frame_id"], r["captured_at"]) for r in rows])
            stored_before = stored_frame_paths(
                session, sorted({(c, f) for c, f, _ in covered})) if covered else {}
            erased = {i for i, (row, key) in enumerate(zip(rows, keys, strict=True))
                      if first[key] == i and key not in stored_before
                      and (*key, row["captured_at"]) in covered}
            new = insert_new_frames(session, [r for i, r in enumerate(rows)
                                              if first[keys[i]] == i and i not in erased])
            outcome = ["erased" if i in erased
                       else "stored" if first[key] == i and key in new
                       else "duplicate" for i, key in enumerate(keys)]
            wrote_refused = [(f.record.camera_id, f.record.frame_id)
                             for (_, f, w, _), done in zip(pending, outcome, strict=True)
                             if done == "duplicate" and not w.already_existed]
            return outcome, stored_frame_paths(session, wrote_refused)

        try:
            with stats.span("commit_wait"):
                done, stored_paths = gw.committer.submit(insert_rows)
        except (CommitFailed, TimeoutError) as exc:
            return _retry_later(outcomes, pending, exc)
        except Exception as exc:
            if database_unavailable(exc):  # the committer says CommitFailed; to be sure
                logger.exception("recording frames failed: the database is unavailable")
                return _retry_later(outcomes, pending, "the gateway's database is unavailable")
            # Not a database that is down (a retry finds the files in place): the rows
            # themselves were refused, and would be again. Files left without a row would be
            # turned into rows by the start-up reconcile, so remove what this request
            # wrote; the error itself is the 500 it is.
            _drop_files_written(gw, pending)
            raise
        _drop_unstored_copies(gw, pending, [d != "duplicate" for d in done], stored_paths)
        _drop_erased(gw, pending, done)
    for (i, frame, _, _), result in zip(pending, done, strict=True):
        if result == "stored":
            stats.count("frames_stored")
            gw.metrics.frame_stored(len(frame.image))
        elif result == "erased":
            stats.count("frames_erased_refused")
            outcomes[i] = HTTPException(
                410, f"frame {frame.meta.frame_id} of camera {frame.record.camera_id} was "
                f"captured at {frame.record.captured_at.isoformat()}, in a range of the "
                "camera's frames that was erased (POST /v1/privacy/erase): not stored, and "
                "never will be — do not send it again")
        else:
            stats.count("frames_duplicate")
            outcomes[i] = HTTPException(409, f"frame {frame.meta.frame_id} already stored")
    return outcomes


# Retry-After of a frame that could not be recorded: the least wait; an agent backs off
# further on its own (edge_agent.uploader: the larger of its backoff and this).
RECORD_RETRY_AFTER_S = 1


def _retry_later(outcomes: list[HTTPException | None],
                 pending: list[tuple[int, CheckedFrame, FrameWrite, str]],
                 why: object) -> list[HTTPException | None]:
    """503 with ``Retry-After`` for every pending frame; their files stay (a retry finds them
    in place, and the start-up reconcile gives a frame the agent never retries its row)."""
    for i, frame, _, _ in pending:
        outcomes[i] = HTTPException(
            503, f"gateway could not record frame {frame.meta.frame_id} ({why}); retry later "
            "— the frame is not acknowledged",
            headers={"Retry-After": str(RECORD_RETRY_AFTER_S)})
    return outcomes


def _drop_erased(gw: Gateway, pending: list[tuple[int, CheckedFrame, FrameWrite, str]],
                 done: list[str]) -> None:
    """Remove the files of each frame an erasure covers, whether this request wrote them or
    found them (an earlier attempt's): they are erased data, and left in the store the
    start-up reconcile would look at them again. Runs under the frames' key locks."""
    for (_, frame, written, rel), result in zip(pending, done, strict=True):
        if result != "erased":
            continue
        try:
            gw.store.remove_frame(written.path)
        except OSError:
            logger.exception("could not remove %s, written for frame %s/%s that an erasure "
                             "covers; the next erasure or start-up reconcile removes it", rel,
                             frame.record.camera_id, frame.record.frame_id)


def _drop_files_written(gw: Gateway,
                        pending: list[tuple[int, CheckedFrame, FrameWrite, str]]) -> None:
    """Remove the frames this request wrote (not those it found already stored)."""
    for _, frame, written, rel in pending:
        if written.already_existed:
            continue
        try:
            gw.store.remove_frame(written.path)
        except OSError:
            logger.exception("could not remove %s, written for frame %s/%s whose row was "
                             "refused", rel, frame.record.camera_id, frame.record.frame_id)


def _drop_unstored_copies(gw: Gateway, pending: list[tuple[int, CheckedFrame, FrameWrite, str]],
                          inserted: list[bool], stored_paths: dict[tuple[str, str], str]) -> None:
    """Remove the files this request wrote for a frame whose id is stored elsewhere.

    A frame id is unique per camera, and the store's existence check in ``write_frame``
    looks where the *record* puts it (the record's own date folder: the object store's
    only check, and the folder store's with ``look_in_other_days=False``, which spares an
    upload one stat per date folder of its camera). So a replay of a stored frame id with
    another ``captured_at`` (a buggy or hostile agent) writes a second, complete copy under
    another day before its insert is refused (409); left there, every reader of the store
    would see the frame twice, once with a record the database never accepted. Runs under
    the frames' key locks, after the commit. A copy this fails to remove (or that a crash
    leaves) is removed by the start-up reconcile (``fleet.reconcile``: a complete frame
    whose row names another path).

    A later copy of a frame id in one request whose first copy an erasure covered (410) is
    a 409 with no row at all: the files it wrote go too, or the start-up reconcile would
    give them the row its answer refused.
    """
    for (_, frame, written, rel), ok in zip(pending, inserted, strict=True):
        stored = stored_paths.get((frame.record.camera_id, frame.record.frame_id))
        if ok or written.already_existed or stored == rel:
            continue
        try:
            gw.store.remove_frame(written.path)
        except OSError:
            logger.exception("could not remove %s, a copy of frame %s/%s (stored at %s); the "
                             "start-up reconcile removes it", rel, frame.record.camera_id,
                             frame.record.frame_id, stored or "nowhere")
            continue
        gw.stats.count("frames_duplicate_copy_removed")
        logger.warning("frame %s/%s is stored at %s: removed the copy a replay wrote at %s",
                       frame.record.camera_id, frame.record.frame_id, stored or "nowhere",
                       rel)


def store_frame(gw: Gateway, principal: Principal, metadata_text: str, image: bytes) -> FrameStored:
    """Validate and durably store one upload; raise ``HTTPException`` for every refusal."""
    with gw.stats.span("parse_metadata"):
        meta = parse_metadata(metadata_text)
    (checked,) = check_frames(gw, principal, [(meta, image)])
    if isinstance(checked, HTTPException):
        raise checked
    (refusal,) = store_frames(gw, principal, [checked])
    if refusal is not None:
        raise refusal
    return FrameStored(frame_id=meta.frame_id, stored=True)


# --------------------------------------------------------------------------- route
router = APIRouter(tags=["frames"], route_class=AuthFirstRoute)

_MULTIPART_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "metadata"],
                    "properties": {
                        "image": {"type": "string", "format": "binary",
                                  "description": "The frame, JPEG."},
                        "metadata": {"type": "string",
                                     "description": "JSON text of FrameMetadata."},
                    },
                },
            }
        },
    }
}


@router.post(
    "/v1/frames",
    status_code=201,
    response_model=FrameStored,
    responses={
        401: {"model": ErrorOut}, 403: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "Already stored: treat as acknowledged."},
        410: {"model": ErrorOut, "description": "Captured in an erased range of its camera "
              "(POST /v1/privacy/erase): not stored, never will be; do not retry."},
        413: {"model": ErrorOut}, 422: {"model": ErrorOut}, 429: {"model": ErrorOut},
        503: {"model": ErrorOut, "description": "Not stored; retry later (Retry-After)."},
    },
    openapi_extra=_MULTIPART_DOC,
)
async def post_frame(
    request: Request,
    principal: DevicePrincipal,
    gw: GatewayDep,
) -> FrameStored:
    """Upload one frame (multipart: ``image`` JPEG + ``metadata`` JSON); idempotent by id.

    Authentication and the rate limit are checked before the body is read
    (``DevicePrincipal`` on an ``AuthFirstRoute``).
    """
    with gw.stats.span("read_form"):
        metadata_text, image_bytes = await read_upload(request, gw.settings)
    return await run_in_threadpool(store_frame, gw, principal, metadata_text, image_bytes)
