"""The checks of one frame upload that need no storage (``fleet.intake`` runs them for
``POST /v1/frames`` and ``fleet.intake_batch`` for each frame of a batch): the camera, its
privacy mode (``unredacted_refusals``), the JPEG's header, one strict decode
(``fleet.jpeg``), the record and that its sidecar reads back. Each refusal is the
``HTTPException`` ``POST /v1/frames`` answers for that frame.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from fleet.auth import Principal
from fleet.config import GatewaySettings
from fleet.db import CameraConfigRow
from fleet.jpeg import (
    DecoderBusy,
    JpegError,
    JpegInfo,
    JpegLimits,
    check_jpeg,
    measure_quality,
)
from fleet.runtime import Gateway
from fleet.schemas import FrameMetadata
from roadloop.data.frame_quality import FrameQuality
from roadloop.data.frame_records import FrameRecord, frame_sidecar

__all__ = ["CheckedFrame", "camera_privacy_mode", "check_frames", "checked_qualities",
           "jpeg_limits", "unredacted_refusals", "validation_message"]

# A camera whose configuration has no ``privacy`` section redacts (edge_agent.camera_config,
# fleet.camera_config_schemas.PrivacyConfig): blur.
DEFAULT_PRIVACY_MODE = "blur"


def validation_message(exc: ValidationError, prefix: str) -> str:
    """One line naming each bad field: ``metadata is invalid: frame_id: Field required``."""
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (+{len(exc.errors()) - 8} more)" if len(exc.errors()) > 8 else ""
    return f"{prefix}: " + "; ".join(parts) + more


def jpeg_limits(settings: GatewaySettings) -> JpegLimits:
    return JpegLimits(
        max_side=settings.max_image_side,
        max_pixels=settings.max_image_pixels,
        max_scans=settings.max_jpeg_scans,
        max_metadata_bytes=settings.max_jpeg_metadata_bytes,
    )


def checked_qualities(
    gw: Gateway, jobs: list[tuple[FrameMetadata, bytes]]
) -> list[tuple[JpegInfo, FrameQuality] | HTTPException]:
    """Per frame: structure and limits from the header (no decode), then one strict, reduced
    decode — all of them in ONE of ``max_concurrent_decodes`` slots, one after the other (a
    batch costs one hand-over to a decode thread, not one per frame), waited for at most
    ``decode_wait_s`` (503 with ``Retry-After`` after that: not acknowledged); the quality the
    agent sent, completed from that decode. A refusal is returned, not raised."""
    settings = gw.settings
    out: list[tuple[JpegInfo, FrameQuality] | HTTPException | None] = [None] * len(jobs)
    todo: list[tuple[int, bytes, JpegInfo, dict[str, Any]]] = []
    for i, (meta, image) in enumerate(jobs):
        try:
            with gw.stats.span("jpeg_check"):
                info = check_jpeg(image, meta.width, meta.height, settings.max_image_side,
                                  jpeg_limits(settings))
        except JpegError as exc:
            out[i] = _bad_jpeg(gw, meta, exc)
            continue
        sent = meta.quality.model_dump(exclude_none=True) if meta.quality is not None else {}
        todo.append((i, image, info, sent))

    def decode_all() -> list[FrameQuality | JpegError]:
        results: list[FrameQuality | JpegError] = []
        for _, image, info, sent in todo:
            try:
                results.append(measure_quality(image, info, sent,
                                               settings.quality_decode_max_pixels,
                                               settings.jpeg_decode == "dc"))
            except JpegError as exc:
                results.append(exc)
        return results

    try:
        with gw.stats.span("decode"):
            decoded = gw.decoders.run(settings.decode_wait_s, decode_all) if todo else []
    except DecoderBusy as exc:
        gw.stats.count("decode_busy", len(todo))
        retry_after = max(1, math.ceil(settings.decode_wait_s))
        decoded = [HTTPException(
            503, f"gateway is busy decoding other frames ({exc}); retry after {retry_after} s "
            "— the frame is not acknowledged", headers={"Retry-After": str(retry_after)},
        )] * len(todo)
    for (i, _, info, _), result in zip(todo, decoded, strict=True):
        if isinstance(result, JpegError):
            out[i] = _bad_jpeg(gw, jobs[i][0], result)
        else:
            out[i] = result if isinstance(result, HTTPException) else (info, result)
    return [r for r in out if r is not None]


def _bad_jpeg(gw: Gateway, meta: FrameMetadata, exc: JpegError) -> HTTPException:
    gw.stats.count("frames_bad_jpeg")
    return HTTPException(422, f"frame {meta.frame_id}: {exc}")


@dataclass(frozen=True)
class CheckedFrame:
    """One upload that passed every check that needs no storage: what ``store_frames``
    writes."""

    meta: FrameMetadata
    record: FrameRecord
    info: JpegInfo
    image: bytes
    sidecar: bytes  # the record's sidecar, checked to read back (frame_sidecar)

    @property
    def key(self) -> str:
        return f"{self.meta.camera_id}/{self.meta.frame_id}"


def camera_privacy_mode(gw: Gateway, camera_id: str) -> str:
    """The redaction mode the camera's current configuration asks for: its
    ``privacy.mode``, else ``blur`` (no section, or no configuration at all: the agent's
    default)."""
    with gw.db.read() as session:
        row = session.get(CameraConfigRow, camera_id)
        document = row.document if row is not None else {}
    privacy = document.get("privacy") if isinstance(document, dict) else None
    mode = privacy.get("mode") if isinstance(privacy, dict) else None
    return mode if isinstance(mode, str) and mode else DEFAULT_PRIVACY_MODE


def unredacted_refusals(gw: Gateway, frames: list[tuple[FrameMetadata, bytes]]
                        ) -> dict[int, HTTPException]:
    """The frames (by index) that state no redaction (``redaction`` null, or method
    ``off``) of a camera whose configuration requires it (privacy mode other than ``off``):
    each a 422, so unredacted pixels are never stored for such a camera. A frame redacted
    with the other method (blur for mask) is redacted all the same and passes. The camera's
    configuration is read only when a frame states no redaction (agents redact: no query)."""
    out: dict[int, HTTPException] = {}
    modes: dict[str, str] = {}
    for i, (meta, _) in enumerate(frames):
        stated = meta.redaction.method if meta.redaction is not None else None
        if stated not in (None, "off"):
            continue
        if meta.camera_id not in modes:
            try:
                modes[meta.camera_id] = camera_privacy_mode(gw, meta.camera_id)
            except SQLAlchemyError as exc:  # not acknowledged: the agent retries it
                out[i] = HTTPException(
                    503, f"frame {meta.frame_id}: the camera's privacy configuration could not "
                    f"be read ({type(exc).__name__}); retry later — the frame is not "
                    "acknowledged")
                continue
        mode = modes[meta.camera_id]
        if mode == "off":
            continue
        gw.stats.count("frames_unredacted_refused")
        out[i] = HTTPException(
            422, f"frame {meta.frame_id}: camera {meta.camera_id} requires redaction "
            f"(privacy.mode {mode}); this frame states "
            f"{'none' if stated is None else 'method off'} — nothing was stored (docs/privacy.md)")
    return out


def check_frames(gw: Gateway, principal: Principal, frames: list[tuple[FrameMetadata, bytes]]
                 ) -> list[CheckedFrame | HTTPException]:
    """Camera, privacy (``unredacted_refusals``), JPEG (``checked_qualities``) and record
    checks, per frame: what to store, or the refusal ``POST /v1/frames`` gives that frame.
    Nothing is stored yet."""
    out: list[CheckedFrame | HTTPException | None] = [None] * len(frames)
    mine = []
    for i, (meta, _) in enumerate(frames):
        if meta.camera_id != principal.camera_id:
            out[i] = HTTPException(
                403, f"metadata camera_id {meta.camera_id} is not this device's camera "
                f"({principal.camera_id}); a device posts frames of its enrolled camera only")
        else:
            mine.append(i)
    # before the decode: an unredacted frame of such a camera costs no JPEG work
    refused = unredacted_refusals(gw, [frames[i] for i in mine])
    for j, exc in refused.items():
        out[mine[j]] = exc
    mine = [i for j, i in enumerate(mine) if j not in refused]
    for i, checked in zip(mine, checked_qualities(gw, [frames[i] for i in mine]), strict=True):
        meta, image = frames[i]
        try:
            if isinstance(checked, HTTPException):
                raise checked
            out[i] = _record_checked(gw, principal, meta, image, *checked)
        except HTTPException as exc:
            out[i] = exc
    return [r for r in out if r is not None]


def _record_checked(gw: Gateway, principal: Principal, meta: FrameMetadata, image: bytes,
                    info: JpegInfo, quality: FrameQuality) -> CheckedFrame:
    try:
        record = FrameRecord(
            frame_id=meta.frame_id, camera_id=meta.camera_id, captured_at=meta.captured_at,
            reasons=meta.reasons, importance=meta.importance,
            source=f"agent:{principal.device_id}", source_ref=meta.source_ref,
            model_version=meta.model_version, detections=meta.detections,
            width=meta.width, height=meta.height, quality=quality,
            redaction=(meta.redaction.model_dump() if meta.redaction is not None else None),
            # hashed once, for the frame's row and its record
            # (roadloop.data.frame_records.checked_sidecar)
            image_sha256=hashlib.sha256(image).hexdigest(),
        )
    except ValidationError as exc:
        raise HTTPException(422, validation_message(exc, "metadata is invalid")) from exc
    # The check that matters, done in memory before anything is written: a sidecar is bytes
    # the gateway serialises itself, so reading the file back from disk (what the gateway did
    # before, ``frame_read_back``) adds a stat + read + parse per frame and only re-reads the
    # page cache it just wrote; it cannot see whether the bytes reached the disk (that is the
    # sync's job). The bytes made here are the ones written (``write_frame(sidecar=...)``).
    # Measured in benchmarks/results/intake_parsing.md.
    with gw.stats.span("read_back"):
        sidecar = frame_sidecar(record)
    if sidecar is None:
        gw.stats.count("frames_unreadable_refused")
        raise HTTPException(
            422, f"frame {record.frame_id}: its record does not read back from the frame "
            "store as written; nothing was stored"
        )
    return CheckedFrame(meta, record, info, image, sidecar)
