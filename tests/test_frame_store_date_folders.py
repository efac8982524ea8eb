# ruff: noqa: F811 - the fixtures of tests/test_fleet_gateway.py are imported by name
"""Only date folders hold frames (``roadloop.data.frame_records.is_date_folder``).

``write_frame`` makes ``<camera>/<YYYY-MM-DD>/`` folders only. The object store already
skipped any other folder; the folder store read them as frames, so an operator's copy in
``<camera>/backup/`` (or a folder named like a date that is none, ``2026-13-45``) was listed
twice by the platform's readers, counted by retention and **deleted** by it (its name said
nothing of its day, so it overlapped every range), and the gateway's start-up reconcile
deleted an image kept there as "an upload's leftover"."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fleet.reconcile import reconcile_frame_store
from roadloop.data.frame_records import FrameRecord, is_date_folder
from roadloop.data.frames import FrameStore
from roadloop.retention.policy import expire_frames

from .helpers import synthetic_jpeg
from .test_fleet_gateway import frame_jpeg, make_env, meta, post_frame  # noqa: F401 - fixtures

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
JPEG = synthetic_jpeg(0, (32, 24))
NOT_DATES = ("backup", "2026-13-45", "2026-02-30", "20260504", "2026-5-4")


def test_is_date_folder() -> None:
    assert is_date_folder("2026-05-04") and is_date_folder("2024-02-29")
    for name in (*NOT_DATES, "", ".2026-05-04", "2026-05-04 ", "２０２６-05-04"):
        assert not is_date_folder(name), name


def _copy_out(store: FrameStore, image: Path, folder: str) -> Path:
    """A copy of a stored frame's two files in ``<camera>/<folder>/``, as an operator makes."""
    target = image.parent.parent / folder / image.name
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(image, target)
    shutil.copyfile(image.with_suffix(".json"), target.with_suffix(".json"))
    return target


@pytest.fixture()
def store_with_copies(tmp_path: Path) -> tuple[FrameStore, list[Path]]:
    store = FrameStore(tmp_path / "frames")
    rec = FrameRecord(frame_id="old", camera_id="cam-a", captured_at=NOW - timedelta(days=40),
                      source="test", width=32, height=24)
    image = store.write_frame(rec, JPEG).path
    return store, [_copy_out(store, image, folder) for folder in NOT_DATES]


def test_readers_see_each_frame_once(store_with_copies: tuple[FrameStore, list[Path]]) -> None:
    store, _ = store_with_copies
    assert [r.frame_id for r, _ in store.iter_frames("cam-a")] == ["old"]
    assert store.count("cam-a") == 1
    assert [(f.frame_id, f.day) for f in store.stored_frames("cam-a")] == [
        ("old", (NOW - timedelta(days=40)).date().isoformat())]
    report = store.fsck("cam-a")
    assert report.frames_ok == 1 and report.clean
    assert store.day_sizes("cam-a", "backup") == {}
    found = store.find_frame("cam-a", "old")
    assert found is not None and is_date_folder(found.parent.name)


def test_retention_leaves_other_folders_alone(
    store_with_copies: tuple[FrameStore, list[Path]]
) -> None:
    store, copies = store_with_copies
    expiry = expire_frames(store, NOW - timedelta(days=30), artifacts_dir=store.root / "none")
    assert [f.frame_id for f in expiry.deleted] == ["old"]
    assert store.find_frame("cam-a", "old") is None
    for copy in copies:
        assert copy.is_file() and copy.with_suffix(".json").is_file(), copy


def test_startup_reconcile_leaves_other_folders_alone(make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env("home")
    tok = env.enroll()["access_token"]
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    stored = env.gw.store.find_frame("cam-a", "f-1")
    assert stored is not None
    copy = _copy_out(env.gw.store, stored, "backup")
    lone_image = copy.with_name("kept-by-hand.jpg")
    shutil.copyfile(stored, lone_image)

    report = reconcile_frame_store(env.gw.db, env.gw.store, env.gw.now, full=True)

    assert report.recovered_rows == 0 and report.removed_orphan_images == 0
    assert lone_image.is_file() and copy.is_file() and copy.with_suffix(".json").is_file()
    assert len(env.rows()) == 1
