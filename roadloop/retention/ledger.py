"""The privacy folder (``settings.privacy_dir``, default ``<home>/privacy``)::

    audit.jsonl              one line per erasure event (who, when, what, outcome)
    excluded_frames.jsonl    frame keys (``camera/frame``) erased: never in a future version
    journal/<request>.json   an erasure's plan, written before anything is deleted
    versions/<md5>.json      the edge frame keys a curated dataset version holds

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

from roadloop.fsutil import write_text_atomic

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
