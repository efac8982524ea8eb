"""The frame store on S3-compatible object storage, shared by every gateway replica and the
Dagster readers (``ROADLOOP_FRAME_STORE_URL=s3://bucket/prefix``).

Same layout as the folder store (``roadloop.data.frames``), as object keys under the prefix::

    <prefix>/<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg    the frame, JPEG (PUT first)
    <prefix>/<camera_id>/<YYYY-MM-DD>/<frame_id>.json   its FrameRecord (PUT last)

* **A record's presence means the frame is complete.** A PUT is atomic (an object is
  whole or absent), the JPEG goes first and the record last, and readers only list
  records whose JPEG exists: a crash between the two PUTs leaves an invisible JPEG
  (``fsck`` reports it as an orphan image), never a half-visible frame. ``write_frame``
  returns only after both PUTs succeeded, so the gateway acknowledges nothing earlier.
* The record is PUT with ``If-None-Match: *``: of two replicas writing the same frame
  at once exactly one creates it, the other sees ``already_existed`` (the database's unique
  ``(camera_id, frame_id)`` then answers 409 to one of them).
* Unlike the folder store, ``write_frame`` looks for an existing frame in the record's own
  date folder only (one request, not one per day of the camera); the gateway's database
  refuses a frame id reused on another day, and the gateway removes the copy that replay
  wrote (``fleet.intake``).
* Images are read through a local cache folder (``root``): ``iter_frames`` and
  ``find_frame`` download a frame's JPEG there once and hand out the local path, so the
  readers written for the folder store work unchanged.

Credentials and region come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``...); the endpoint of a non-AWS server
(MinIO, Ceph, moto) from ``ROADLOOP_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from roadloop.data.frames import (
    ID_PATTERN,
    FrameRecord,
    FrameStorage,
    FrameStore,
    FrameWrite,
    FsckReport,
    checked_sidecar,
    date_folder,
    in_window,
    parse_sidecar,
    validate_id,
)
from roadloop.fsutil import write_bytes_atomic

logger = logging.getLogger(__name__)

_ID_RE = re.compile(ID_PATTERN)
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _missing(exc: Exception) -> bool:
    """True when a botocore ``ClientError`` says the object is not there."""
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


@contextmanager
def _as_os_error(what: str) -> Iterator[None]:
    """Object-store failures (network, 5xx, denied) as ``OSError``, as a disk's would be:
    the gateway answers 503 ("retry later") for both."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise OSError(errno.EIO, f"object store {what} failed: {exc}") from exc


@dataclass
class ListedFrame:
    """One frame id's objects in a listing: its JPEG and record, each with its
    ``LastModified`` (``None``: absent)."""

    frame_id: str
    image_modified: datetime | None = None
    record_modified: datetime | None = None


@dataclass
class FolderListing:
    """One ``<camera_id>/<day>/`` folder listed whole (``S3FrameStore.scan_folders``)."""

    camera_id: str
    day: str
    frames: dict[str, ListedFrame] = field(default_factory=dict)
    n_objects: int = 0
    last_key: str = ""  # relative to the prefix: where the next scan starts after

    def stem(self, frame_id: str) -> str:
        return f"{self.camera_id}/{self.day}/{frame_id}"



class S3FrameStore:
    """Camera frames in an S3 bucket under a prefix; see the module docstring."""

    is_local = False

    def __init__(self, bucket: str, prefix: str = "", *, cache_dir: Path | str,
                 client: Any = None, endpoint_url: str | None = None) -> None:
        if client is None:
            import boto3  # only deployments with an object store need it

            client = boto3.client("s3", endpoint_url=endpoint_url or None)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root = Path(cache_dir)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # ---- keys and paths
    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _relative(self, record: FrameRecord) -> str:
        validate_id("camera_id", record.camera_id, where=self.url)
        validate_id("frame_id", record.frame_id, where=self.url)
        return f"{record.camera_id}/{date_folder(record.captured_at)}/{record.frame_id}"

    def frame_path(self, record: FrameRecord) -> Path:
        """The local cache path of ``record``'s image (relative to ``root``: its key)."""
        return self.root / f"{self._relative(record)}.jpg"

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # botocore.exceptions.ClientError
            if _missing(exc):
                return False
            raise
        return True

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _missing(exc):
                return None
            raise

    def _list(self, relative_prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(relative_prefix)}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    def _days(self, camera_id: str) -> list[str]:
        validate_id("camera_id", camera_id, where=self.url)
        days = []
        for page in self._list(f"{camera_id}/", "/"):
            for cp in page.get("CommonPrefixes", []):
                day = cp["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if _DAY_RE.fullmatch(day):
                    days.append(day)
        return sorted(days)

    def _download(self, relative: str) -> Path:
        """The image at ``relative`` in the local cache (downloaded once)."""
        local = self.root / relative
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            with _as_os_error(f"read of {relative}"):
                data = self._get(self._key(relative))
            if data is None:
                raise FileNotFoundError(f"{self.url}/{relative} is not in the object store")
            write_bytes_atomic(local, data, durable=False)
        return local

    def image_path(self, relative: str) -> Path:
        """The image at ``relative`` (a ``frames.path`` value) as a local file."""
        return self._download(relative)

    # ---- writing
    def write_frame(self, record: FrameRecord, jpeg_bytes: bytes, *,
                    decoded_size: tuple[int, int] | None = None,
                    durable: bool = True, look_in_other_days: bool = True) -> FrameWrite:
        """PUT the JPEG, then the record (create-only); returns once both succeeded (a PUT
        is durable when answered, so ``durable`` changes nothing). A frame id is looked for
        in the record's own date folder only, whatever ``look_in_other_days`` says (see the
        module docstring)."""
        rel = self._relative(record)
        target = self.root / f"{rel}.jpg"
        sidecar_key = self._key(f"{rel}.json")
        with _as_os_error(f"write of {rel}"):
            if self._exists(sidecar_key):
                return FrameWrite(target, True)
            sidecar = checked_sidecar(record, jpeg_bytes, decoded_size,
                                      where=f"{self.url}/{rel}")
            self.client.put_object(Bucket=self.bucket, Key=self._key(f"{rel}.jpg"),
                                   Body=bytes(jpeg_bytes), ContentType="image/jpeg")
            try:
                self.client.put_object(Bucket=self.bucket, Key=sidecar_key, Body=sidecar,
                                       ContentType="application/json", IfNoneMatch="*")
            except Exception as exc:
                code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return FrameWrite(target, True)  # another writer created it first
                raise
        return FrameWrite(target, False)

    def sync(self) -> None:
        """Nothing to do: every PUT was durable when the store answered it."""

    def remove_frame(self, image_path: Path) -> None:
        """Delete one frame: record first (the frame stops being complete), then the JPEG."""
        rel = Path(image_path).relative_to(self.root).with_suffix("").as_posix()
        with _as_os_error(f"delete of {rel}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{rel}.json"))
            self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{rel}.jpg"))
        Path(image_path).unlink(missing_ok=True)

    # ---- reading
    def cameras(self) -> list[str]:
        """Camera ids with at least one object in the store (sorted)."""
        names = []
        for page in self._list("", "/"):
            for cp in page.get("CommonPrefixes", []):
                name = cp["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if _ID_RE.fullmatch(name):
                    names.append(name)
        return sorted(names)

    def _record(self, camera_id: str, day: str, frame_id: str) -> FrameRecord | None:
        rel = f"{camera_id}/{day}/{frame_id}"
        return self._complete(camera_id, frame_id, rel, self._get(self._key(f"{rel}.json")))

    def _complete(self, camera_id: str, frame_id: str, rel: str,
                  data: bytes | None) -> FrameRecord | None:
        """The record in ``data`` (the GET of ``rel``.json) when its JPEG exists too."""
        if data is None or not self._exists(self._key(f"{rel}.jpg")):
            return None
        return parse_sidecar(data, camera_id, frame_id, where=f"{self.url}/{rel}.json")

    def read_record(self, camera_id: str, frame_id: str, *,
                    captured_at: datetime | None = None) -> FrameRecord | None:
        """The record of one complete frame (newest date folder first: a fresh upload is
        found with one listing and one GET; with ``captured_at``, that time's date folder
        only: no listing); ``None`` when absent or unreadable."""
        validate_id("frame_id", frame_id, where=self.url)
        with _as_os_error(f"read of {camera_id}/{frame_id}"):
            if captured_at is not None:
                validate_id("camera_id", camera_id, where=self.url)
                return self._record(camera_id, date_folder(captured_at), frame_id)
            for day in reversed(self._days(camera_id)):
                rel = f"{camera_id}/{day}/{frame_id}"
                data = self._get(self._key(f"{rel}.json"))  # a GET, not a HEAD then a GET
                if data is not None:
                    return self._complete(camera_id, frame_id, rel, data)
        return None

    def find_frame(self, camera_id: str, frame_id: str) -> Path | None:
        """Local path of a complete frame's image (downloaded), in any date folder."""
        record = self.read_record(camera_id, frame_id)
        if record is None:
            return None
        return self._download(f"{self._relative(record)}.jpg")

    def _listing(self, camera_id: str, start: datetime | None = None,
                 end: datetime | None = None) -> tuple[dict[str, int], set[str]]:
        """(image relative path -> size, record relative paths) of one camera, date folders
        outside ``[start, end)`` skipped."""
        first = start.astimezone(UTC).date() if start is not None else date.min
        last = end.astimezone(UTC).date() if end is not None else date.max
        images: dict[str, int] = {}
        records: set[str] = set()
        base = len(self._key(""))
        for day in self._days(camera_id):
            if not first <= date.fromisoformat(day) <= last:
                continue
            for page in self._list(f"{camera_id}/{day}/"):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][base:]
                    stem, _, ext = rel.rpartition(".")
                    if not _ID_RE.fullmatch(stem.rsplit("/", 1)[-1]):
                        continue
                    if ext == "jpg":
                        images[stem] = int(obj["Size"])
                    elif ext == "json":
                        records.add(stem)
        return images, records

    def _records(self, camera_id: str, start: datetime | None,
                 end: datetime | None) -> list[FrameRecord]:
        images, records = self._listing(camera_id, start, end)
        items = []
        for stem in sorted(records):
            if stem not in images:
                logger.warning("skipping frame record %s/%s.json: its image is missing",
                               self.url, stem)
                continue
            data = self._get(self._key(f"{stem}.json"))
            record = None if data is None else parse_sidecar(
                data, camera_id, stem.rsplit("/", 1)[-1], where=f"{self.url}/{stem}.json")
            if record is not None and in_window(record, start, end):
                items.append(record)
        items.sort(key=lambda r: (r.captured_at, r.frame_id))
        return items

    def iter_frames(self, camera_id: str, *, start: datetime | None = None,
                    end: datetime | None = None) -> Iterator[tuple[FrameRecord, Path]]:
        """Complete frames of one camera in ``captured_at`` order, optionally
        ``start <= t < end``; each image is downloaded into the cache as it is reached."""
        for record in self._records(camera_id, start, end):
            yield record, self._download(f"{self._relative(record)}.jpg")

    def count(self, camera_id: str) -> int:
        """Number of complete, readable frames of one camera (no image is downloaded)."""
        return len(self._records(camera_id, None, None))

    def fsck(self, camera_id: str | None = None) -> FsckReport:
        """Report incomplete or unreadable frames (changes nothing); paths are cache paths
        (relative to ``root``: the object keys)."""
        report = FsckReport()
        for cam in [camera_id] if camera_id is not None else self.cameras():
            images, records = self._listing(cam)
            for stem in sorted(images.keys() - records):
                report.orphan_images.append(self.root / f"{stem}.jpg")
            for stem in sorted(records):
                path = self.root / f"{stem}.json"
                if stem not in images:
                    report.sidecars_without_image.append(path)
                    continue
                data = self._get(self._key(f"{stem}.json"))
                ok = data is not None and parse_sidecar(
                    data, cam, stem.rsplit("/", 1)[-1], where=path) is not None
                if ok:
                    report.frames_ok += 1
                else:
                    report.corrupt_sidecars.append(path)
        return report

    # ---- start-up reconcile (fleet.reconcile_objects; no database here)
    def scan_folders(self, start_after: str = "", *,
                     page_size: int = 1000) -> Iterator[FolderListing]:
        """Every date folder after the key ``start_after`` (relative), in key order, each
        listed whole (paged ``ListObjectsV2``, so a caller that stops early pays only for
        the pages it read). Keys outside the ``<camera>/<day>/<frame_id>.{jpg,json}`` layout
        are counted, not returned."""
        base = self._key("")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base,
                                  "PaginationConfig": {"PageSize": page_size}}
        if start_after:
            kwargs["StartAfter"] = self._key(start_after)
        current: FolderListing | None = None
        with _as_os_error("listing for reconcile"):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(base):]
                    parts = rel.split("/")
                    folder = (parts[0], parts[1]) if len(parts) == 3 else (rel, "")
                    if current is None or (current.camera_id, current.day) != folder:
                        if current is not None:
                            yield current
                        current = FolderListing(*folder)
                    current.n_objects += 1
                    current.last_key = rel
                    stem, _, ext = parts[-1].rpartition(".")
                    if (len(parts) != 3 or ext not in ("jpg", "json")
                            or not _ID_RE.fullmatch(parts[0]) or not _DAY_RE.fullmatch(parts[1])
                            or not _ID_RE.fullmatch(stem)):
                        continue
                    entry = current.frames.setdefault(stem, ListedFrame(stem))
                    if ext == "jpg":
                        entry.image_modified = obj["LastModified"]
                    else:
                        entry.record_modified = obj["LastModified"]
        if current is not None:
            yield current

    def load_frame(self, stem: str) -> tuple[FrameRecord, bytes] | None:
        """The record and JPEG bytes of the complete frame at ``stem``
        (``<camera>/<day>/<frame_id>``); ``None`` when either is gone or the record is
        unreadable (logged)."""
        camera_id, _, frame_id = stem.split("/")
        with _as_os_error(f"read of {stem}"):
            data = self._get(self._key(f"{stem}.json"))
            image = self._get(self._key(f"{stem}.jpg")) if data is not None else None
        if data is None or image is None:
            return None
        record = parse_sidecar(data, camera_id, frame_id, where=f"{self.url}/{stem}.json")
        return None if record is None else (record, image)

    def delete_orphan_image(self, stem: str, *, older_than: datetime) -> bool:
        """Delete the JPEG at ``stem`` if it is still there, still has no record and was
        last written before ``older_than`` (checked again right before the delete: an upload
        that started since the listing re-PUTs the JPEG, which makes it young again)."""
        key = self._key(f"{stem}.jpg")
        with _as_os_error(f"delete of {stem}"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if _missing(exc):
                    return False
                raise
            if head["LastModified"] >= older_than or self._exists(self._key(f"{stem}.json")):
                return False
            self.client.delete_object(Bucket=self.bucket, Key=key)
        return True


def open_frame_store(location: str | Path, *, cache_dir: Path | str | None = None,
                     endpoint_url: str | None = None, client: Any = None) -> FrameStorage:
    """The frame store at ``location``: ``s3://bucket[/prefix]`` gives an ``S3FrameStore``
    (images cached under ``cache_dir``), anything else a folder ``FrameStore``."""
    text = str(location)
    if not text.startswith("s3://"):
        return FrameStore(Path(text).expanduser())
    parsed = urlparse(text)
    if not parsed.netloc:
        raise ValueError(f"frame store URL {text!r} names no bucket: use s3://bucket/prefix")
    if cache_dir is None:
        raise ValueError("an object-store frame store needs a local cache_dir for images")
    return S3FrameStore(parsed.netloc, parsed.path, cache_dir=cache_dir, client=client,
                        endpoint_url=endpoint_url)
