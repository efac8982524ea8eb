"""Frame store: where edge frames land before curation.

On-disk layout (the contract with the fleet gateway, which writes the same thing)::

    <root>/<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg    the frame, JPEG
    <root>/<camera_id>/<YYYY-MM-DD>/<frame_id>.json   its FrameRecord (pydantic JSON)

* ``YYYY-MM-DD`` is the UTC date of ``FrameRecord.captured_at``.
* ``camera_id`` and ``frame_id`` match ``[A-Za-z0-9_.-]{1,64}`` and do not start with a dot
  (so ``.``/``..`` and hidden names are impossible); a frame is identified by the pair
  ``(camera_id, frame_id)``, unique across all date folders of that camera.
* Write order: the image is written first, the sidecar last, each atomically
  (``roadloop.fsutil.write_bytes_atomic``: on Linux an unnamed file in the same folder
  linked into place once written, elsewhere a dot-prefixed temporary file
  ``.<name>.tmp-<random>`` followed by ``os.replace``).
  **A sidecar's presence means the frame is complete.** Readers only look at
  ``<frame_id>.json`` files whose ``<frame_id>.jpg`` exists; temporary files left behind
  by a crash and images without a sidecar are ignored (``FrameStore.fsck`` reports them).
* Writing a frame id that already exists is a no-op, so replays and gateway retries are
  idempotent.
* ``FrameRecord.schema_version`` is 1; readers ignore unknown fields.
* Every number in a record is finite: the models refuse NaN and ±Infinity (JSON has no
  spelling for them, so such a sidecar would not read back), and ``write_frame`` checks
  that the sidecar it is about to write reads back before writing anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
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

from edge_agent.quality import laplacian_variance  # one definition with the agent's
from roadloop.errors import InvalidInputError
from roadloop.fsutil import SyncFsHandle, fsync_dir, write_bytes_atomic

logger = logging.getLogger(__name__)

ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
FrameId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]

SCHEMA_VERSION = 1
_JPEG_MAGIC = b"\xff\xd8\xff"


def validate_id(kind: str, value: str, *, where: Path | str = ".") -> str:
    """Return ``value`` if it is a safe camera/frame id, else raise ``InvalidInputError``."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
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


# --------------------------------------------------------------------------- quality


class FrameQuality(BaseModel):
    """Cheap per-frame image statistics, computed on the edge or at ingest.

    ``brightness`` and ``sharpness`` are measured on the grey frame at its native resolution
    (an agent measures them before JPEG encoding); ``dhash`` is defined on a 9x8 thumbnail, so
    the scale it was computed from hardly matters (a 1/2 or 1/4 scaled decode gives the same
    hash within a bit).
    """

    model_config = ConfigDict(allow_inf_nan=False)

    brightness: float = Field(ge=0.0, le=255.0, description="Mean luma (grey level), 0-255.")
    sharpness: float = Field(ge=0.0, description="Variance of the Laplacian of the grey image.")
    dhash: str = Field(pattern=r"^[0-9a-f]{16}$", description="64-bit difference hash, hex.")


def _to_grey(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ValueError("image must be a non-empty numpy array")
    if image.ndim == 2:
        grey = image
    elif image.ndim == 3 and image.shape[2] == 3:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3 and image.shape[2] == 4:
        grey = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    elif image.ndim == 3 and image.shape[2] == 1:
        grey = image[:, :, 0]
    else:
        raise ValueError(f"unsupported image shape {image.shape}")
    if grey.dtype != np.uint8:
        grey = np.clip(grey, 0, 255).astype(np.uint8)
    return grey


def dhash_hex(grey: np.ndarray) -> str:
    """Difference hash: 9x8 thumbnail, one bit per horizontally adjacent pixel pair."""
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def compute_quality(image_bgr: np.ndarray) -> FrameQuality:
    """Brightness, sharpness and dhash of a BGR (or grey) uint8 image.

    Sharpness is measured at the image's native resolution, so compare it between frames
    of the same camera rather than across cameras.
    """
    grey = _to_grey(image_bgr)
    brightness = float(grey.mean())
    sharpness = laplacian_variance(grey)
    return FrameQuality(brightness=brightness, sharpness=sharpness, dhash=dhash_hex(grey))


def dhash_hamming(a: str, b: str) -> int:
    """Number of differing bits between two 16-hex-digit dhashes."""
    for h in (a, b):
        if len(h) != 16:
            raise ValueError(f"dhash must be 16 hex digits, got {h!r}")
    return (int(a, 16) ^ int(b, 16)).bit_count()


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
    ).startswith(_JPEG_MAGIC):
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
    sidecar = record.model_dump_json(indent=2).encode()
    try:  # never write a sidecar the readers below would skip
        FrameRecord.model_validate_json(sidecar)
    except ValidationError as exc:
        raise InvalidInputError(
            target, f"{label}: its record does not read back ({_first_error(exc)})"
        ) from exc
    return sidecar


def frame_sidecar(record: FrameRecord) -> bytes | None:
    """The sidecar bytes the stores write for ``record``, or None when they would not read
    back as the same data. Compared as JSON: a record built from an upload's bounded model
    types (subclasses) reads back as the plain ones, and equal JSON is equal data. The
    gateway makes a frame's sidecar here once, before it writes anything, and hands the
    bytes to ``write_frame``."""
    sidecar = record.model_dump_json(indent=2).encode()
    try:
        back = FrameRecord.model_validate_json(sidecar)
    except (ValidationError, ValueError):
        return None
    return sidecar if back.model_dump_json(indent=2).encode() == sidecar else None


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


# --------------------------------------------------------------------------- store


def in_window(record: FrameRecord, start: datetime | None, end: datetime | None) -> bool:
    """``start <= record.captured_at < end`` (a missing bound does not limit)."""
    return ((start is None or record.captured_at >= start)
            and (end is None or record.captured_at < end))


def date_folder(captured_at: datetime) -> str:
    """The date folder a frame captured at ``captured_at`` is stored under (UTC day), in
    either store: ``YYYY-MM-DD`` (``date.isoformat``, which pads the year to 4 digits as
    ``is_date_folder`` expects; it costs a twentieth of ``strftime``'s 10 µs)."""
    return captured_at.astimezone(UTC).date().isoformat()


def _image_problem(image: Path) -> str | None:
    """Why ``image`` is no frame's pixels (lstat only: no read), or None. A symlink is
    refused as well as a missing or empty file: the store writes none, and one planted in
    it would hand a file from anywhere to every reader (training, review, uploads)."""
    try:
        st = os.lstat(image)
    except OSError:
        return "is missing"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (the store writes none)"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty"
    return None


def jpeg_ends_problem(image: Path) -> str | None:
    """Why ``image`` is not a whole JPEG by its ends (no decode), or None: another format
    renamed ``.jpg`` (no start-of-image marker) or a file cut short (no end-of-image marker
    in its last KB: some cameras pad after it, so it need not be the very last bytes)."""
    try:
        with open(image, "rb") as fh:
            head = fh.read(3)
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 1024))
            tail = fh.read(1024)
    except OSError as exc:
        return f"does not read ({exc.strerror})"
    if head != _JPEG_MAGIC:
        return "is not a JPEG"
    if b"\xff\xd9" not in tail:
        return "is cut short (no JPEG end-of-image marker)"
    return None


def _date_folders(camera_dir: Path) -> list[Path]:
    """The camera folder's date folders, sorted (``is_date_folder``); others are skipped."""
    days = []
    for p in camera_dir.iterdir():
        if is_date_folder(p.name) and p.is_dir():
            days.append(p)
        elif not p.name.startswith("."):
            logger.debug("skipping %s: not a date folder", p)
    return sorted(days)


def _regular_file_at(dir_fd: int, relative: str) -> bool:
    """``os.path.isfile`` of ``relative`` under the open folder ``dir_fd``."""
    try:
        return stat.S_ISREG(os.stat(relative, dir_fd=dir_fd).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


class FrameStore:
    """Camera frames on a local (or mounted) file system; see the module docstring."""

    is_local = True

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._unsynced: set[str] = set()  # written with durable=False, not yet synced
        self._unsynced_lock = threading.Lock()
        # Opened before the first non-durable write, so that sync() hears of a write-back
        # error on any of those files, also one from the kernel's own background flush.
        self._syncfs = SyncFsHandle(self.root)

    def image_path(self, relative: str, *, sha256: str | None = None) -> Path:
        """The image at ``relative`` (a ``frames.path`` value) as a local file (``sha256``
        is for the object store's cache: this folder is the store, nothing to check)."""
        return self.root / relative

    # ---- paths
    def _camera_dir(self, camera_id: str) -> Path:
        validate_id("camera_id", camera_id, where=self.root)
        return self.root / camera_id

    def frame_path(self, record: FrameRecord) -> Path:
        """Where ``record``'s image goes (its sidecar is the same path with ``.json``)."""
        return self._path_of(record.camera_id, record.frame_id, record.captured_at)

    def _path_of(self, camera_id: str, frame_id: str, captured_at: datetime) -> Path:
        return Path(self._image_at(camera_id, frame_id, captured_at))

    def _image_at(self, camera_id: str, frame_id: str, captured_at: datetime) -> str:
        """The image's path as a ``str`` (ids validated): ``write_frame`` runs once per
        upload, and building ``Path`` objects there cost more than its system calls (the
        gateway's profile at load)."""
        validate_id("camera_id", camera_id, where=self.root)
        validate_id("frame_id", frame_id, where=self.root)
        return os.path.join(self.root, camera_id, date_folder(captured_at), f"{frame_id}.jpg")

    def find_frame(self, camera_id: str, frame_id: str) -> Path | None:
        """Image path of a complete frame (sidecar + image present), in any date folder."""
        cam = self._camera_dir(camera_id)
        validate_id("frame_id", frame_id, where=cam)
        # The gateway calls this once per upload, and a new frame is looked for in every date
        # folder: under the default 30-day retention, 30 of them. Built with pathlib (a Path
        # and a full path walk per folder) that took 234 µs an upload at 30 folders against
        # 15 µs at one; with the camera folder opened once and each sidecar a stat relative
        # to it, 58 and 10 µs (benchmarks/results/find-frame-lookup/). scandir, not
        # Path.glob, whose pattern machinery once cost ~10 % of a stored frame's CPU.
        sidecar_name = f"{frame_id}.json"
        try:
            fd = os.open(cam, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            with os.scandir(fd) as entries:
                days = sorted(e.name for e in entries if is_date_folder(e.name) and e.is_dir())
            for day in days:
                if (_regular_file_at(fd, f"{day}/{sidecar_name}")
                        and _regular_file_at(fd, f"{day}/{frame_id}.jpg")):
                    return cam / day / f"{frame_id}.jpg"
        finally:
            os.close(fd)
        return None

    @staticmethod
    def is_complete(image_path: Path | str) -> bool:
        """A complete frame is at ``image_path``: its sidecar and its image are files."""
        sidecar = f"{os.path.splitext(image_path)[0]}.json"
        return os.path.isfile(sidecar) and os.path.isfile(image_path)

    # ---- writing
    def write_frame(
        self,
        record: FrameRecord,
        jpeg_bytes: bytes,
        *,
        decoded_size: tuple[int, int] | None = None,
        durable: bool = True,
        look_in_other_days: bool = True,
        sidecar: bytes | None = None,
    ) -> FrameWrite:
        """Store one frame atomically; a frame id already in the store is left untouched.

        ``look_in_other_days=False`` looks for the frame id in the record's own date folder
        only (two stats, instead of ``find_frame``'s one per date folder of the camera: 30
        under the default retention). For a caller with its own authority on frame ids: the
        gateway's database refuses an id stored under another day (409) and the gateway then
        removes the copy this wrote (``fleet.intake``), as it does on the object store, whose
        ``write_frame`` always looks in the record's own folder only.

        ``durable=True`` fsyncs each file before its rename (the caller fsyncs the folder);
        ``durable=False`` only renames, and the frame is durable after the next ``sync()``
        (one barrier for many frames: the gateway's group commit calls it once per batch).

        Raises ``InvalidInputError`` (naming the frame) when the bytes are not a decodable
        JPEG, its size differs from ``record.width`` x ``record.height``, or the sidecar would
        not read back. A caller that has already decoded ``jpeg_bytes`` (the gateway, at reduced
        scale) passes the full ``(width, height)`` it verified as ``decoded_size``; the bytes
        are then not decoded again. ``sidecar``: the record's sidecar bytes when the caller has
        made them and checked that they read back (``frame_sidecar``; the gateway does, before
        it writes anything); otherwise they are made and checked here.
        """
        image = self._image_at(record.camera_id, record.frame_id, record.captured_at)
        folder = os.path.dirname(image)
        sidecar_path = f"{os.path.splitext(image)[0]}.json"
        if look_in_other_days:
            existing = self.find_frame(record.camera_id, record.frame_id)
        else:
            existing = Path(image) if self.is_complete(image) else None
        if existing is not None:
            logger.debug("frame %s/%s already stored", record.camera_id, record.frame_id)
            return FrameWrite(existing, True)

        data = checked_sidecar(record, jpeg_bytes, decoded_size, where=image, sidecar=sidecar)
        if not durable:
            try:
                self._syncfs.arm()
            except FileNotFoundError:  # the store's first frame: its root does not exist yet
                os.makedirs(folder, exist_ok=True)
                self._syncfs.arm()
        write_bytes_atomic(image, bytes(jpeg_bytes), parents=True, durable=durable)
        # Sidecar last: its presence marks the frame complete.
        write_bytes_atomic(sidecar_path, data, durable=durable)
        if not durable:
            with self._unsynced_lock:
                self._unsynced.update((image, sidecar_path, folder, os.path.dirname(folder)))
        return FrameWrite(Path(image), False)

    def sync(self) -> None:
        """Make every frame written with ``durable=False`` so far durable: ``syncfs(2)`` of
        the store's file system on Linux (one call, however many frames), else an fsync of
        each file and folder written since the last sync. Raises ``OSError`` on failure
        (then nothing written since the last successful sync may be acknowledged)."""
        with self._unsynced_lock:
            pending, self._unsynced = self._unsynced, set()
        if not pending:
            return
        try:
            if self._syncfs.sync():
                return
            # files first, then folders, deepest first
            for path in sorted(pending, key=lambda p: (os.path.isdir(p), -p.count(os.sep))):
                fsync_dir(Path(path))  # an fsync of the path: files and folders alike
        except OSError:
            with self._unsynced_lock:  # still not durable: the next sync tries again
                self._unsynced.update(pending)
            raise

    def remove_frame(self, image_path: Path) -> None:
        """Delete one frame: sidecar first (the frame stops being complete), then the image."""
        image_path.with_suffix(".json").unlink(missing_ok=True)
        image_path.unlink(missing_ok=True)

    # ---- reading
    def cameras(self) -> list[str]:
        """Camera ids with a folder in the store (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _ID_RE.fullmatch(p.name)
        )

    def _sidecars(self, camera_id: str) -> Iterator[Path]:
        cam = self._camera_dir(camera_id)
        if not cam.is_dir():
            return
        for day in _date_folders(cam):
            for sidecar in sorted(day.glob("*.json")):
                if _ID_RE.fullmatch(sidecar.stem):
                    yield sidecar

    def read_record(self, camera_id: str, frame_id: str, *,
                    captured_at: datetime | None = None) -> FrameRecord | None:
        """The record of one complete frame as every reader here sees it (``iter_frames``,
        ``fsck``); ``None`` when the frame is absent or its sidecar does not read back.
        With ``captured_at``, only that time's date folder is looked in (the gateway's
        read-back of a frame it wrote or found there: a cost that does not grow with the
        date folders an agent's capture times have made)."""
        if captured_at is None:
            image = self.find_frame(camera_id, frame_id)
        else:
            image = self._path_of(camera_id, frame_id, captured_at)
            if not self.is_complete(image):
                return None
        if image is None:
            return None
        return self._load(image.with_suffix(".json"), camera_id)

    def _load(self, sidecar: Path, camera_id: str) -> FrameRecord | None:
        """Parse one sidecar; ``None`` (and a warning) when it is unusable."""
        try:
            data = sidecar.read_bytes()
        except OSError as exc:
            logger.warning("skipping corrupt frame sidecar %s: %s", sidecar, str(exc)[:200])
            return None
        return parse_sidecar(data, camera_id, sidecar.stem, where=sidecar)

    def iter_frames(
        self,
        camera_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> Iterator[tuple[FrameRecord, Path]]:
        """Complete frames of one camera in ``captured_at`` order, optionally ``start <= t < end``.

        Corrupt sidecars and sidecars without an image are skipped with a warning.
        """
        items: list[tuple[FrameRecord, Path]] = []
        for sidecar in self._sidecars(camera_id):
            image = sidecar.with_suffix(".jpg")
            problem = _image_problem(image)
            if problem is not None:
                logger.warning("skipping frame sidecar %s: its image %s", sidecar, problem)
                continue
            record = self._load(sidecar, camera_id)
            if record is None:
                continue
            if in_window(record, start, end):
                items.append((record, image))
        items.sort(key=lambda it: (it[0].captured_at, it[0].frame_id))
        yield from items

    def count(self, camera_id: str) -> int:
        """Number of complete, readable frames of one camera."""
        return sum(1 for _ in self.iter_frames(camera_id))

    def stored_frames(self, camera_id: str, *, start: datetime | None = None,
                      end: datetime | None = None) -> list[StoredFrame]:
        """Every frame of one camera in the date folders that overlap ``[start, end)``, with
        its record (None: unreadable, as ``fsck`` reports it) and the bytes it takes, in
        (date folder, frame id) order; no image is read (an ``lstat`` each). What deleting
        needs: the caller picks the readable frames by ``captured_at`` (``in_window``)."""
        cam = self._camera_dir(camera_id)
        if not cam.is_dir():
            return []
        out: list[StoredFrame] = []
        for day in _date_folders(cam):
            if not day_overlaps(day.name, start, end):
                continue
            stems = sorted({p.stem for p in day.iterdir()
                            if p.suffix in (".jpg", ".json") and not p.name.startswith(".")})
            for stem in stems:
                image, sidecar = day / f"{stem}.jpg", day / f"{stem}.json"
                record = (self._load(sidecar, camera_id)
                          if _ID_RE.fullmatch(stem) and sidecar.is_file()
                          and _image_problem(image) is None else None)
                size, mtime = 0, None
                for path in (image, sidecar):
                    try:
                        st = os.lstat(path)
                    except OSError:
                        continue
                    size += 0 if stat.S_ISDIR(st.st_mode) else st.st_size
                    mtime = st.st_mtime if mtime is None else max(mtime, st.st_mtime)
                modified = None if mtime is None else datetime.fromtimestamp(mtime, UTC)
                out.append(StoredFrame(camera_id, stem, day.name, image, size, record,
                                       modified))
        return out

    def day_sizes(self, camera_id: str, day: str) -> dict[str, int]:
        """``{frame_id: bytes}`` (image + record, a symbolic link's own size) of the files in
        one date folder of one camera: sizes only, no record read (an ``lstat`` each)."""
        folder = self._camera_dir(camera_id) / day
        if not is_date_folder(day):
            return {}
        sizes: dict[str, int] = {}
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return sizes
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or ext not in ("jpg", "json") or entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                sizes[stem] = sizes.get(stem, 0) + st.st_size
        return sizes

    def fsck(self, camera_id: str | None = None) -> FsckReport:
        """Report incomplete or unreadable entries (changes nothing)."""
        report = FsckReport()
        for cam in [camera_id] if camera_id is not None else self.cameras():
            cam_dir = self._camera_dir(cam)
            if not cam_dir.is_dir():
                continue
            for day in _date_folders(cam_dir):
                for path in sorted(day.iterdir()):
                    if path.name.startswith("."):
                        if ".tmp-" in path.name:
                            report.temp_files.append(path)
                        continue
                    if path.suffix == ".jpg" and not path.with_suffix(".json").is_file():
                        report.orphan_images.append(path)
                    elif path.suffix == ".json":
                        image = path.with_suffix(".jpg")
                        if not image.is_file() and not image.is_symlink():
                            report.sidecars_without_image.append(path)
                        elif _image_problem(image) is not None:
                            report.bad_images.append(path)
                        elif self._load(path, cam) is None:
                            report.corrupt_sidecars.append(path)
                        else:
                            report.frames_ok += 1
        return report


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
    return f"{loc}: {err.get('msg', 'invalid')}"


# --------------------------------------------------------------------------- curation


class DedupePolicy(BaseModel):
    """When a sampled frame counts as a near-duplicate of one already kept.

    A traffic camera's view hardly changes: a whole-frame dhash of a static street stays
    within a few bits while different vehicles pass (``window_street``: 20 of 24 frames
    sampled every 2 s lie within 4 bits of its first). So a frame is a near-duplicate only
    when all hold: its dhash is within ``max_hamming`` bits of a kept frame of the same
    camera, that frame was captured at most ``max_age_s`` earlier (``None``: any time), and
    both saw the same objects (equal per-class detection counts; frames without detections,
    e.g. replays, compare equal). ``per_camera_max_hamming`` overrides the bit threshold
    per camera (0 keeps all but exact copies).
    """

    max_hamming: int = Field(default=4, ge=0, le=64)
    max_age_s: float | None = Field(default=600.0, gt=0)
    same_detections: bool = True
    per_camera_max_hamming: dict[str, Annotated[int, Field(ge=0, le=64)]] = Field(
        default_factory=dict)  # a dhash has 64 bits, as max_hamming

    def threshold(self, camera_id: str) -> int:
        return self.per_camera_max_hamming.get(camera_id, self.max_hamming)


def _detection_signature(rec: FrameRecord) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(Counter(d.class_name for d in rec.detections).items()))


def dedupe_near_duplicates(
    records: Sequence[FrameRecord],
    max_hamming: int = 4,
    window: int | None = None,
    policy: DedupePolicy | None = None,
) -> tuple[list[FrameRecord], list[FrameRecord]]:
    """Split ``records`` into (kept, dropped): near-duplicates of an earlier kept frame drop.

    Per camera, in ``captured_at`` order, a frame is dropped when it is a near-duplicate
    (see :class:`DedupePolicy`; without one, dhash within ``max_hamming`` bits of any kept
    frame, detections ignored) of one of the last ``window`` kept frames (all of them when
    ``window`` is None). Frames without a quality record are always kept. Both lists come
    back in time order.
    """
    if policy is None:
        policy = DedupePolicy(max_hamming=max_hamming, max_age_s=None, same_detections=False)
    ordered = sorted(records, key=lambda r: (r.captured_at, r.camera_id, r.frame_id))
    kept_by_camera: dict[str, list[tuple[int, datetime, tuple]]] = {}
    kept: list[FrameRecord] = []
    dropped: list[FrameRecord] = []
    for rec in ordered:
        if rec.quality is None:
            kept.append(rec)
            continue
        h = int(rec.quality.dhash, 16)
        sig = _detection_signature(rec) if policy.same_detections else ()
        bits = policy.threshold(rec.camera_id)
        recent = kept_by_camera.setdefault(rec.camera_id, [])
        pool = recent if window is None else recent[-window:]
        duplicate = any(
            (h ^ other_hash).bit_count() <= bits
            and (policy.max_age_s is None
                 or (rec.captured_at - other_at).total_seconds() <= policy.max_age_s)
            and other_sig == sig
            for other_hash, other_at, other_sig in pool
        )
        if duplicate:
            dropped.append(rec)
        else:
            kept.append(rec)
            recent.append((h, rec.captured_at, sig))
    return kept, dropped


class PartitionSummary(BaseModel):
    """What one camera partition of sampled frames holds (for asset metadata)."""

    frames: int
    cameras: list[str]
    per_reason: dict[str, int]
    duplicates_dropped: int
    mean_brightness: float | None
    mean_sharpness: float | None
    first_captured_at: datetime | None
    last_captured_at: datetime | None

    def to_markdown(self) -> str:
        rows = [
            "| metric | value |",
            "|---|---|",
            f"| frames | {self.frames} |",
            f"| duplicates dropped | {self.duplicates_dropped} |",
            f"| cameras | {', '.join(self.cameras) or '-'} |",
        ]
        for reason, n in sorted(self.per_reason.items()):
            rows.append(f"| reason `{reason}` | {n} |")
        if self.mean_brightness is not None:
            rows.append(f"| mean brightness | {self.mean_brightness:.1f} |")
        if self.mean_sharpness is not None:
            rows.append(f"| mean sharpness | {self.mean_sharpness:.1f} |")
        if self.first_captured_at is not None:
            rows.append(f"| first | {self.first_captured_at.isoformat()} |")
            rows.append(
                f"| last | {self.last_captured_at.isoformat() if self.last_captured_at else '-'} |"
            )
        return "\n".join(rows)


def summarize_partition(
    kept: Sequence[FrameRecord], dropped: Sequence[FrameRecord]
) -> PartitionSummary:
    """Counts and means over the kept frames; ``dropped`` only counts as duplicates."""
    reasons: Counter[str] = Counter()
    for rec in kept:
        reasons.update(set(rec.reasons))
    qualities = [r.quality for r in kept if r.quality is not None]
    times = [r.captured_at for r in kept]
    return PartitionSummary(
        frames=len(kept),
        cameras=sorted({r.camera_id for r in kept}),
        per_reason=dict(sorted(reasons.items())),
        duplicates_dropped=len(dropped),
        mean_brightness=float(np.mean([q.brightness for q in qualities])) if qualities else None,
        mean_sharpness=float(np.mean([q.sharpness for q in qualities])) if qualities else None,
        first_captured_at=min(times) if times else None,
        last_captured_at=max(times) if times else None,
    )
