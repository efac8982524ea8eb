"""Atomic file-system writes: a failed step leaves no half-written artifact behind."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def write_text_atomic(path: Path, text: str, *, parents: bool = False) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``.

    ``parents=True`` creates missing parent folders first.
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def swap_dir_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``; an older ``final`` is renamed aside,
    restored if the rename fails, and deleted once the new one is in place."""
    aside: Path | None = None
    if final.exists() or final.is_symlink():
        aside = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:12]}"
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
