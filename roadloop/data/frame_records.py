"""What every frame store shares: ids, the per-frame record and its sidecar, date folders,
and the interface both stores implement (``FrameStorage``).

The layout itself, and the local folder store, are in ``roadloop.data.frames``; the
S3-compatible store is ``roadloop.data.object_frames``. A frame's sidecar is its
``FrameRecord`` as pydantic JSON; ``checked_sidecar`` and ``frame_sidecar`` make the bytes a
store writes, after checking that they read back.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, NamedTuple, Protocol

import cv2
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from roadloop.data.frame_quality import FrameQuality
from roadloop.errors import InvalidInputError

logger = logging.getLogger(__name__)

ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"
ID_RE = re.compile(ID_PATTERN)
FrameId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]

SCHEMA_VERSION = 1
JPEG_MAGIC = b"\xff\xd8\xff"


def validate_id(kind: str, value: str, *, where: Path | str = ".") -> str:
    """Return ``value`` if it is a safe camera/frame id, else raise ``InvalidInputError``."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidInputError(
            where,
            f"invalid {kind} {value!r}: must match [A-Za-z0-9_.-]{{1,64}} and not start with '.'",
        )
    return value


def safe_id(text: str, max_len: int = 64) -> str:
    """Map arbitrary text onto a valid id (disallowed characters become ``_``)."""
    out = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".") or "_"
    if len(out) > max_len:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
        out = f"{out[: max_len - 11]}-{digest}"
    return out


# --------------------------------------------------------------------------- records


class Detection(BaseModel):
    """One box predicted on the edge (pixel coordinates of the stored frame)."""

    model_config = ConfigDict(allow_inf_nan=False)

    class_id: int = Field(ge=0)
    class_name: str
    confidence: float = Field(ge=0.0, le=1.0)
    xyxy: tuple[float, float, float, float]

    @field_validator("xyxy")
    @classmethod
    def _ordered(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = v
        if x2 < x1 or y2 < y1:
            raise ValueError(f"xyxy must have x2>=x1 and y2>=y1, got {v}")
        return v


class FrameRedaction(BaseModel):
    """What the edge agent removed from the pixels before the frame left it
    (``edge_agent.redaction``): the method, the redactor's version, regions per kind and
    the share of the image covered. Kept in the sidecar for privacy audits."""

    model_config = ConfigDict(allow_inf_nan=False)

    method: str
    version: str = ""
    counts: dict[str, int] = Field(default_factory=dict)
    area_share: float = Field(default=0.0, ge=0.0, le=1.0)


class FrameRecord(BaseModel):
    """The sidecar of one stored frame: where it came from and why it was kept."""

    model_config = ConfigDict(allow_inf_nan=False)

    frame_id: FrameId
    camera_id: FrameId
    captured_at: datetime = Field(description="Capture time, timezone-aware, stored in UTC.")
    reasons: list[str] = Field(
        default_factory=list,
        description='Why the frame was sampled: "base_rate", "low_confidence", "rare_class", '
        '"crowded", "replay", ...',
    )
    importance: float = Field(default=1.0, ge=0.0)
    source: str = Field(description='e.g. "replay:atl_v2", "video:cctv_street", "agent".')
    source_ref: str | None = Field(
        default=None, description="Origin of the pixels (provenance, leakage checks)."
    )
    labels_ref: str | None = Field(
        default=None, description="Ground-truth YOLO label file, when the frame has one."
    )
    model_version: str | None = None
    detections: list[Detection] = Field(default_factory=list)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    quality: FrameQuality | None = None
    redaction: FrameRedaction | None = Field(
        default=None, description="What the edge redacted (None: not stated by the source).")
    image_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the image's bytes, stated by the store that wrote them "
        "(``checked_sidecar``; None in sidecars written before stores stated it). An object "
        "store's reader checks its cached copy of the image against it instead of asking "
        "the store.")
    schema_version: int = SCHEMA_VERSION

    @field_validator("captured_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("captured_at must be timezone-aware")
        return v.astimezone(UTC)


class FrameWrite(NamedTuple):
    """Result of ``FrameStore.write_frame``: the image path and whether it was already there."""

    path: Path
    already_existed: bool


class FsckReport(BaseModel):
    """What ``FrameStore.fsck`` found. Readers skip everything except ``frames_ok``."""

    frames_ok: int = 0
    orphan_images: list[Path] = Field(default_factory=list)
    corrupt_sidecars: list[Path] = Field(default_factory=list)
    sidecars_without_image: list[Path] = Field(default_factory=list)
    # sidecars whose image is a symbolic link or an empty file (``_image_problem``)
    bad_images: list[Path] = Field(default_factory=list)
    temp_files: list[Path] = Field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.orphan_images
            or self.corrupt_sidecars
            or self.sidecars_without_image
            or self.bad_images
            or self.temp_files
        )


# How long the two writes of one frame (its image, then its record) can be apart: each is one
# request to the store, and the gateway bounds a request to a stalled object store at ~7 s
# (roadloop.data.object_frames, S3Timeouts); a local file takes microseconds. An image without
# its record written less than this ago may be an upload in flight, not a leftover
# (roadloop.retention.leftovers, S3FrameStore._put_image). Ten minutes is ~80 times the
# bound, and short enough that the next retention or erasure run takes a real leftover.
IN_FLIGHT_GRACE = timedelta(minutes=10)


class StoredFrame(NamedTuple):
    """One frame as a store lists it (``FrameStorage.stored_frames``), its image unread."""

    camera_id: str
    frame_id: str  # the file stem
    day: str  # its date folder (``date_folder``)
    # The image: the file in a folder store; the cache path (``root/<key>``, which may not
    # exist) on the object store. ``remove_frame`` takes it in either store.
    image: Path
    size_bytes: int  # what the store holds for it: image + record (a symbolic link's own size)
    # None: no reader sees it as a frame (what ``fsck`` reports: an image without its
    # record, a record without its image, one that does not parse or names another frame, an
    # image that is a symbolic link or empty)
    record: FrameRecord | None
    # The latest write of its image or record, by the store's clock (file mtime, the object's
    # LastModified); None where the store did not say. What tells an upload in flight (its
    # image written, its record not yet) from a leftover (``roadloop.retention.leftovers``).
    modified: datetime | None = None


def day_start(day: str) -> datetime | None:
    """UTC midnight of the date folder ``day`` (``YYYY-MM-DD``); None when it names no date."""
    try:
        return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None


_DAY_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def is_date_folder(name: str) -> bool:
    """Whether ``name`` is a date folder's (``YYYY-MM-DD``, a real date): the only folders
    ``write_frame`` makes under a camera (``date_folder``). Every reader of both stores skips
    the others (``misc``, ``backup``, ``2026-13-45``): nothing in them is a frame of the
    store, and a frame read from there would not be found again by its capture time."""
    if not _DAY_RE.fullmatch(name):
        return False
    try:
        date.fromisoformat(name)  # C, not strptime: find_frame asks once per date folder
    except ValueError:
        return False
    return True


def day_overlaps(day: str, start: datetime | None, end: datetime | None) -> bool:
    """Whether the UTC date folder ``day`` (``YYYY-MM-DD``) overlaps ``[start, end)`` (a
    missing bound does not limit; a folder name that is no date: True, its records tell)."""
    first = day_start(day)
    if first is None:
        return True
    return ((start is None or first + timedelta(days=1) > start)
            and (end is None or first < end))


def checked_sidecar(
    record: FrameRecord,
    jpeg_bytes: bytes,
    decoded_size: tuple[int, int] | None,
    *,
    where: Path | str,
    sidecar: bytes | None = None,
) -> bytes:
    """The sidecar bytes of a frame a store is about to write, after the checks every store
    makes: the payload is a JPEG of the record's size and the sidecar reads back. Raises
    ``InvalidInputError`` naming the frame. ``sidecar``: bytes the caller made with
    ``frame_sidecar`` (checked to read back already), returned after the payload checks; the
    record must then state its image's hash.

    The sidecar states the image's SHA-256 (``FrameRecord.image_sha256``): computed here,
    unless the record states it already — the gateway hashes each upload once, for its row
    and its record, and vouches for the value (a wrong one would only make an object store's
    readers download the image instead of using their cached copy)."""
    target = where
    label = f"frame {record.camera_id}/{record.frame_id}"
    if not isinstance(jpeg_bytes, (bytes, bytearray, memoryview)) or not bytes(
        jpeg_bytes[:3]
    ).startswith(JPEG_MAGIC):
        raise InvalidInputError(target, f"{label}: payload is not a JPEG")
    if decoded_size is not None:
        w, h = decoded_size
    else:
        image = cv2.imdecode(np.frombuffer(jpeg_bytes, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise InvalidInputError(target, f"{label}: JPEG does not decode")
        h, w = image.shape[:2]
    if (w, h) != (record.width, record.height):
        raise InvalidInputError(
            target,
            f"{label}: JPEG is {w}x{h} but the record says {record.width}x{record.height}",
        )
    if sidecar is not None:
        if record.image_sha256 is None:
            raise ValueError(f"{label}: a sidecar made by the caller must state the image's "
                             "hash (frame_sidecar of a record with image_sha256)")
        return sidecar
    if record.image_sha256 is None:
        record = record.model_copy(
            update={"image_sha256": hashlib.sha256(jpeg_bytes).hexdigest()})
    sidecar, problem = _sidecar_and_problem(record)
    if problem is not None:  # never write a sidecar the readers would skip or read otherwise
        raise InvalidInputError(target, f"{label}: its record does not read back ({problem})")
    return sidecar


def frame_sidecar(record: FrameRecord) -> bytes | None:
    """The sidecar bytes the stores write for ``record``, or None when they would not read
    back as the same data. Compared as JSON: a record built from an upload's bounded model
    types (subclasses) reads back as the plain ones, and equal JSON is equal data. The
    gateway makes a frame's sidecar here once, before it writes anything, and hands the
    bytes to ``write_frame``."""
    sidecar, problem = _sidecar_and_problem(record)
    return sidecar if problem is None else None


def _sidecar_and_problem(record: FrameRecord) -> tuple[bytes, str | None]:
    """``record``'s sidecar bytes and, when they do not read back as the same data, why."""
    sidecar = record.model_dump_json(indent=2).encode()
    try:
        back = FrameRecord.model_validate_json(sidecar)
    except ValidationError as exc:
        return sidecar, _first_error(exc)
    except ValueError as exc:
        return sidecar, str(exc)
    if back.model_dump_json(indent=2).encode() != sidecar:
        return sidecar, "it reads back as other data"
    return sidecar, None


def parse_sidecar(
    data: bytes, camera_id: str, frame_id: str, *, where: Path | str
) -> FrameRecord | None:
    """The record in a sidecar's bytes, as every reader sees it: ``None`` (and a warning)
    when it does not parse or describes another frame than the one it is stored as."""
    try:
        record = FrameRecord.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        logger.warning("skipping corrupt frame sidecar %s: %s", where, str(exc)[:200])
        return None
    if record.camera_id != camera_id or record.frame_id != frame_id:
        logger.warning(
            "skipping sidecar %s: it describes %s/%s", where, record.camera_id, record.frame_id
        )
        return None
    return record


class FrameStorage(Protocol):
    """What the platform and the gateway use of a frame store. Two implementations:
    ``FrameStore`` (a local or mounted folder, the embedded default) and
    ``roadloop.data.object_frames.S3FrameStore`` (S3-compatible object storage, shared by
    gateway replicas). Images come back as local paths (the object store downloads them
    into a local cache folder, ``root``); a frame's path relative to ``root`` is its
    location in either store (``<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg``)."""

    root: Path
    is_local: bool

    def frame_path(self, record: FrameRecord) -> Path: ...
    def find_frame(self, camera_id: str, frame_id: str) -> Path | None: ...
    def write_frame(self, record: FrameRecord, jpeg_bytes: bytes, *,
                    decoded_size: tuple[int, int] | None = None,
                    durable: bool = True, look_in_other_days: bool = True,
                    sidecar: bytes | None = None) -> FrameWrite: ...
    def sync(self) -> None: ...
    def remove_frame(self, image_path: Path) -> None: ...
    def image_path(self, relative: str, *, sha256: str | None = None) -> Path: ...
    def cameras(self) -> list[str]: ...
    def read_record(self, camera_id: str, frame_id: str, *,
                    captured_at: datetime | None = None) -> FrameRecord | None: ...
    def iter_frames(self, camera_id: str, *, start: datetime | None = None,
                    end: datetime | None = None) -> Iterator[tuple[FrameRecord, Path]]: ...
    def count(self, camera_id: str) -> int: ...
    def fsck(self, camera_id: str | None = None) -> FsckReport: ...
    def stored_frames(self, camera_id: str, *, start: datetime | None = None,
                      end: datetime | None = None) -> list[StoredFrame]: ...
    def day_sizes(self, camera_id: str, day: str) -> dict[str, int]: ...


def in_window(record: FrameRecord, start: datetime | None, end: datetime | None) -> bool:
    """``start <= record.captured_at < end`` (a missing bound does not limit)."""
    return ((start is None or record.captured_at >= start)
            and (end is None or record.captured_at < end))


def date_folder(captured_at: datetime) -> str:
    """The date folder a frame captured at ``captured_at`` is stored under (UTC day), in
    either store: ``YYYY-MM-DD`` (``date.isoformat``, which pads the year to 4 digits as
    ``is_date_folder`` expects; it costs a twentieth of ``strftime``'s 10 µs)."""
    return captured_at.astimezone(UTC).date().isoformat()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
    return f"{loc}: {err.get('msg', 'invalid')}"
