"""Copies derived from frames, removed with the frames (erasure and retention).

Deleting a frame's image and sidecar is not the end of it: the platform keeps

- ``<artifacts>/embedding_cache/*.npz`` (``roadloop.labeling.embeddings``): one vector per
  image, keyed by the image's SHA-256, for every model version that embedded it — the
  vectors of an erased frame outlive it there;
- ``<artifacts>/sampled_edge_frames/<camera>.jsonl`` (``assets.ingestion``): the camera's
  frame index, one line (the frame's record and image path) per kept frame.

``scrub_derived`` drops the erased frames from both: each cache whose keys hold one of their
hashes is rewritten without those rows (a temporary file, then a rename, so a reader sees
the old cache or the new one), and a frame index naming one of them is rewritten without
its lines. A cache that does not read (or one the embeddings module moved aside as
``*.npz.corrupt-N``) cannot be checked: it is deleted — it is only a cache, recomputed on
demand. Hashes are taken before the images are deleted (the erasure journal keeps them, so
a resumed erasure still has them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from roadloop.fsutil import atomic_path, sha256_file, write_text_atomic

logger = logging.getLogger(__name__)

EMBEDDING_CACHE = "embedding_cache"
FRAME_INDEX = "sampled_edge_frames"


class DerivedScrub(BaseModel):
    """What ``scrub_derived`` removed."""

    embeddings_removed: int = Field(default=0, description="Cached vectors dropped.")
    caches_rewritten: list[str] = Field(default_factory=list)
    caches_deleted: list[str] = Field(
        default_factory=list, description="Unreadable caches (cannot be checked): deleted.")
    index_lines_removed: int = Field(default=0, description="Frame index lines dropped.")


def default_artifacts_dir() -> Path | None:
    """``ROADLOOP_ARTIFACTS_DIR`` (``roadloop.settings``), or None when the settings do not
    load (logged: the derived copies are then left)."""
    try:
        from roadloop.settings import get_settings

        return Path(get_settings().artifacts_dir)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the erasure itself must still finish
        logger.warning("artifacts folder unknown (%s): embedding caches and frame indexes "
                       "are not scrubbed", exc)
        return None


def has_embedding_caches(artifacts_dir: Path | None) -> bool:
    """Whether any embedding cache exists (else hashing the images is not needed)."""
    folder = None if artifacts_dir is None else Path(artifacts_dir) / EMBEDDING_CACHE
    return folder is not None and folder.is_dir() and any(
        p.is_file() for p in folder.glob("*.npz*"))


def image_sha256(image: Path) -> str | None:
    """The SHA-256 the embedding cache keys ``image`` by; None when it cannot be read."""
    try:
        return sha256_file(image) if image.is_file() and not image.is_symlink() else None
    except OSError:
        return None


def scrub_embedding_caches(cache_dir: Path, hashes: set[str]) -> DerivedScrub:
    """Drop ``hashes`` from every cache in ``cache_dir`` (atomically rewritten)."""
    out = DerivedScrub()
    if not cache_dir.is_dir():
        return out
    for path in sorted(cache_dir.iterdir()):
        if not path.is_file() or ".npz" not in path.name or path.name.startswith("."):
            continue
        if not path.name.endswith(".npz"):  # moved aside as unreadable: cannot be checked
            path.unlink(missing_ok=True)
            out.caches_deleted.append(str(path))
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = np.asarray(z["keys"])
                vectors = np.asarray(z["vectors"])
                meta = np.asarray(z["meta"])
            if len(keys) != len(vectors):
                raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        except Exception as exc:  # noqa: BLE001 - any unreadable cache may hold them
            logger.warning("embedding cache %s does not read (%s): deleted, so that no "
                           "erased frame's vector can stay in it", path, exc)
            path.unlink(missing_ok=True)
            out.caches_deleted.append(str(path))
            continue
        drop = np.array([str(k) in hashes for k in keys], dtype=bool)
        if not drop.any():
            continue
        keep = ~drop
        with atomic_path(path, suffix=".npz", durable=True) as tmp:
            np.savez(tmp, keys=keys[keep], vectors=vectors[keep], meta=meta)
        out.embeddings_removed += int(drop.sum())
        out.caches_rewritten.append(str(path))
    return out


def _indexed_frame_id(line: str) -> tuple[str | None, str | None]:
    """(record frame_id, image stem) of one frame index line; Nones when it does not parse."""
    try:
        data = json.loads(line)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    record = data.get("record")
    fid = record.get("frame_id") if isinstance(record, dict) else None
    image = data.get("image")
    return (fid if isinstance(fid, str) else None,
            Path(image).stem if isinstance(image, str) else None)


def scrub_frame_index(index: Path, frame_ids: set[str]) -> int:
    """Rewrite one camera's frame index without the lines of ``frame_ids``; lines dropped."""
    if not index.is_file():
        return 0
    lines = index.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        fid, stem = _indexed_frame_id(line)
        if fid in frame_ids or (fid is None and stem in frame_ids):
            continue
        kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        write_text_atomic(index, "".join(kept), durable=True)
    return dropped


def scrub_derived(artifacts_dir: Path | None, frame_keys: Iterable[tuple[str, str]],
                  hashes: Iterable[str | None]) -> DerivedScrub:
    """Remove the frames ``frame_keys`` (``(camera_id, frame_id)``) whose images had
    ``hashes`` from the embedding caches and frame indexes under ``artifacts_dir``."""
    if artifacts_dir is None:
        return DerivedScrub()
    artifacts_dir = Path(artifacts_dir)
    out = scrub_embedding_caches(artifacts_dir / EMBEDDING_CACHE,
                                 {h for h in hashes if h})
    by_camera: dict[str, set[str]] = {}
    for camera_id, frame_id in frame_keys:
        by_camera.setdefault(camera_id, set()).add(frame_id)
    for camera_id, ids in sorted(by_camera.items()):
        if "/" in camera_id or camera_id.startswith("."):  # ids are validated; be sure
            continue
        out.index_lines_removed += scrub_frame_index(
            artifacts_dir / FRAME_INDEX / f"{camera_id}.jsonl", ids)
    if out.embeddings_removed or out.caches_deleted or out.index_lines_removed:
        logger.info("derived copies of %d erased frame(s) removed: %d cached embeddings, %d "
                    "unreadable caches, %d frame index lines", sum(map(len, by_camera.values())),
                    out.embeddings_removed, len(out.caches_deleted), out.index_lines_removed)
    return out


__all__ = [
    "EMBEDDING_CACHE",
    "FRAME_INDEX",
    "DerivedScrub",
    "default_artifacts_dir",
    "has_embedding_caches",
    "image_sha256",
    "scrub_derived",
    "scrub_embedding_caches",
    "scrub_frame_index",
]
