"""Erasure on request: every frame of one camera captured in ``[since, until)``.

Order of work (``erase``), each step idempotent so a re-run after a crash finishes the job:

1. validate the request (known camera, timezone-aware, non-empty range) — nothing is
   touched before this passes;
2. plan: list the frames in range (the store's listing, ``stored_frames``: sizes as stored,
   unreadable frames too) with each image's hash (on the object store the range's images
   are downloaded into the local cache for it; step 4 deletes those copies), write the plan
   as a journal (``journal/<request_id>.json``, atomically) and audit ``erasure_planned``;
3. add the planned frame keys to the exclusion list (so even a half-done erasure keeps
   them out of every future dataset version);
4. delete each frame from the frame store (sidecar, then image), then the review samples
   (``ReviewSink``), then the gateway's rows (``GatewaySink``), then the copies derived from
   the frames (``roadloop.retention.derived``: their vectors in every embedding cache, by
   the image hashes the plan recorded, and their lines in the camera's frame index);
5. mark the journal done and audit ``erasure_completed`` with what was and was not removed.

A crash anywhere leaves the journal "planned": ``erase`` with the same request (or
``resume_pending``) reads the journal's plan — not the store, which may by then hold an
image without its sidecar — and redoes steps 3-5. Frames inside an already versioned
dataset are removed everywhere else and reported in ``not_removable`` (a DVC version is
immutable; its copy stays in the version and is excluded from every later one).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from roadloop.data.frame_records import FrameId, FrameStorage, in_window
from roadloop.errors import RoadloopError
from roadloop.fsutil import write_text_atomic
from roadloop.retention.derived import (
    DerivedScrub,
    default_artifacts_dir,
    image_sha256,
    scrub_derived,
)
from roadloop.retention.ledger import PrivacyLedger
from roadloop.retention.leftovers import select_leftovers

logger = logging.getLogger(__name__)


class ErasureRequestError(RoadloopError):
    """A request that cannot be honoured as given (nothing was deleted); says why."""


class ReviewSink(Protocol):
    """Where review samples live (``ReviewStore``): deletes samples by frame key."""

    def delete_frames(self, frame_keys: Collection[str]) -> int: ...


class GatewaySink(Protocol):
    """The fleet gateway: deletes its rows (and files) of one camera and range."""

    def erase_frames(self, camera_id: str, since: datetime, until: datetime) -> int: ...


class ErasureRequest(BaseModel):
    camera_id: FrameId
    since: datetime
    until: datetime
    requested_by: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=2000)

    @field_validator("since", "until")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("must be timezone-aware (e.g. 2026-05-04T12:00:00+00:00)")
        return v.astimezone(UTC)

    @model_validator(mode="after")
    def _range(self) -> ErasureRequest:
        if self.until <= self.since:
            raise ValueError(
                f"empty or inverted range: until {self.until.isoformat()} is not after "
                f"since {self.since.isoformat()}"
            )
        return self

    @property
    def request_id(self) -> str:
        """Same camera and range, same id: re-running a request resumes its journal."""
        raw = f"{self.camera_id}|{self.since.isoformat()}|{self.until.isoformat()}"
        return f"{self.camera_id}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def make_request(camera_id: str, since: datetime, until: datetime, requested_by: str,
                 reason: str = "") -> ErasureRequest:
    """An ``ErasureRequest``, or ``ErasureRequestError`` naming every problem."""
    try:
        return ErasureRequest(camera_id=camera_id, since=since, until=until,
                              requested_by=requested_by, reason=reason)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()
        )
        raise ErasureRequestError(f"invalid erasure request: {problems}") from exc


class PlannedFrame(BaseModel):
    frame_id: str
    captured_at: datetime
    image: Path
    size_bytes: int
    versions: list[str] = Field(default_factory=list)  # dataset versions holding it
    # the image's SHA-256 (the embedding cache's key), taken before anything is deleted;
    # None in a journal written before it was recorded, or for an unreadable image
    sha256: str | None = None


class ErasureJournal(BaseModel):
    request: ErasureRequest
    request_id: str
    status: Literal["planned", "done"] = "planned"
    planned_at: datetime
    frames: list[PlannedFrame]
    completed_at: datetime | None = None


class NotRemovable(BaseModel):
    frame_key: str
    versions: list[str]
    why: str = "inside an already versioned dataset (DVC versions are immutable); excluded " \
               "from every later version"


class ErasureResult(BaseModel):
    request_id: str
    camera_id: str
    since: datetime
    until: datetime
    frames_deleted: int
    bytes_deleted: int
    review_samples_deleted: int | None  # None: no review store given
    gateway_rows_deleted: int | None  # None: no gateway given
    excluded: int
    not_removable: list[NotRemovable]
    resumed: bool
    derived: DerivedScrub | None = None  # embeddings and frame index lines removed


def journal_path(ledger: PrivacyLedger, request_id: str) -> Path:
    return ledger.journal_dir / f"{request_id}.json"


def _save(ledger: PrivacyLedger, journal: ErasureJournal) -> None:
    write_text_atomic(journal_path(ledger, journal.request_id),
                      journal.model_dump_json(indent=1), parents=True, durable=True)


def _image_hash(store: FrameStorage, image: Path) -> str | None:
    """The SHA-256 of a frame's image as the store holds it now (the embedding cache's key):
    the folder store's file; on the object store the object, downloaded into the local cache
    (or the cached copy the store says is current) — the erasure's ``remove_frame`` deletes
    that copy with the frame. None when the image is gone or is no regular file."""
    try:
        relative = image.relative_to(store.root).as_posix()
    except ValueError:  # not under this store's root (a journal from another setup)
        return image_sha256(image)
    try:
        return image_sha256(store.image_path(relative))
    except FileNotFoundError:  # an object gone from the store (a record without its image)
        return None


def _plan(request: ErasureRequest, store: FrameStorage,
          versioned: dict[str, list[str]]) -> list[PlannedFrame]:
    # The store's listing: sizes as stored (image + record), in either store.
    listed = store.stored_frames(request.camera_id, start=request.since, end=request.until)
    readable = sorted(((f.record, f) for f in listed
                       if f.record is not None
                       and in_window(f.record, request.since, request.until)),
                      key=lambda rf: (rf[0].captured_at, rf[1].frame_id))
    out = []
    for record, f in readable:
        out.append(PlannedFrame(
            frame_id=f.frame_id, captured_at=record.captured_at, image=f.image,
            size_bytes=f.size_bytes,
            versions=versioned.get(f"{request.camera_id}/{f.frame_id}", []),
            sha256=_image_hash(store, f.image),
        ))
    # Unreadable frames of the range's days (an image without a sidecar, a sidecar that does
    # not parse): their time cannot be read, so a day the range touches is enough.
    for left in select_leftovers(listed, start=request.since, end=request.until):
        logger.warning("erasure %s: taking unreadable frame %s (day %s)", request.request_id,
                       left.image, left.day_start.date())
        out.append(PlannedFrame(
            frame_id=left.frame_id, captured_at=left.day_start, image=left.image,
            size_bytes=left.size_bytes,
            versions=versioned.get(f"{request.camera_id}/{left.frame_id}", []),
            sha256=_image_hash(store, left.image),
        ))
    return out


def erase(
    request: ErasureRequest,
    *,
    store: FrameStorage,
    ledger: PrivacyLedger,
    known_cameras: Iterable[str],
    review: ReviewSink | None = None,
    gateway: GatewaySink | None = None,
    artifacts_dir: Path | None = None,
) -> ErasureResult:
    """Carry out (or finish) ``request``; see the module docstring for the order of work.

    ``known_cameras``: cameras this deployment has (frame store, gateway); another camera
    is an ``ErasureRequestError`` and nothing is deleted. ``artifacts_dir``: where the
    embedding caches and frame indexes are (default: the settings' artifacts folder).
    """
    known = set(known_cameras)
    if request.camera_id not in known:
        raise ErasureRequestError(
            f"unknown camera {request.camera_id!r}: not in the frame store nor the gateway "
            f"(known: {', '.join(sorted(known)) or 'none'}); nothing deleted"
        )
    path = journal_path(ledger, request.request_id)
    resumed = False
    if path.is_file():
        journal = ErasureJournal.model_validate_json(path.read_text(encoding="utf-8"))
        resumed = journal.status == "planned"
    if not resumed:  # a new request, or one already done (run it again: new frames may exist)
        journal = ErasureJournal(
            request=request, request_id=request.request_id, planned_at=datetime.now(UTC),
            frames=_plan(request, store, ledger.versioned_frame_keys()),
        )
        _save(ledger, journal)
        ledger.audit("erasure_planned", actor=request.requested_by,
                     request_id=request.request_id, camera_id=request.camera_id,
                     since=request.since.isoformat(), until=request.until.isoformat(),
                     reason=request.reason, frames=len(journal.frames))
    return _execute(journal, store=store, ledger=ledger, review=review, gateway=gateway,
                    resumed=resumed, artifacts_dir=artifacts_dir)


def _execute(journal: ErasureJournal, *, store: FrameStorage, ledger: PrivacyLedger,
             review: ReviewSink | None, gateway: GatewaySink | None,
             resumed: bool, artifacts_dir: Path | None = None) -> ErasureResult:
    req = journal.request
    keys = [f"{req.camera_id}/{f.frame_id}" for f in journal.frames]
    excluded = ledger.add_exclusions(keys, journal.request_id)
    unhashed = [f for f in journal.frames if f.sha256 is None]
    for frame in unhashed:  # a journal from before hashes were planned: hash what is left
        frame.sha256 = _image_hash(store, frame.image)
    if any(f.sha256 for f in unhashed):
        _save(ledger, journal)  # before the images go: a crash after still has the hashes
    for frame in journal.frames:
        store.remove_frame(frame.image)  # idempotent: missing files are fine
    review_deleted = review.delete_frames(keys) if review is not None and keys else (
        0 if review is not None else None)
    gateway_deleted = (gateway.erase_frames(req.camera_id, req.since, req.until)
                       if gateway is not None else None)
    derived = scrub_derived(
        artifacts_dir if artifacts_dir is not None else default_artifacts_dir(),
        [(req.camera_id, f.frame_id) for f in journal.frames],
        [f.sha256 for f in journal.frames])
    not_removable = [NotRemovable(frame_key=f"{req.camera_id}/{f.frame_id}", versions=f.versions)
                     for f in journal.frames if f.versions]
    journal.status = "done"
    journal.completed_at = datetime.now(UTC)
    _save(ledger, journal)
    result = ErasureResult(
        request_id=journal.request_id, camera_id=req.camera_id, since=req.since,
        until=req.until, frames_deleted=len(journal.frames),
        bytes_deleted=sum(f.size_bytes for f in journal.frames),
        review_samples_deleted=review_deleted, gateway_rows_deleted=gateway_deleted,
        excluded=excluded, not_removable=not_removable, resumed=resumed, derived=derived,
    )
    ledger.audit("erasure_completed", actor=req.requested_by, request_id=journal.request_id,
                 camera_id=req.camera_id, since=req.since.isoformat(),
                 until=req.until.isoformat(), frames_deleted=result.frames_deleted,
                 bytes_deleted=result.bytes_deleted,
                 review_samples_deleted=review_deleted, gateway_rows_deleted=gateway_deleted,
                 embeddings_removed=derived.embeddings_removed,
                 embedding_caches_deleted=len(derived.caches_deleted),
                 frame_index_lines_removed=derived.index_lines_removed,
                 not_removable=[n.model_dump() for n in not_removable], resumed=resumed)
    logger.info("erasure %s: %d frames deleted, %d not removable from versions",
                journal.request_id, result.frames_deleted, len(not_removable))
    return result


def pending_journals(ledger: PrivacyLedger) -> list[ErasureJournal]:
    """Erasures planned but not finished (a crash, a failed gateway call)."""
    if not ledger.journal_dir.is_dir():
        return []
    out = []
    for path in sorted(ledger.journal_dir.glob("*.json")):
        journal = ErasureJournal.model_validate_json(path.read_text(encoding="utf-8"))
        if journal.status == "planned":
            out.append(journal)
    return out


def resume_pending(*, store: FrameStorage, ledger: PrivacyLedger,
                   review: ReviewSink | None = None,
                   gateway: GatewaySink | None = None,
                   artifacts_dir: Path | None = None) -> list[ErasureResult]:
    """Finish every unfinished erasure from its journal."""
    return [_execute(j, store=store, ledger=ledger, review=review, gateway=gateway, resumed=True,
                     artifacts_dir=artifacts_dir)
            for j in pending_journals(ledger)]


__all__ = [
    "ErasureJournal",
    "ErasureRequest",
    "ErasureRequestError",
    "ErasureResult",
    "GatewaySink",
    "NotRemovable",
    "ReviewSink",
    "erase",
    "make_request",
    "pending_journals",
    "resume_pending",
]
