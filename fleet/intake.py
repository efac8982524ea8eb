"""Frame intake: validate an upload, store it durably, acknowledge it exactly once.

Durability order for ``POST /v1/frames`` (201 only when all of it is done):

1. the JPEG and its sidecar go into the frame store (``FrameStore.write_frame``: temp file,
   fsync, rename; sidecar last) and the day folder is fsynced (the renames survive power
   loss);
2. the sidecar is read back with the platform's reader (``FrameStore.read_record``); a frame
   that does not read back as written is removed and refused, so the table never lists a
   frame the platform's readers skip;
3. the ``frames`` row is inserted and committed (group commit, ``fleet.committer``).

Before any of that the upload's cost is bounded (``fleet.jpeg``): metadata size and strict
JSON, the JPEG's structure and claimed size from its header, then one strict reduced decode
in one of ``max_concurrent_decodes`` slots.

A crash between 1 and 3 leaves a complete frame without a row. It is neither lost nor
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

__all__ = ["router", "store_frame"]

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
            raise _metadata_too_large(limit) from exc
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
                raise _metadata_too_large(limit)
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


def _metadata_too_large(limit: int) -> HTTPException:
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
def ensure_readable(gw: Gateway, record: FrameRecord, written: FrameWrite) -> None:
    """Read the sidecar back with the platform's reader before anything is acknowledged;
    a frame this request wrote that does not read back as written is removed (422)."""
    back = gw.store.read_record(record.camera_id, record.frame_id)
    if written.already_existed:
        if back is None:
            raise HTTPException(
                422, f"frame {record.frame_id} is already in the frame store but its sidecar "
                "does not read back (written by an older gateway?); send it as a new frame_id"
            )
        return
    if back is not None and back.model_dump(mode="json") == record.model_dump(mode="json"):
        return  # compared as data: the upload's bounded model types are subclasses
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


def store_frame(gw: Gateway, principal: Principal, metadata_text: str, image: bytes) -> FrameStored:
    """Validate and durably store one upload; raise ``HTTPException`` for every refusal."""
    stats = gw.stats
    with stats.span("parse_metadata"):
        meta = parse_metadata(metadata_text)
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
    key = f"{meta.camera_id}/{meta.frame_id}"
    # No "already stored?" query first: a replay costs one stat in write_frame (a no-op
    # for a frame already there) and ends as an IntegrityError -> 409 on insert, so the
    # common path saves a database round trip.
    with gw.key_lock(key):
        try:
            with stats.span("write_frame"):
                written = gw.store.write_frame(
                    record, image, decoded_size=(info.width, info.height))
            if (gw.settings.fsync_directories and gw.store.is_local
                    and not written.already_existed):
                with stats.span("fsync_dir"):
                    fsync_dir(written.path.parent)
            with stats.span("read_back"):
                ensure_readable(gw, record, written)
        except InvalidInputError as exc:
            raise HTTPException(422, f"frame {meta.frame_id}: {exc.reason}") from exc
        except OSError as exc:
            logger.exception("frame store write failed for %s", key)
            status = 507 if exc.errno == 28 else 503  # ENOSPC
            raise HTTPException(status, f"gateway could not store frame {meta.frame_id} "
                                f"({exc.strerror}); retry later") from exc
        if written.already_existed:
            stats.count("frames_file_already_there")

        now = gw.now()
        rel = written.path.relative_to(gw.store.root).as_posix()
        digest = hashlib.sha256(image).hexdigest()

        def insert(session: Session) -> None:
            session.add(FrameRow(
                camera_id=record.camera_id, frame_id=record.frame_id,
                device_id=principal.device_id, captured_at=record.captured_at, received_at=now,
                path=rel, width=record.width, height=record.height, size_bytes=len(image),
                sha256=digest, model_version=record.model_version, importance=record.importance,
                reasons=record.reasons, n_detections=len(record.detections),
            ))
            session.flush()
            session.execute(
                update(Device).where(Device.device_id == principal.device_id)
                .values(last_seen_at=now)
            )

        try:
            with stats.span("commit_wait"):
                gw.committer.submit(insert)
        except IntegrityError as exc:
            stats.count("frames_duplicate")
            raise HTTPException(409, f"frame {meta.frame_id} already stored") from exc
        except (CommitFailed, TimeoutError) as exc:
            raise HTTPException(503, f"gateway could not record frame {meta.frame_id} ({exc}); "
                                "retry later — the frame is not acknowledged") from exc
    stats.count("frames_stored")
    gw.metrics.frame_stored(len(image))
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
