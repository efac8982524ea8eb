"""The privacy folder (``settings.privacy_dir``, default ``<home>/privacy``)::

    audit.jsonl              one line per erasure event (who, when, what, outcome)
    excluded_frames.jsonl    frame keys (``camera/frame``) erased: never in a future version
    journal/<request>.json   an erasure's plan, written before anything is deleted
    versions/<md5>.json      the edge frame keys a curated dataset version holds
    expiry_pending.json      frames retention expired (or is about to) whose gateway rows
                             and review samples are not yet confirmed gone: written before a
                             file is deleted, emptied once the gateway confirms; each
                             read-modify-write holds ``.expiry_pending.json.lock`` (flock), so
                             two retention runs at once lose none of each other's entries

Appends are one ``write`` of one line on a file opened with ``O_APPEND``; readers skip a
torn last line (a crash mid-append), so a re-run that appends again loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from roadloop.errors import RoadloopError
from roadloop.fsutil import sibling_lock, write_text_atomic

logger = logging.getLogger(__name__)


def _append_line(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            logger.warning("skipping unreadable line in %s", path)
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


class PrivacyLedger:
    """Journals, exclusion list, audit log and version index under one folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def exclusions_path(self) -> Path:
        return self.root / "excluded_frames.jsonl"

    @property
    def journal_dir(self) -> Path:
        return self.root / "journal"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def expiry_pending_path(self) -> Path:
        return self.root / "expiry_pending.json"

    # ---- audit
    def audit(self, action: str, *, actor: str, **detail: Any) -> None:
        _append_line(self.audit_path, {"at": datetime.now(UTC).isoformat(), "action": action,
                                       "actor": actor, **detail})

    def audit_events(self) -> list[dict[str, Any]]:
        return _read_lines(self.audit_path)

    # ---- exclusions
    def excluded_frame_keys(self) -> set[str]:
        return {str(o["frame_key"]) for o in _read_lines(self.exclusions_path) if "frame_key" in o}

    def add_exclusions(self, frame_keys: Iterable[str], request_id: str) -> int:
        """Append the keys not yet excluded; returns how many were new."""
        known = self.excluded_frame_keys()
        new = sorted(set(frame_keys) - known)
        for key in new:
            _append_line(self.exclusions_path, {"frame_key": key, "request_id": request_id})
        return len(new)

    # ---- retention: expired frames the gateway has not confirmed deleting
    def pending_expired_frames(self) -> list[tuple[str, str]]:
        """``(camera_id, frame_id)`` of frames retention expired (or was about to) whose
        gateway rows are not confirmed deleted: a run that failed or was cut off after it
        journalled them. Sorted; empty when there are none."""
        path = self.expiry_pending_path
        if not path.is_file():
            return []
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            pairs = {(str(f["camera_id"]), str(f["frame_id"])) for f in doc["frames"]}
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically, so never torn: anything else is damage. Refuse rather than
            # forget frames whose gateway copies would then be kept for ever.
            raise RoadloopError(
                f"{path} is unreadable ({type(exc).__name__}: {exc}): it lists frames whose "
                "gateway rows retention still has to delete; repair or remove it") from exc
        return sorted(pairs)

    def _write_pending(self, pairs: set[tuple[str, str]]) -> None:
        frames = [{"camera_id": c, "frame_id": f} for c, f in sorted(pairs)]
        write_text_atomic(self.expiry_pending_path, json.dumps({"frames": frames}),
                          parents=True, durable=True)

    def add_pending_expired(self, frames: Iterable[tuple[str, str]]) -> int:
        """Journal ``(camera_id, frame_id)`` pairs as expired-but-unconfirmed (durably, before
        any of them is deleted); returns how many were new."""
        wanted = {(str(c), str(f)) for c, f in frames}
        if not wanted:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        with sibling_lock(self.expiry_pending_path):  # another run's update in between is kept
            known = set(self.pending_expired_frames())
            new = wanted - known
            if new:
                self._write_pending(known | new)
        return len(new)

    def confirm_expired(self, frames: Iterable[tuple[str, str]]) -> int:
        """Drop pairs the gateway confirmed deleting; returns how many stay pending."""
        done = {(str(c), str(f)) for c, f in frames}
        if not self.root.is_dir():  # nothing was ever journalled
            return 0
        with sibling_lock(self.expiry_pending_path):  # another run's update in between is kept
            known = set(self.pending_expired_frames())
            left = known - done
            if left != known:
                if left:
                    self._write_pending(left)
                else:
                    self.expiry_pending_path.unlink(missing_ok=True)
        return len(left)

    # ---- dataset versions
    def record_version_frames(self, md5: str, frame_keys: Iterable[str]) -> Path:
        """Remember which edge frames version ``md5`` holds (written once per version)."""
        path = self.versions_dir / f"{md5}.json"
        write_text_atomic(path, json.dumps({"md5": md5, "frame_keys": sorted(set(frame_keys))}),
                          parents=True)
        return path

    def versioned_frame_keys(self) -> dict[str, list[str]]:
        """Frame key -> the dataset versions (md5) that hold it."""
        out: dict[str, list[str]] = {}
        if not self.versions_dir.is_dir():
            return out
        for path in sorted(self.versions_dir.glob("*.json")):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("skipping unreadable version index %s", path)
                continue
            for key in doc.get("frame_keys", []):
                out.setdefault(str(key), []).append(str(doc.get("md5", path.stem)))
        return out


__all__ = ["PrivacyLedger", "without_erased"]


def without_erased(frames: list, frame_keys: list[str], erased: set[str]) -> tuple[list, list]:
    """The review export's (frames, frame keys) minus the erased frame keys (parallel lists)."""
    pairs = [(f, k) for f, k in zip(frames, frame_keys, strict=True) if k not in erased]
    return [f for f, _ in pairs], [k for _, k in pairs]
