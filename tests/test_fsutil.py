"""roadloop.fsutil: the platform's one atomic write and file hash."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from roadloop.fsutil import (
    atomic_path,
    create_exclusive,
    sha256_file,
    write_bytes_atomic,
    write_text_atomic,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_write_replaces_whole_file_and_sets_exact_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    write_text_atomic(target, "old", parents=True)
    old_umask = os.umask(0o077)
    try:
        write_bytes_atomic(target, b"new", durable=True, mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _leftovers(target.parent) == []


def test_failed_writer_leaves_target_untouched_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"good"
    assert _leftovers(tmp_path) == []


def test_atomic_path_suffix_for_writers_that_append_one(tmp_path: Path) -> None:
    import numpy as np

    target = tmp_path / "cache.npz"
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, a=np.arange(3))  # np.savez would append .npz to any other name
    with np.load(target) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []


def test_create_exclusive_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    assert create_exclusive(key, b"first", mode=0o600) is True
    assert create_exclusive(key, b"second", mode=0o600) is False
    assert key.read_bytes() == b"first"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()
