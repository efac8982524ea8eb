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
* Both PUTs are create-only (``If-None-Match: *``): of two replicas writing the same frame
  at once exactly one creates the record, the other sees ``already_existed`` (the database's
  unique ``(camera_id, frame_id)`` then answers 409 to one of them), and **a frame's JPEG and
  record come from the same upload**: a JPEG already there is kept when it holds the same
  bytes (a retry after a crash between the PUTs, or the same upload in flight elsewhere),
  left as it is when its record is in, and replaced only as a crash leftover, without a
  record and older than ``roadloop.data.frame_records.IN_FLIGHT_GRACE``; younger, it is
  another upload between its two PUTs and the write fails with ``FrameWriteInProgress`` (an
  ``OSError``: 503, retry later). That costs requests only when the JPEG PUT is refused
  (``S3FrameStore._put_image``); the common path is still one PUT per object.
* Unlike the folder store, ``write_frame`` looks for an existing frame in the record's own
  date folder only (one request, not one per day of the camera); the gateway's database
  refuses a frame id reused on another day, and the gateway removes the copy that replay
  wrote (``fleet.intake``).
* Images are read through a local cache folder (``root``): ``iter_frames``,
  ``find_frame`` and ``image_path`` download a frame's JPEG there and hand out the local
  path (``root/<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg``), so the readers written for the
  folder store work unchanged. **A cached copy is used only when it is the object in the
  store now**: with the image's SHA-256 — from the caller (a gateway ``frames`` row), or
  from the frame's record, which states it (``FrameRecord.image_sha256``; ``iter_frames``
  and ``find_frame`` read the record anyway) — when the cached bytes hash to it, so a
  cached frame costs no request; else (a record written before records stated it) after a
  conditional GET (``If-None-Match`` with the cached
  bytes' MD5, the ETag of a single-PUT object) answered 304. An object that is gone (erased
  on another replica, expired) is never served from the cache: its cached copy is deleted
  when asked for, and one replaced under the same key (stored again after an expiry) is
  downloaded again. An erasure on another replica cannot reach this folder, so with
  ``cache_ttl_s`` the cache is also bounded in time: ``sweep_cache`` deletes images unused
  (neither downloaded nor served) for ``cache_ttl_s``, at most once per ``sweep_interval_s``
  (``min(5 min, cache_ttl_s)``) per cache folder; reads call it, and the gateway runs it on
  a timer too (``fleet.runtime``; ``ROADLOOP_GATEWAY_FRAME_CACHE_TTL_S``, default one hour).
  Erased pixels thus leave another gateway replica's disk at most ``cache_ttl_s +
  sweep_interval_s`` after that replica last read them. Without ``cache_ttl_s`` (the
  platform's store: Dagster's frame index names images in this folder) nothing is swept.
* The S3 client has short timeouts and one retry (``S3Timeouts``), not botocore's 60 s
  connect, 60 s read and up to 5 legacy attempts: a stalled store fails a request (``OSError``,
  the gateway's 503) within ``max_attempts * (connect_s + read_s)`` plus < 1 s of backoff at
  worst (7 s by default, 5 s for a store that accepts connections and never answers), well
  before an agent's 10 s HTTP timeout gives up on the upload.

Credentials and region come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``...); the endpoint of a non-AWS server
(MinIO, Ceph, moto) from ``ROADLOOP_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from roadloop.data import frame_records  # IN_FLIGHT_GRACE, read at each use
from roadloop.data.frame_records import (
    ID_RE,
    FrameRecord,
    FrameStorage,
    FrameWrite,
    FsckReport,
    StoredFrame,
    checked_sidecar,
    date_folder,
    day_overlaps,
    in_window,
    is_date_folder,
    parse_sidecar,
    validate_id,
)
from roadloop.data.frames import FrameStore
from roadloop.data.image_cache import CACHE_SWEEP_INTERVAL_S, sweep_folder, touch_cached
from roadloop.data.s3_client import (
    S3Timeouts,
    as_os_error,
    error_code,
    is_conflict,
    is_missing,
)
from roadloop.fsutil import write_bytes_atomic

logger = logging.getLogger(__name__)

_UNCHANGED = object()  # a conditional GET answered 304
# Create-or-resolve rounds of one JPEG PUT (``_put_image``): the first PUT, and a retry
# when the JPEG found was deleted or replaced meanwhile.
_IMAGE_PUT_ROUNDS = 3


class FrameWriteInProgress(OSError):
    """Another upload is writing this frame with other pixels right now (its JPEG is in the
    store, its record not yet): nothing was written. An ``OSError`` (``EBUSY``), so the
    gateway answers 503, retry later; the retry finds the frame complete (409) or, once the
    JPEG is older than ``IN_FLIGHT_GRACE`` and still has no record, replaces it."""

    def __init__(self, rel: str, age: timedelta | None) -> None:
        what = ("its JPEG kept changing" if age is None else
                f"its JPEG, {age.total_seconds():.0f} s old, has other pixels and no record yet")
        super().__init__(errno.EBUSY, f"frame {rel} is being written by another upload ({what})")


@dataclass(frozen=True)
class _Found:
    """An object ``_put_image`` found: its ETag (bare and as the store quotes it), its age by
    the store's clock, and its bytes when they were read."""

    etag: str
    quoted_etag: str
    age: timedelta
    body: bytes | None


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
                 client: Any = None, endpoint_url: str | None = None,
                 timeouts: S3Timeouts | None = None,
                 cache_ttl_s: float | None = None) -> None:
        if client is None:
            import boto3  # only deployments with an object store need it

            client = boto3.client("s3", endpoint_url=endpoint_url or None,
                                  config=(timeouts or S3Timeouts()).client_config())
        if cache_ttl_s is not None and not cache_ttl_s > 0:
            raise ValueError(f"cache_ttl_s must be positive (or None: no sweep), not "
                             f"{cache_ttl_s}")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root = Path(cache_dir)
        self.cache_ttl_s = None if cache_ttl_s is None else float(cache_ttl_s)
        self.sweep_interval_s = (None if self.cache_ttl_s is None
                                 else min(CACHE_SWEEP_INTERVAL_S, self.cache_ttl_s))

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
            if is_missing(exc):
                return False
            raise
        return True

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if is_missing(exc):
                return None
            raise

    def _list(self, relative_prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(relative_prefix)}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    def _days(self, camera_id: str) -> list[str]:
        """The camera's date folders (sorted); a folder whose name is no date (``misc``, or
        ``2026-13-45``, which has the shape of one) is skipped: ``write_frame`` never makes
        one (``date_folder``), so nothing in it is a frame of this store."""
        validate_id("camera_id", camera_id, where=self.url)
        days = []
        for page in self._list(f"{camera_id}/", "/"):
            for cp in page.get("CommonPrefixes", []):
                day = cp["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if is_date_folder(day):
                    days.append(day)
                else:
                    logger.debug("skipping %s/%s/%s/: not a date folder", self.url,
                                 camera_id, day)
        return sorted(days)

    def _get_unless(self, key: str, cached: bytes) -> Any:
        """The object at ``key``: ``_UNCHANGED`` when it is ``cached`` (a conditional GET on
        the ETag a single PUT gets, the MD5 of its bytes: 304, no body), ``None`` when absent.
        A store whose ETags are no MD5 (SSE-KMS) answers 200 every time: the cache then saves
        nothing, but never serves a stale copy."""
        etag = f'"{hashlib.md5(cached, usedforsecurity=False).hexdigest()}"'
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key,
                                          IfNoneMatch=etag)["Body"].read()
        except Exception as exc:
            if error_code(exc) in ("304", "NotModified"):
                return _UNCHANGED
            if is_missing(exc):
                return None
            raise

    def _download(self, relative: str, sha256: str | None = None) -> Path:
        """The image at ``relative`` as a local file: the cached copy when it is the object in
        the store now (its SHA-256 is ``sha256``, or the store says it is unchanged), else
        the object downloaded into the cache. ``FileNotFoundError`` (and the cached copy
        deleted) when the object is gone."""
        self._sweep_quietly()
        local = self.root / relative
        try:
            cached: bytes | None = local.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            cached = None
        if (cached is not None and sha256 is not None
                and hashlib.sha256(cached).hexdigest() == sha256.lower() and touch_cached(local)):
            return local
        key = self._key(relative)
        with as_os_error(f"read of {relative}"):
            data = (self._get_unless(key, cached) if cached is not None and sha256 is None
                    else self._get(key))
        if data is _UNCHANGED and touch_cached(local):
            return local
        if data is _UNCHANGED:  # swept between the read and the touch: fetch it whole
            with as_os_error(f"read of {relative}"):
                data = self._get(key)
        if data is None:
            local.unlink(missing_ok=True)  # erased or expired in the store: not kept here
            raise FileNotFoundError(f"{self.url}/{relative} is not in the object store")
        assert isinstance(data, bytes)
        for attempt in (1, 2):
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                write_bytes_atomic(local, data, durable=False)
                break
            except FileNotFoundError:  # a sweep removed the (empty, idle) folder just now
                if attempt == 2:
                    raise
        return local

    def image_path(self, relative: str, *, sha256: str | None = None) -> Path:
        """The image at ``relative`` (a ``frames.path`` value) as a local file; ``sha256``
        (the row's) lets a cached copy with those bytes be used without asking the store."""
        return self._download(relative, sha256)

    # ---- the image cache
    def sweep_cache(self, *, force: bool = False) -> int:
        """Delete the cached images unused for longer than ``cache_ttl_s`` (at most once per
        ``sweep_interval_s`` per cache folder, unless ``force``; ``image_cache.sweep_folder``);
        returns the files deleted. Nothing without ``cache_ttl_s``."""
        if self.cache_ttl_s is None or self.sweep_interval_s is None:
            return 0
        return sweep_folder(self.root, self.cache_ttl_s, self.sweep_interval_s, force=force)

    def _sweep_quietly(self) -> None:
        try:
            self.sweep_cache()
        except OSError as exc:  # a read must not fail because the sweep did
            logger.warning("image cache sweep of %s failed: %s", self.root, exc)

    # ---- writing
    def write_frame(self, record: FrameRecord, jpeg_bytes: bytes, *,
                    decoded_size: tuple[int, int] | None = None,
                    durable: bool = True, look_in_other_days: bool = True,
                    sidecar: bytes | None = None) -> FrameWrite:
        """PUT the JPEG, then the record, both create-only; returns once both succeeded (a
        PUT is durable when answered, so ``durable`` changes nothing). A JPEG already there
        is never overwritten by another upload's pixels: see ``_put_image``. A frame id is
        looked for in the record's own date folder only, whatever ``look_in_other_days``
        says (see the module docstring). ``FrameWriteInProgress`` (an ``OSError``: the
        gateway's 503, retry later) when another upload with other pixels is writing the
        same frame right now. ``sidecar``: as for ``FrameStore.write_frame``."""
        rel = self._relative(record)
        target = self.root / f"{rel}.jpg"
        sidecar_key = self._key(f"{rel}.json")
        with as_os_error(f"write of {rel}"):
            if self._exists(sidecar_key):
                return FrameWrite(target, True)
            sidecar = checked_sidecar(record, jpeg_bytes, decoded_size,
                                      where=f"{self.url}/{rel}", sidecar=sidecar)
            if not self._put_image(rel, bytes(jpeg_bytes), sidecar_key):
                return FrameWrite(target, True)  # complete meanwhile, with the other pixels
            try:
                self.client.put_object(Bucket=self.bucket, Key=sidecar_key, Body=sidecar,
                                       ContentType="application/json", IfNoneMatch="*")
            except Exception as exc:
                if is_conflict(exc):
                    return FrameWrite(target, True)  # another writer created it first
                raise
        return FrameWrite(target, False)

    def _put_image(self, rel: str, body: bytes, sidecar_key: str) -> bool:
        """Make the JPEG at ``rel`` hold ``body``, so that the record PUT after it describes
        the pixels in the store; False when the frame turned out complete (its record is in)
        with other pixels, which stay.

        The PUT is create-only (``If-None-Match: *``): one request when the key is free, the
        common case. When a JPEG is already there (412):

        * the same bytes (its ETag is our MD5, or, on a store whose ETags are no MD5 such as
          SSE-KMS, a GET of it equals ``body``): a retry after a crash between the two PUTs,
          or this very upload in flight on another replica; it is kept, and re-PUT over
          itself when older than ``IN_FLIGHT_GRACE`` (``If-Match`` its ETag), so that the
          start-up reconcile and retention, which take only old JPEGs without a record,
          leave it alone while the record follows;
        * other bytes and the record is in: the frame is complete, False;
        * other bytes, no record, written less than ``IN_FLIGHT_GRACE`` ago: another upload
          is between its two PUTs; ``FrameWriteInProgress`` (retry later), nothing written;
        * other bytes, no record, older: a crash leftover, replaced (``If-Match`` its ETag:
          a replica that replaced it first makes this PUT fail, and the loop looks again).

        The age is the store's own: the answer's ``Date`` minus the JPEG's ``LastModified``
        (the gateway's clock when the store sends no ``Date``)."""
        key = self._key(f"{rel}.jpg")
        md5 = ""  # of ``body``, hashed only once a PUT was refused (not on the common path)
        condition: dict[str, str] = {"IfNoneMatch": "*"}
        for _ in range(_IMAGE_PUT_ROUNDS):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                       ContentType="image/jpeg", **condition)
                return True
            except Exception as exc:
                # 412: there is one (create) or it changed (If-Match); 404: If-Match on a JPEG
                # deleted meanwhile (an orphan delete); either way, look again.
                if not (is_conflict(exc) or ("IfMatch" in condition and is_missing(exc))):
                    raise
            md5 = md5 or hashlib.md5(body, usedforsecurity=False).hexdigest()
            found = self._stat(key)
            if found is not None and found.etag != md5:
                if self._exists(sidecar_key):
                    return False
                found = self._stat(key, body=True)  # no MD5 ETag (SSE-KMS)? compare bytes
            if found is None:  # deleted since: create it
                condition = {"IfNoneMatch": "*"}
                continue
            same = found.etag == md5 or found.body == body
            if found.age < frame_records.IN_FLIGHT_GRACE:
                if same:
                    return True
                raise FrameWriteInProgress(rel, found.age)
            if not same:
                logger.warning("replacing %s/%s.jpg: a JPEG without its record, %.0f s old, "
                               "with other pixels (a crashed upload's)", self.url, rel,
                               found.age.total_seconds())
            condition = {"IfMatch": found.quoted_etag}
        raise FrameWriteInProgress(rel, None)

    def _stat(self, key: str, *, body: bool = False) -> _Found | None:
        """The object at ``key`` (a HEAD, or with ``body`` a GET), None when absent."""
        try:
            if body:
                answer = self.client.get_object(Bucket=self.bucket, Key=key)
                data: bytes | None = answer["Body"].read()
            else:
                answer = self.client.head_object(Bucket=self.bucket, Key=key)
                data = None
        except Exception as exc:
            if is_missing(exc):
                return None
            raise
        now = None
        try:
            date_header = answer["ResponseMetadata"]["HTTPHeaders"].get("date")
            now = parsedate_to_datetime(date_header) if date_header else None
        except (KeyError, TypeError, ValueError):
            pass
        if now is None or now.tzinfo is None:
            now = datetime.now(UTC)
        quoted = str(answer.get("ETag", ""))
        return _Found(quoted.strip('"'), quoted, now - answer["LastModified"], data)

    def sync(self) -> None:
        """Nothing to do: every PUT was durable when the store answered it."""

    def remove_frame(self, image_path: Path) -> None:
        """Delete one frame: record first (the frame stops being complete), then the JPEG."""
        rel = Path(image_path).relative_to(self.root).with_suffix("").as_posix()
        with as_os_error(f"delete of {rel}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{rel}.json"))
            self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{rel}.jpg"))
        Path(image_path).unlink(missing_ok=True)

    # ---- reading
    def cameras(self) -> list[str]:
        """Camera ids with at least one object in the store (sorted)."""
        names = []
        with as_os_error("listing of cameras"):
            for page in self._list("", "/"):
                for cp in page.get("CommonPrefixes", []):
                    name = cp["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                    if ID_RE.fullmatch(name):
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
        with as_os_error(f"read of {camera_id}/{frame_id}"):
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
        """Local path of a complete frame's image (downloaded, or the cached copy when it is
        the object in the store: its record's hash, else a conditional GET), in any date
        folder."""
        record = self.read_record(camera_id, frame_id)
        if record is None:
            return None
        try:
            return self._download(f"{self._relative(record)}.jpg", record.image_sha256)
        except FileNotFoundError:  # deleted since its record was read
            return None

    def _listing(self, camera_id: str, start: datetime | None = None,
                 end: datetime | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """(image stem -> size, record stem -> size) of one camera (stems relative to the
        prefix, ``<camera>/<day>/<frame_id>``), date folders outside ``[start, end)`` skipped."""
        images, records, _ = self._listing_with_times(camera_id, start, end)
        return images, records

    def _listing_with_times(
        self, camera_id: str, start: datetime | None = None, end: datetime | None = None,
    ) -> tuple[dict[str, int], dict[str, int], dict[str, datetime]]:
        """``_listing`` and, per stem, the later LastModified of its image and record."""
        first = start.astimezone(UTC).date() if start is not None else date.min
        last = end.astimezone(UTC).date() if end is not None else date.max
        images: dict[str, int] = {}
        records: dict[str, int] = {}
        modified: dict[str, datetime] = {}
        base = len(self._key(""))
        for day in self._days(camera_id):
            if not first <= date.fromisoformat(day) <= last:
                continue
            for page in self._list(f"{camera_id}/{day}/"):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][base:]
                    stem, _, ext = rel.rpartition(".")
                    if not ID_RE.fullmatch(stem.rsplit("/", 1)[-1]):
                        continue
                    if ext == "jpg":
                        images[stem] = int(obj["Size"])
                    elif ext == "json":
                        records[stem] = int(obj["Size"])
                    else:
                        continue
                    when = obj["LastModified"]
                    if stem not in modified or when > modified[stem]:
                        modified[stem] = when
        return images, records, modified

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
        ``start <= t < end``; each image is downloaded into the cache as it is reached (a
        cached copy is used when it hashes to its record's ``image_sha256``, else checked
        with the store), one deleted meanwhile skipped."""
        for record in self._records(camera_id, start, end):
            try:
                image = self._download(f"{self._relative(record)}.jpg", record.image_sha256)
            except FileNotFoundError:
                logger.warning("skipping frame %s/%s: deleted while listed", camera_id,
                               record.frame_id)
                continue
            yield record, image

    def count(self, camera_id: str) -> int:
        """Number of complete, readable frames of one camera (no image is downloaded)."""
        return len(self._records(camera_id, None, None))

    def day_sizes(self, camera_id: str, day: str) -> dict[str, int]:
        """``{frame_id: bytes}`` (image + record, the listing's sizes) of one date folder of
        one camera: one listing, no record or image read."""
        if not is_date_folder(day):
            return {}
        first = datetime.combine(date.fromisoformat(day), datetime.min.time(), tzinfo=UTC)
        sizes: dict[str, int] = {}
        with as_os_error(f"listing of {camera_id}/{day}"):
            images, records = self._listing(camera_id, first, first)
        for stem, size in (*images.items(), *records.items()):
            _, folder, frame_id = stem.split("/")
            if folder == day:
                sizes[frame_id] = sizes.get(frame_id, 0) + size
        return sizes

    def stored_frames(self, camera_id: str, *, start: datetime | None = None,
                      end: datetime | None = None) -> list[StoredFrame]:
        """Every frame of one camera in the date folders that overlap ``[start, end)``, with
        its record (None: unreadable, as ``fsck`` reports it) and the bytes it takes (the
        listing's sizes of its JPEG and record), in (date folder, frame id) order. **No image
        is downloaded**: one listing per date folder and a GET of each record whose JPEG
        exists; ``image`` is the cache path, which ``remove_frame`` takes. The caller picks
        the readable frames by ``captured_at`` (``in_window``)."""
        out: list[StoredFrame] = []
        with as_os_error(f"listing of {camera_id}"):
            images, records, modified = self._listing_with_times(camera_id, start, end)
            for stem in sorted(images.keys() | records.keys()):
                _, day, frame_id = stem.split("/")
                if not day_overlaps(day, start, end):
                    continue
                record = None
                if stem in images and stem in records:
                    data = self._get(self._key(f"{stem}.json"))
                    record = None if data is None else parse_sidecar(
                        data, camera_id, frame_id, where=f"{self.url}/{stem}.json")
                out.append(StoredFrame(camera_id, frame_id, day, self.root / f"{stem}.jpg",
                                       images.get(stem, 0) + records.get(stem, 0), record,
                                       modified.get(stem)))
        return out

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
        with as_os_error("listing for reconcile"):
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
                            or not ID_RE.fullmatch(parts[0]) or not is_date_folder(parts[1])
                            or not ID_RE.fullmatch(stem)):
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
        with as_os_error(f"read of {stem}"):
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
        with as_os_error(f"delete of {stem}"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if is_missing(exc):
                    return False
                raise
            if head["LastModified"] >= older_than or self._exists(self._key(f"{stem}.json")):
                return False
            self.client.delete_object(Bucket=self.bucket, Key=key)
        return True


def open_frame_store(location: str | Path, *, cache_dir: Path | str | None = None,
                     endpoint_url: str | None = None, client: Any = None,
                     timeouts: S3Timeouts | None = None,
                     cache_ttl_s: float | None = None) -> FrameStorage:
    """The frame store at ``location``: ``s3://bucket[/prefix]`` gives an ``S3FrameStore``
    (images cached under ``cache_dir``, deleted once unused for ``cache_ttl_s`` when given;
    its client with ``timeouts``, default ``S3Timeouts()``), anything else a folder
    ``FrameStore``."""
    text = str(location)
    if not text.startswith("s3://"):
        return FrameStore(Path(text).expanduser())
    parsed = urlparse(text)
    if not parsed.netloc:
        raise ValueError(f"frame store URL {text!r} names no bucket: use s3://bucket/prefix")
    if cache_dir is None:
        raise ValueError("an object-store frame store needs a local cache_dir for images")
    return S3FrameStore(parsed.netloc, parsed.path, cache_dir=cache_dir, client=client,
                        endpoint_url=endpoint_url, timeouts=timeouts, cache_ttl_s=cache_ttl_s)


def platform_frame_store(settings: Any = None) -> FrameStorage:
    """The platform's frame store as the settings configure it, opened as the Dagster
    resource (``FrameStoreResource.store``) opens it: ``ROADLOOP_FRAME_STORE_URL`` with
    ``ROADLOOP_FRAME_STORE`` as its image cache, else the folder ``ROADLOOP_FRAME_STORE``."""
    if settings is None:
        from roadloop.settings import get_settings

        settings = get_settings()
    return open_frame_store(settings.frame_store_url or settings.frame_store,
                            cache_dir=settings.frame_store,
                            endpoint_url=settings.s3_endpoint_url)
