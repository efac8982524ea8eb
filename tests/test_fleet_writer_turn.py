"""fleet.db.Database.writer_turn: SQLite writers of every gateway process take turns on one
kernel lock (woken at once) instead of meeting in SQLite's sleeping busy handler; and
insert_new_frames skips stored frames in one statement."""

from __future__ import annotations

import fcntl
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleet.db import Base, Database, FrameRow, insert_new_frames


def _turn_taken(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_one_writer_turn_across_database_objects(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    first, second = Database(url), Database(url)  # as two worker processes would
    turn = tmp_path / "fleet.db.writer-turn"
    entered = threading.Event()

    def other() -> None:
        with second.writer_turn():
            entered.set()

    try:
        with first.writer_turn():
            assert _turn_taken(turn)
            t = threading.Thread(target=other)
            t.start()
            t.join(0.2)  # not a timing assertion: only gives it the chance to get in wrongly
            assert not entered.is_set()
        t.join(30)
        assert entered.is_set() and not _turn_taken(turn)
    finally:
        first.dispose()
        second.dispose()


def test_no_turn_file_for_other_databases() -> None:
    db = Database("postgresql://user@127.0.0.1:1/none")  # never connects
    with db.writer_turn():
        pass
    assert db._turn_path is None


def _row(frame_id: str) -> dict[str, object]:
    now = datetime.now(UTC)
    return {"camera_id": "cam", "frame_id": frame_id, "device_id": "dev", "captured_at": now,
            "received_at": now, "path": f"cam/x/{frame_id}.jpg", "width": 4, "height": 4,
            "size_bytes": 1, "sha256": "0" * 64, "model_version": None, "importance": 1.0,
            "reasons": [], "n_detections": 0, "recovered": False}


@pytest.mark.parametrize("first_batch", [["a", "b"], ["b"]])
def test_insert_new_frames_returns_what_it_inserted(tmp_path: Path,
                                                    first_batch: list[str]) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    Base.metadata.create_all(db.engine, tables=[FrameRow.__table__])
    try:
        with db.write() as s:
            assert insert_new_frames(s, [_row(f) for f in first_batch]) == {
                ("cam", f) for f in first_batch}
            s.commit()
        with db.write() as s:
            got = insert_new_frames(s, [_row("a"), _row("b"), _row("c"), _row("c")])
            s.commit()
        assert got == {("cam", f) for f in {"a", "b", "c"} - set(first_batch)}
        with db.read() as s:
            assert s.query(FrameRow).count() == 3
    finally:
        db.dispose()
