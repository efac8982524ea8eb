"""Frame intake: validate an upload, store it durably, acknowledge it exactly once.

Durability order for ``POST /v1/frames`` and each frame of ``POST /v1/frames/batch``
(``fleet.intake_batch``; 201 only when all of it is done):

1. the record is checked to read back as written (``reads_back``, in memory: a frame whose
   sidecar the platform's readers would skip is refused before anything is written);
2. the JPEG and its sidecar go into the frame store (``write_frame``: temp file, rename;
   sidecar last). ``frame_sync=per_file``: each file fsynced before its rename and the day
   folder after; ``group`` (default): no fsync here;
3. the ``frames`` row goes to the group committer (``fleet.committer``), a whole batch as one
   item with a SAVEPOINT per row. With ``group`` the committer first syncs the frame store
   once (``FrameStorage.sync``: ``syncfs(2)``; a no-op on object storage, whose PUTs are
   durable when answered) — so every file of every frame in that commit is durable before
   the commit, and a failed sync fails the commit (503, nothing acknowledged);
4. the row is committed; then the answer.

Before any of that the upload's cost is bounded (``fleet.jpeg``): metadata size and strict
JSON, the JPEG's structure and claimed size from its header, then one strict reduced decode
in one of ``max_concurrent_decodes`` slots.

A crash between 2 and 4 leaves a complete frame without a row. It is neither lost nor
duplicated: the agent got no 201, so it retries; ``write_frame`` sees the frame already
there (a no-op) and the row is inserted then. Independently, start-up runs
``fleet.reconcile.reconcile_frame_store``, which gives such frames their row
(``recovered=True``) and deletes temp files and images without a sidecar (never
acknowledged) — so the frame store and the table agree even when the agent never comes back. The unique ``(camera_id, frame_id)``
constraint makes every path idempotent; a replay of an acknowledged frame is a 409.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet.auth import DevicePrincipal, Principal
from fleet.auth_first import AuthFirstRoute
from fleet.bodies import JsonRejected, loads, read_form
from fleet.committer import CommitFailed
from fleet.config import GatewaySettings
from fleet.db import Device, FrameRow
from fleet.jpeg import (
    DecoderBusy,
    JpegError,
    JpegInfo,
    JpegLimits,
    check_jpeg,
    measure_quality,
)
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut, FrameMetadata, FrameStored
from roadloop.data.frames import FrameQuality, FrameRecord, FrameWrite
from roadloop.errors import InvalidInputError
from roadloop.fsutil import fsync_dir

__all__ = ["CheckedFrame", "check_frame", "router", "store_frame", "store_frames"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metadata
def validation_message(exc: ValidationError, prefix: str) -> str:
    """One line naming each bad field: ``metadata is invalid: frame_id: Field required``."""
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (+{len(exc.errors()) - 8} more)" if len(exc.errors()) > 8 else ""
    return f"{prefix}: " + "; ".join(parts) + more


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
    try:
        form = await read_form(request, max_files=2, max_fields=4, max_part_size=limit)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # e.g. the body limit's 413
            raise
        if "maximum size" in str(exc.detail):  # a text part over max_part_size
            raise metadata_too_large(limit) from exc
        raise HTTPException(422, f"malformed multipart body: {exc.detail}") from exc
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


# --------------------------------------------------------------------------- the JPEG
def jpeg_limits(settings: GatewaySettings) -> JpegLimits:
    return JpegLimits(
        max_side=settings.max_image_side,
        max_pixels=settings.max_image_pixels,
        max_scans=settings.max_jpeg_scans,
        max_metadata_bytes=settings.max_jpeg_metadata_bytes,
    )


def checked_quality(gw: Gateway, meta: FrameMetadata, image: bytes) -> tuple[JpegInfo, FrameQuality]:
    """Structure and limits from the header (no decode), then one strict, reduced decode in
    one of ``max_concurrent_decodes`` slots (waited for at most ``decode_wait_s``; 503 with
    ``Retry-After`` after that: the frame is not acknowledged); the quality the agent sent,
    completed from that decode."""
    settings = gw.settings
    try:
        with gw.stats.span("jpeg_check"):
            info = check_jpeg(image, meta.width, meta.height, settings.max_image_side,
                              jpeg_limits(settings))
        sent = meta.quality.model_dump(exclude_none=True) if meta.quality is not None else {}
        with gw.stats.span("decode"):
            quality = gw.decoders.run(settings.decode_wait_s, measure_quality, image, info, sent,
                                      settings.quality_decode_max_pixels)
    except JpegError as exc:
        gw.stats.count("frames_bad_jpeg")
        raise HTTPException(422, f"frame {meta.frame_id}: {exc}") from exc
    except DecoderBusy as exc:
        gw.stats.count("decode_busy")
        retry_after = max(1, math.ceil(settings.decode_wait_s))
        raise HTTPException(
            503, f"gateway is busy decoding other frames ({exc}); retry after {retry_after} s "
            "— the frame is not acknowledged", headers={"Retry-After": str(retry_after)},
        ) from exc
    return info, quality


# --------------------------------------------------------------------------- storing
@dataclass(frozen=True)
class CheckedFrame:
    """One upload that passed every check that needs no storage: what ``store_frames``
    writes."""

    meta: FrameMetadata
    record: FrameRecord
    info: JpegInfo
    image: bytes

    @property
    def key(self) -> str:
        return f"{self.meta.camera_id}/{self.meta.frame_id}"


def check_frame(gw: Gateway, principal: Principal, meta: FrameMetadata,
                image: bytes) -> CheckedFrame:
    """Camera, JPEG (``checked_quality``) and record checks of one frame; raises
    ``HTTPException`` for a refusal. Nothing is stored yet."""
    if meta.camera_id != principal.camera_id:
        raise HTTPException(
            403, f"metadata camera_id {meta.camera_id} is not this device's camera "
            f"({principal.camera_id}); a device posts frames of its enrolled camera only"
        )
    info, quality = checked_quality(gw, meta, image)
    try:
        record = FrameRecord(
            frame_id=meta.frame_id,
            camera_id=meta.camera_id,
            captured_at=meta.captured_at,
            reasons=meta.reasons,
            importance=meta.importance,
            source=f"agent:{principal.device_id}",
            source_ref=meta.source_ref,
            model_version=meta.model_version,
            detections=meta.detections,
            width=meta.width,
            height=meta.height,
            quality=quality,
            redaction=(meta.redaction.model_dump() if meta.redaction is not None else None),
        )
    except ValidationError as exc:
        raise HTTPException(422, validation_message(exc, "metadata is invalid")) from exc
    with gw.stats.span("read_back"):
        if not reads_back(record):
            gw.stats.count("frames_unreadable_refused")
            raise HTTPException(
                422, f"frame {record.frame_id}: its record does not read back from the frame "
                "store as written; nothing was stored"
            )
    return CheckedFrame(meta, record, info, image)


def reads_back(record: FrameRecord) -> bool:
    """Whether ``record``'s sidecar, as the store writes it, parses back to the same data
    (compared as data: the upload's bounded model types are subclasses).

    This is the check that matters, done in memory before anything is written: a sidecar is
    bytes the gateway serialises itself, so reading the file back from disk (what the
    gateway did before, ``frame_read_back``) adds a ``stat`` + read + parse per frame and only
    re-reads the page cache it just wrote; it cannot see whether the bytes reached the disk
    (that is the sync's job). Measured in benchmarks/results/intake_parsing.md."""
    try:
        back = FrameRecord.model_validate_json(record.model_dump_json(indent=2))
    except (ValidationError, ValueError):
        return False
    return back.model_dump(mode="json") == record.model_dump(mode="json")


def ensure_readable(gw: Gateway, record: FrameRecord, written: FrameWrite) -> None:
    """A frame already in the store must read back with the platform's reader (an older
    gateway may have written it); a new one is read back from the store only with
    ``frame_read_back`` (``reads_back`` has already checked it in memory). A frame this
    request wrote that does not read back as written is removed (422)."""
    if not written.already_existed and not gw.settings.frame_read_back:
        return
    back = gw.store.read_record(record.camera_id, record.frame_id)
    if written.already_existed:
        if back is None:
            raise HTTPException(
                422, f"frame {record.frame_id} is already in the frame store but its sidecar "
                "does not read back (written by an older gateway?); send it as a new frame_id"
            )
        return
    if back is not None and back.model_dump(mode="json") == record.model_dump(mode="json"):
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


def write_checked(gw: Gateway, frame: CheckedFrame) -> FrameWrite:
    """Write one frame's files (caller holds its key lock); ``HTTPException`` on failure.
    ``frame_sync=per_file``: fsynced files and folder; ``group``: the committer syncs the
    store once before the batch's commit (``fleet.runtime``)."""
    stats, record, meta = gw.stats, frame.record, frame.meta
    per_file = gw.settings.frame_sync == "per_file"
    try:
        with stats.span("write_frame"):
            written = gw.store.write_frame(record, frame.image, durable=per_file,
                                           decoded_size=(frame.info.width, frame.info.height))
        if (per_file and gw.settings.fsync_directories and gw.store.is_local
                and not written.already_existed):
            with stats.span("fsync_dir"):
                fsync_dir(written.path.parent)
        ensure_readable(gw, record, written)
    except InvalidInputError as exc:
        raise HTTPException(422, f"frame {meta.frame_id}: {exc.reason}") from exc
    except OSError as exc:
        logger.exception("frame store write failed for %s", frame.key)
        status = 507 if exc.errno == 28 else 503  # ENOSPC
        raise HTTPException(status, f"gateway could not store frame {meta.frame_id} "
                            f"({exc.strerror}); retry later") from exc
    if written.already_existed:
        stats.count("frames_file_already_there")
    return written


def store_frames(gw: Gateway, principal: Principal,
                 frames: list[CheckedFrame]) -> list[HTTPException | None]:
    """Write ``frames`` and commit their rows as ONE group-commit item (each row in its own
    SAVEPOINT, so a duplicate is a 409 for that frame only); per frame, None when it is
    stored and durable, else the refusal ``POST /v1/frames`` would give it alone."""
    stats = gw.stats
    outcomes: list[HTTPException | None] = [None] * len(frames)
    # No "already stored?" query first: a replay costs one stat in write_frame (a no-op
    # for a frame already there) and ends as an IntegrityError -> 409 on insert, so the
    # common path saves a database round trip.
    with gw.key_locks([f.key for f in frames]):
        pending: list[tuple[int, CheckedFrame, str]] = []
        for i, frame in enumerate(frames):
            try:
                written = write_checked(gw, frame)
            except HTTPException as exc:
                outcomes[i] = exc
                continue
            pending.append((i, frame, written.path.relative_to(gw.store.root).as_posix()))
        if not pending:
            return outcomes
        now = gw.now()
        digests = [hashlib.sha256(f.image).hexdigest() for _, f, _ in pending]

        def insert(session: Session) -> list[bool]:
            inserted = []
            for (_, frame, rel), digest in zip(pending, digests, strict=True):
                rec = frame.record
                try:
                    with session.begin_nested():
                        session.add(FrameRow(
                            camera_id=rec.camera_id, frame_id=rec.frame_id,
                            device_id=principal.device_id, captured_at=rec.captured_at,
                            received_at=now, path=rel, width=rec.width, height=rec.height,
                            size_bytes=len(frame.image), sha256=digest,
                            model_version=rec.model_version, importance=rec.importance,
                            reasons=rec.reasons, n_detections=len(rec.detections),
                        ))
                        session.flush()
                    inserted.append(True)
                except IntegrityError:
                    inserted.append(False)
            session.execute(
                update(Device).where(Device.device_id == principal.device_id)
                .values(last_seen_at=now)
            )
            return inserted

        try:
            with stats.span("commit_wait"):
                inserted = gw.committer.submit(insert)
        except (CommitFailed, TimeoutError) as exc:
            for i, frame, _ in pending:
                outcomes[i] = HTTPException(
                    503, f"gateway could not record frame {frame.meta.frame_id} ({exc}); "
                    "retry later — the frame is not acknowledged")
            return outcomes
    for (i, frame, _), ok in zip(pending, inserted, strict=True):
        if ok:
            stats.count("frames_stored")
            gw.metrics.frame_stored(len(frame.image))
        else:
            stats.count("frames_duplicate")
            outcomes[i] = HTTPException(409, f"frame {frame.meta.frame_id} already stored")
    return outcomes


def store_frame(gw: Gateway, principal: Principal, metadata_text: str, image: bytes) -> FrameStored:
    """Validate and durably store one upload; raise ``HTTPException`` for every refusal."""
    with gw.stats.span("parse_metadata"):
        meta = parse_metadata(metadata_text)
    (refusal,) = store_frames(gw, principal, [check_frame(gw, principal, meta, image)])
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
        413: {"model": ErrorOut}, 422: {"model": ErrorOut}, 429: {"model": ErrorOut},
        503: {"model": ErrorOut, "description": "Not stored; retry later."},
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
