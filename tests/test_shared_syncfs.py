"""roadloop.shared_syncfs: one flush serves every caller that began before it started."""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from roadloop import shared_syncfs
from roadloop.data.frames import SYNC_TURN_FILE, FrameRecord, FrameStore
from roadloop.shared_syncfs import SharedSyncfs


class Flushes:
    def __init__(self, available: bool = True, fail: bool = False) -> None:
        self.calls = 0
        self.available, self.fail = available, fail

    def __call__(self, root: Path) -> bool:
        self.calls += 1
        if self.fail:
            raise OSError(5, "Input/output error", str(root))
        return self.available


def test_a_flush_that_started_after_the_call_covers_it(tmp_path: Path) -> None:
    flush_a, flush_b = Flushes(), Flushes()
    a = SharedSyncfs(tmp_path, tmp_path / "turn", flush_a)  # two processes' views: two fds
    b = SharedSyncfs(tmp_path, tmp_path / "turn", flush_b)
    before = time.monotonic_ns()
    assert a.sync() is True and flush_a.calls == 1
    # b was called before a's flush started: covered, no flush of its own.
    assert b.sync(called_ns=before) is True
    assert (flush_b.calls, b.shared) == (0, 1)
    # b called now (after a's flush started): it must flush itself.
    assert b.sync() is True and (flush_b.calls, b.flushes) == (1, 1)
    # and a call that began before b's flush is covered for a too.
    assert a.sync(called_ns=before) is True and flush_a.calls == 1
    a.close()
    b.close()


def test_a_failed_flush_records_nothing(tmp_path: Path) -> None:
    before = time.monotonic_ns()
    failing = SharedSyncfs(tmp_path, tmp_path / "turn", Flushes(fail=True))
    with pytest.raises(OSError):
        failing.sync()
    other = Flushes()
    assert SharedSyncfs(tmp_path, tmp_path / "turn", other).sync(called_ns=before)
    assert other.calls == 1  # nothing claimed the failed flush


def test_no_flush_available_is_reported_not_shared(tmp_path: Path) -> None:
    unavailable = Flushes(available=False)
    s = SharedSyncfs(tmp_path, tmp_path / "turn", unavailable)
    assert s.sync() is False and s.sync() is False and unavailable.calls == 2


def test_a_record_from_another_boot_covers_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    a = SharedSyncfs(tmp_path, tmp_path / "turn", Flushes())
    a.sync()
    monkeypatch.setattr(shared_syncfs, "boot_id", lambda: b"\x01" * 16)
    flush = Flushes()
    rebooted = SharedSyncfs(tmp_path, tmp_path / "turn", flush)
    rebooted.sync(called_ns=0)  # any time at all: the record is another boot's
    assert flush.calls == 1
    monkeypatch.setattr(shared_syncfs, "boot_id", lambda: b"\0" * 16)
    unknown = Flushes()
    s = SharedSyncfs(tmp_path, tmp_path / "turn", unknown)
    s.sync()
    s.sync(called_ns=0)  # its own record, but with an unknown boot id it trusts none
    assert unknown.calls == 2


def _flush_in_child(root: str, turn: str, out: str) -> None:
    flush = Flushes()
    SharedSyncfs(Path(root), Path(turn), flush).sync()
    Path(out).write_text(str(flush.calls))


def test_another_process_flush_counts(tmp_path: Path) -> None:
    before = time.monotonic_ns()
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_flush_in_child,
                        args=(str(tmp_path), str(tmp_path / "turn"), str(tmp_path / "out")))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and (tmp_path / "out").read_text() == "1"
    flush = Flushes()
    mine = SharedSyncfs(tmp_path, tmp_path / "turn", flush)
    assert mine.sync(called_ns=before) and flush.calls == 0
    assert mine.sync() and flush.calls == 1


def test_frame_store_sync_uses_the_shared_turn(tmp_path: Path) -> None:
    ok, encoded = cv2.imencode(".jpg", np.full((120, 160, 3), 90, np.uint8))
    assert ok
    frame_jpeg = encoded.tobytes()
    store = FrameStore(tmp_path)
    rec = FrameRecord(frame_id="f-1", camera_id="cam-a", captured_at=datetime.now(UTC),
                      source="test", width=160, height=120)
    store.write_frame(rec, frame_jpeg, decoded_size=(160, 120), durable=False)
    store.sync()
    turn = tmp_path / SYNC_TURN_FILE
    if os.uname().sysname == "Linux":
        assert turn.stat().st_size == shared_syncfs._RECORD.size
    assert store.cameras() == ["cam-a"]  # the turn file is not a camera
    report = store.fsck()
    assert report.clean and report.frames_ok == 1
