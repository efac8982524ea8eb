"""Frame intake: validate an upload, store it durably, acknowledge it exactly once.

Durability order for ``POST /v1/frames`` (201 only when all of it is done):

1. the JPEG and its sidecar go into the frame store (``FrameStore.write_frame``: temp file,
   fsync, rename; sidecar last) and the day folder is fsynced (the renames survive power
   loss);
2. the ``frames`` row is inserted and committed (group commit, ``fleet.committer``).

A crash between 1 and 2 leaves a complete frame without a row. It is neither lost nor
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
from typing import Any

import cv2
import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from fleet.auth import DevicePrincipal, Principal
from fleet.auth_first import AuthFirstRoute
from fleet.committer import CommitFailed
from fleet.db import Device, FrameRow
from fleet.runtime import Gateway, GatewayDep
from fleet.schemas import ErrorOut, FrameMetadata, FrameStored, QualityIn
from roadloop.data.frames import FrameQuality, FrameRecord, compute_quality
from roadloop.errors import InvalidInputError
from roadloop.fsutil import fsync_dir

logger = logging.getLogger(__name__)

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class JpegError(ValueError):
    """The upload is not a usable JPEG; the message says what is wrong."""


# --------------------------------------------------------------------------- JPEG checks
def jpeg_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG frame header, without decoding any pixels."""
    if data[:3] != b"\xff\xd8\xff":
        raise JpegError("image is not a JPEG (it does not start with the FFD8 marker)")
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise JpegError(f"JPEG header is corrupt (no marker at byte {i})")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xD9, 0xDA):
            raise JpegError("JPEG has no frame header (SOF) before its image data")
        if i + 2 > n:
            break
        seg_len = int.from_bytes(data[i : i + 2], "big")
        if seg_len < 2:
            raise JpegError(f"JPEG header is corrupt (segment length {seg_len} at byte {i})")
        if marker in _SOF_MARKERS:
            if i + 7 > n:
                break
            height = int.from_bytes(data[i + 3 : i + 5], "big")
            width = int.from_bytes(data[i + 5 : i + 7], "big")
            return width, height
        i += seg_len
    raise JpegError("JPEG is truncated inside its header")


def check_jpeg(data: bytes, width: int, height: int, max_side: int) -> None:
    """Cheap structural checks before any decode: magic, end marker, size limits, size match.

    Parsing the header first stops decompression bombs (a tiny file claiming 60000x60000 px)
    before any allocation; ``decode_jpeg`` then decodes the pixels, once per upload.
    """
    if not data:
        raise JpegError("image is empty")
    w, h = jpeg_dimensions(data)
    if not data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise JpegError("JPEG is truncated (no FFD9 end-of-image marker): re-send the whole file")
    if w <= 0 or h <= 0:
        raise JpegError(f"JPEG header claims an empty image ({w}x{h})")
    if w > max_side or h > max_side:
        raise JpegError(f"JPEG is {w}x{h}; the gateway accepts at most {max_side} px a side")
    if (w, h) != (width, height):
        raise JpegError(f"JPEG is {w}x{h} but metadata says {width}x{height}")


def decode_jpeg(data: bytes, width: int, height: int) -> np.ndarray:
    """The one decode of an upload: greyscale (all the gateway needs of the pixels — the
    quality — and cheaper than colour), checked against the metadata's size."""
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise JpegError("JPEG does not decode")
    h, w = grey.shape[:2]
    if (w, h) != (width, height):
        raise JpegError(f"JPEG decodes to {w}x{h} but metadata says {width}x{height}")
    return grey


def frame_quality(sent: QualityIn | None, grey: np.ndarray) -> FrameQuality:
    """The agent's own values where it sent them; only the missing ones computed from
    ``grey`` (the agent measured the frame before JPEG encoding, which shifts them a bit)."""
    values = sent.model_dump(exclude_none=True) if sent is not None else {}
    if len(values) == len(QualityIn.model_fields):
        return FrameQuality(**values)
    return FrameQuality(**{**compute_quality(grey).model_dump(), **values})


def validation_message(exc: ValidationError, prefix: str) -> str:
    """One line naming each bad field: ``metadata is invalid: frame_id: Field required``."""
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (+{len(exc.errors()) - 8} more)" if len(exc.errors()) > 8 else ""
    return f"{prefix}: " + "; ".join(parts) + more


def parse_metadata(text: str) -> FrameMetadata:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise HTTPException(422, "metadata must be a JSON object")
    try:
        return FrameMetadata.model_validate(raw)
    except ValidationError as exc:
        raise HTTPException(422, validation_message(exc, "metadata is invalid")) from exc


# --------------------------------------------------------------------------- storing
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
    key = f"{meta.camera_id}/{meta.frame_id}"
    # No "already stored?" query first: a replay costs one stat in write_frame (a no-op
    # for a frame already there) and ends as an IntegrityError -> 409 on insert, so the
    # common path saves a database round trip.
    with gw.key_lock(key):
        try:
            with stats.span("jpeg_check"):
                check_jpeg(image, meta.width, meta.height, gw.settings.max_image_side)
            with stats.span("decode"):
                grey = decode_jpeg(image, meta.width, meta.height)
        except JpegError as exc:
            raise HTTPException(422, f"frame {meta.frame_id}: {exc}") from exc
        with stats.span("quality"):
            quality = frame_quality(meta.quality, grey)
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
        )
        try:
            with stats.span("write_frame"):
                written = gw.store.write_frame(record, image, image=grey)
            if gw.settings.fsync_directories and not written.already_existed:
                with stats.span("fsync_dir"):
                    fsync_dir(written.path.parent)
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
                camera_id=meta.camera_id, frame_id=meta.frame_id,
                device_id=principal.device_id, captured_at=record.captured_at, received_at=now,
                path=rel, width=meta.width, height=meta.height, size_bytes=len(image),
                sha256=digest, model_version=meta.model_version, importance=meta.importance,
                reasons=meta.reasons, n_detections=len(meta.detections),
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
        form = await request.form(
            max_files=2, max_fields=4, max_part_size=gw.settings.max_metadata_bytes
        )
    try:
        image = form.get("image")
        metadata = form.get("metadata")
        if image is None or metadata is None:
            missing = [n for n, v in (("image", image), ("metadata", metadata)) if v is None]
            raise HTTPException(
                422, f"missing form field(s) {', '.join(missing)}: send multipart/form-data "
                "with 'image' (JPEG file) and 'metadata' (JSON text)"
            )
        if isinstance(metadata, UploadFile):
            metadata_text = (await metadata.read()).decode("utf-8", errors="replace")
        else:
            metadata_text = metadata
        image_bytes = await image.read() if isinstance(image, UploadFile) else image.encode()
    finally:
        await form.close()
    return await run_in_threadpool(store_frame, gw, principal, metadata_text, image_bytes)
