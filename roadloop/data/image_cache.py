"""The local image cache of the object frame store (``roadloop.data.object_frames``):
downloaded JPEGs under ``<cache>/<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg``, aged by their
mtime (``touch_cached`` on every use) and swept once unused for the store's ``cache_ttl_s``,
at most once per sweep interval per cache folder, whichever process asks (``SWEEP_MARKER``).
Only the cache's own files are touched: a JPEG with no ``.json`` beside it (a folder store's
frame has one) and interrupted downloads, never a symbolic link's target."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from roadloop.data.frame_records import ID_RE, is_date_folder

logger = logging.getLogger(__name__)

# A sweep walks the folder, at most every 5 min (when it is not due: one stat of SWEEP_MARKER).
CACHE_SWEEP_INTERVAL_S = 300.0
SWEEP_MARKER = ".cache-sweep"  # in the cache folder: its mtime is the last sweep's start
_TEMP_RE = re.compile(r"^\..+\.jpg\.tmp-[0-9a-f]+$")  # roadloop.fsutil.write_bytes_atomic's


def sweep_folder(root: Path, ttl_s: float, interval_s: float, *, force: bool = False) -> int:
    """Delete the images (and interrupted downloads) under ``root`` unused for longer than
    ``ttl_s``, and folders left empty as long; returns the files deleted. Nothing when the
    last sweep of ``root`` started less than ``interval_s`` ago, unless ``force``."""
    now = time.time()
    marker = root / SWEEP_MARKER
    if not force:
        try:
            if 0 <= now - marker.stat().st_mtime < interval_s:
                return 0
        except FileNotFoundError:
            pass
    if not root.is_dir():
        return 0
    marker.touch()
    cutoff = now - ttl_s
    removed = 0
    for camera in _subfolders(root, ID_RE.fullmatch):
        for day in _subfolders(camera, is_date_folder):
            removed += _sweep_day(day, cutoff)
            _remove_if_idle(day, cutoff)
        _remove_if_idle(camera, cutoff)
    if removed:
        logger.info("image cache %s: %d images unused for %.0f s deleted", root, removed, ttl_s)
    return removed


def touch_cached(path: Path) -> bool:
    """Mark a cached image used now (its mtime: what ``sweep_folder`` ages); False when it is
    gone meanwhile."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:  # a read-only cache: still a valid copy
        pass
    return True


def _subfolders(folder: Path, named: Callable[[str], object]) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it
                    if named(e.name) and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _sweep_day(day: Path, cutoff: float) -> int:
    """Delete the cache's files in one date folder last used before ``cutoff``."""
    removed = 0
    try:
        with os.scandir(day) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    names = {e.name for e in entries}
    for entry in entries:
        name = entry.name
        if name.endswith(".jpg") and ID_RE.fullmatch(name[:-4]):
            if f"{name[:-4]}.json" in names:
                continue  # a folder store's frame (record beside it): not the cache's
        elif not _TEMP_RE.fullmatch(name):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("image cache: could not delete %s: %s", entry.path, exc)
    return removed


def _remove_if_idle(folder: Path, cutoff: float) -> None:
    """Remove ``folder`` when empty and unchanged since ``cutoff`` (a download into it since
    then changed its mtime; a download re-creates one removed under it)."""
    try:
        if folder.stat(follow_symlinks=False).st_mtime < cutoff:
            folder.rmdir()
    except OSError:  # not empty, gone, or not ours to remove
        pass
