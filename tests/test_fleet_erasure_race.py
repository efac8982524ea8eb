"""An erasure (``POST /v1/privacy/erase``) against uploads in other gateway processes or
replicas, late uploads of erased frames, and the start-up reconciles (``frame_erasures``).

Two gateways here share one database and one frame store, as replicas (or worker processes)
do: the in-process key locks of one do not exclude anything in the other. Each race is
staged with events at fixed points of the upload, never with sleeps.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

import fleet.intake
import roadloop.data.frames
from edge_agent.client import _frame_outcome
from edge_agent.gateway_answers import _retry_later
from fleet import migrations
from fleet.bounds import CLOCK_SKEW
from fleet.db import Database
from fleet.reconcile import reconcile_frame_store
from fleet.reconcile_objects import reconcile_object_store
from roadloop.data.frame_records import FrameRecord

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import T0, Env, H, W, _admin_token, bearer, meta, post_frame
from .test_frame_batch import batch_body, post_batch

make_env = gateway_tests.make_env
env = gateway_tests.env
frame_jpeg = gateway_tests.frame_jpeg

WINDOW = {"since": (T0 - timedelta(hours=1)).isoformat(),
          "until": (T0 + timedelta(hours=1)).isoformat()}


# --------------------------------------------------------------------------- helpers
def replicas(make_env: Any, tmp_path: Path, database_url: str | None) -> tuple[Env, Env]:
    """Two gateways on one database and one frame store."""
    shared = tmp_path / "shared"
    url = database_url or f"sqlite:///{shared / 'fleet.db'}"
    a = make_env("a", database_url=url, frame_store=shared / "frames")
    b = make_env("b", database_url=url, frame_store=shared / "frames")
    return a, b


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").new_database("erasure")


def erase(env: Env, camera: str = "cam-a", **window: str) -> httpx.Response:
    return env.client.post("/v1/privacy/erase", headers=bearer(env.admin),
                           json={"camera_id": camera, **(window or WINDOW)})


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def rows_of(env: Env, frame_id: str) -> list[Any]:
    return [r for r in env.rows() if r.frame_id == frame_id]


# --------------------------------------------------------------------------- the races
def test_erasure_while_an_upload_on_another_replica_waits_to_commit(
        make_env: Any, tmp_path: Path, database_url: str | None, frame_jpeg: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """B wrote the frame's files and is about to hand its row to the committer; A erases the
    range (deletes the files: no row yet). B must not answer 201 for the frame: its insert
    sees the erasure and refuses it for good (410), leaving neither row nor files."""
    a, b = replicas(make_env, tmp_path, database_url)
    dev = a.enroll("cam-a")
    written, go = threading.Event(), threading.Event()
    real_submit = b.gw.committer.submit

    def submit_later(fn: Any, timeout: float = 60.0) -> Any:
        written.set()
        assert go.wait(60)
        return real_submit(fn, timeout)

    monkeypatch.setattr(b.gw.committer, "submit", submit_later)
    t, answer = in_thread(lambda: post_frame(b.client, dev["access_token"], meta("x-1"),
                                             frame_jpeg))
    try:
        assert written.wait(60)
        assert b.gw.store.find_frame("cam-a", "x-1") is not None
        r = erase(a)
        assert r.status_code == 200, r.text
        assert (r.json()["frames_deleted"], r.json()["files_without_row"]) == (1, 1)
    finally:
        go.set()
        t.join(60)
    assert answer[0].status_code == 410, answer[0].text
    assert "erased" in answer[0].json()["detail"]
    assert rows_of(a, "x-1") == []
    assert a.gw.store.find_frame("cam-a", "x-1") is None


def test_erasure_spares_the_image_of_a_later_frame_whose_record_is_being_written(
        make_env: Any, tmp_path: Path, frame_jpeg: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """B has written the image of a frame captured the same day as the erased range, but
    hours after it, and not yet its record: the folder lists an image without its record, as
    a crash leaves one. A took it as a leftover of the range's day and deleted it; B then
    wrote the record, committed the row and answered 201 for a frame without pixels."""
    a, b = replicas(make_env, tmp_path, None)
    dev = a.enroll("cam-a")
    image_written, go = threading.Event(), threading.Event()
    real_write = roadloop.data.frames.write_bytes_atomic

    def record_later(path: Path | str, data: bytes, **kwargs: Any) -> None:
        if Path(path).name == "late-1.json":
            image_written.set()
            assert go.wait(60)
        real_write(path, data, **kwargs)

    monkeypatch.setattr(roadloop.data.frames, "write_bytes_atomic", record_later)
    later = meta("late-1", captured_at=(T0 + timedelta(hours=5)).isoformat())  # same day
    t, answer = in_thread(lambda: post_frame(b.client, dev["access_token"], later, frame_jpeg))
    try:
        assert image_written.wait(60)
        r = erase(a)
        assert r.status_code == 200, r.text
        assert r.json()["frames_deleted"] == 0
    finally:
        go.set()
        t.join(60)
    assert answer[0].status_code == 201, answer[0].text
    assert [r.frame_id for r in a.rows()] == ["late-1"]
    assert a.gw.store.find_frame("cam-a", "late-1") is not None  # image and record


def test_erasure_waits_for_an_insert_in_flight_on_postgres(
        make_env: Any, tmp_path: Path, postgres_server: Any, frame_jpeg: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """B's transaction has inserted the frame's row but not committed it when A starts the
    erasure. A must wait for that commit (the camera's advisory lock), then delete the row
    and the files: B's 201 is followed by a complete erasure, never a row without files."""
    url = postgres_server.new_database("erasure_wait")
    a, b = replicas(make_env, tmp_path, url)
    dev = a.enroll("cam-a")
    inserted, go = threading.Event(), threading.Event()
    real_insert = fleet.intake.insert_new_frames

    def insert_and_hold(session: Any, rows: list[dict[str, Any]]) -> Any:
        out = real_insert(session, rows)
        if any(r["frame_id"] == "y-1" for r in rows):
            inserted.set()
            assert go.wait(60)
        return out

    monkeypatch.setattr(fleet.intake, "insert_new_frames", insert_and_hold)
    upload, answer = in_thread(lambda: post_frame(b.client, dev["access_token"], meta("y-1"),
                                                  frame_jpeg))
    erasure: threading.Thread | None = None
    try:
        assert inserted.wait(60)
        erasure, erased = in_thread(lambda: erase(a))
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        with a.gw.db.engine.connect() as conn:
            while not conn.execute(text(waiting)).scalar():
                assert erasure.is_alive(), "the erasure did not wait for the insert in flight"
                erasure.join(0.02)
                conn.rollback()
    finally:
        go.set()
        upload.join(60)
        if erasure is not None:
            erasure.join(60)
    assert answer[0].status_code == 201, answer[0].text
    assert erased[0].status_code == 200, erased[0].text
    assert (erased[0].json()["frames_deleted"], erased[0].json()["files_without_row"]) == (1, 0)
    assert rows_of(a, "y-1") == []
    assert a.gw.store.find_frame("cam-a", "y-1") is None


# --------------------------------------------------------------------------- late uploads
def test_an_erased_range_stays_erased(env: Env, frame_jpeg: bytes) -> None:
    """A late upload (or a retry) of an erased frame is refused with 410 and its files go;
    frames outside the range are stored; in a batch only the erased frame is refused."""
    dev = env.enroll("cam-a")
    tok = dev["access_token"]
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    r = erase(env)
    assert r.status_code == 200 and r.json()["frames_deleted"] == 1, r.text
    again = post_frame(env.client, tok, meta("f-1"), frame_jpeg)
    assert again.status_code == 410, again.text
    assert "erased" in again.json()["detail"] and "f-1" in again.json()["detail"]
    assert env.rows() == [] and env.gw.store.find_frame("cam-a", "f-1") is None
    later = (T0 + timedelta(hours=2)).isoformat()
    assert post_frame(env.client, tok, meta("f-2", captured_at=later), frame_jpeg
                      ).status_code == 201
    body = batch_body([(meta("f-3"), frame_jpeg), (meta("f-4", captured_at=later), frame_jpeg)])
    out = post_batch(env, tok, body).json()
    assert [x["status"] for x in out["results"]] == [410, 201]
    assert (out["stored"], out["refused"], out["retry_later"]) == (1, 1, 0)
    assert sorted(r.frame_id for r in env.rows()) == ["f-2", "f-4"]
    assert env.gw.store.find_frame("cam-a", "f-3") is None
    # The agent drops a 410 for good, whichever route answered it.
    assert _frame_outcome({"status": 410, "detail": "erased"}, None).kind == "rejected"
    assert not _retry_later(410)


def _stored_ids(env: Env) -> set[str]:
    """Frame ids with files in the folder store (any day, complete or not)."""
    return {p.stem for p in env.gw.store.root.glob("cam-a/*/*") if p.suffix in (".jpg", ".json")}


def test_a_stored_frame_replayed_with_an_erased_time_keeps_its_files(env: Env,
                                                                     frame_jpeg: bytes) -> None:
    """A stored frame, outside the erased range; the device sends its id again claiming a
    capture time inside the range, the same day. The upload got 410 and the gateway deleted
    the files at that path — the stored frame's — while its row stayed: an acknowledged frame
    without pixels, which no reconcile repairs. It is a frame id already stored: 409."""
    tok = env.enroll("cam-a")["access_token"]
    assert post_frame(env.client, tok, meta("f-keep"), frame_jpeg).status_code == 201
    path = env.gw.store.find_frame("cam-a", "f-keep")
    assert path is not None
    later = {"since": (T0 + timedelta(hours=2)).isoformat(),
             "until": (T0 + timedelta(hours=3)).isoformat()}
    assert erase(env, **later).json()["frames_deleted"] == 0
    inside = (T0 + timedelta(hours=2, minutes=30)).isoformat()
    r = post_frame(env.client, tok, meta("f-keep", captured_at=inside), frame_jpeg)
    assert r.status_code == 409, r.text
    inside_next_day = {"since": (T0 + timedelta(days=1)).isoformat(),
                       "until": (T0 + timedelta(days=1, hours=1)).isoformat()}
    assert erase(env, **inside_next_day).json()["frames_deleted"] == 0
    other_day = (T0 + timedelta(days=1, minutes=30)).isoformat()  # its copy is written, then
    r = post_frame(env.client, tok, meta("f-keep", captured_at=other_day), frame_jpeg)
    assert r.status_code == 409, r.text  # removed again
    assert [(x.frame_id, x.path) for x in env.rows()] == [
        ("f-keep", path.relative_to(env.gw.store.root).as_posix())]
    assert env.gw.store.find_frame("cam-a", "f-keep") == path
    assert env.gw.store.fsck().clean and _stored_ids(env) == {"f-keep"}


def test_in_a_batch_only_the_first_copy_of_a_frame_id_is_stored_or_erased(
        env: Env, frame_jpeg: bytes) -> None:
    """Two copies of one frame id in a batch, one claiming a time in an erased range. The
    erasure lookup was by frame id only, so both copies were refused for good (410) and the
    one outside the range, 201 when sent alone, was lost."""
    tok = env.enroll("cam-a")["access_token"]
    r = erase(env, since=(T0 + timedelta(hours=2)).isoformat(),
              until=(T0 + timedelta(hours=3)).isoformat())
    assert r.status_code == 200, r.text
    outside = meta("f-x")
    inside = meta("f-x", captured_at=(T0 + timedelta(hours=2, minutes=30)).isoformat())
    out = post_batch(env, tok, batch_body([(outside, frame_jpeg), (inside, frame_jpeg)])).json()
    assert [x["status"] for x in out["results"]] == [201, 409]
    assert [x.frame_id for x in env.rows()] == ["f-x"]
    assert env.gw.store.find_frame("cam-a", "f-x") is not None
    # The other order: the first copy is erased (410); the second, on another day outside
    # the range, is a 409 like any later copy, and leaves no files for a reconcile to revive.
    inside_y = meta("f-y", captured_at=(T0 + timedelta(hours=2, minutes=30)).isoformat())
    next_day = meta("f-y", captured_at=(T0 + timedelta(days=1)).isoformat())
    out = post_batch(env, tok, batch_body([(inside_y, frame_jpeg), (next_day, frame_jpeg)]))
    assert [x["status"] for x in out.json()["results"]] == [410, 409]
    assert [x.frame_id for x in env.rows()] == ["f-x"]
    assert env.gw.store.fsck().clean and _stored_ids(env) == {"f-x"}


def test_a_retry_finding_the_files_of_an_erased_frame_removes_them(
        env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files an upload wrote after the erasure listed the store, left in place when its
    commit failed (a 503: the retry is to find them): the retry finds them and removes them
    with its 410."""
    dev = env.enroll("cam-a")
    assert erase(env).status_code == 200
    real_submit = env.gw.committer.submit

    def fail_once(fn: Any, timeout: float = 60.0) -> Any:
        monkeypatch.setattr(env.gw.committer, "submit", real_submit)
        raise fleet.intake.CommitFailed("the database went away")

    monkeypatch.setattr(env.gw.committer, "submit", fail_once)
    r = post_frame(env.client, dev["access_token"], meta("f-1"), frame_jpeg)
    assert r.status_code == 503, r.text
    assert env.gw.store.find_frame("cam-a", "f-1") is not None  # left for the retry
    r = post_frame(env.client, dev["access_token"], meta("f-1"), frame_jpeg)
    assert r.status_code == 410, r.text
    assert env.gw.store.find_frame("cam-a", "f-1") is None and env.rows() == []


def test_a_range_into_the_future_refuses_frames_for_a_day_at_most(
        env: Env, frame_jpeg: bytes) -> None:
    """``until`` far ahead: the erasure refuses capture times up to one day (the clock skew
    the gateway accepts) past its clock, not until ``until``."""
    now = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)  # ahead of the wall
    env.clock.now = now
    env.admin = _admin_token(env.gw, env.clock)
    tok = env.enroll("cam-a")["access_token"]
    r = erase(env, since="2000-01-01T00:00:00Z", until="2099-01-01T00:00:00Z")
    assert r.status_code == 200, r.text
    from fleet.db import FrameErasureRow

    with env.gw.db.read() as s:
        (row,) = s.scalars(select(FrameErasureRow))
    assert (row.camera_id, row.erased_at, row.covers_until) == ("cam-a", now, now + CLOCK_SKEW)
    assert row.until == datetime(2099, 1, 1, tzinfo=UTC)
    env.clock.advance(600)
    inside = (now + CLOCK_SKEW - timedelta(minutes=1)).isoformat()
    after = (now + CLOCK_SKEW + timedelta(minutes=1)).isoformat()
    assert post_frame(env.client, tok, meta("f-in", captured_at=inside), frame_jpeg
                      ).status_code == 410
    assert post_frame(env.client, tok, meta("f-after", captured_at=after), frame_jpeg
                      ).status_code == 201


# --------------------------------------------------------------------------- reconciles
def _leftover(env: Env, frame_id: str, captured_at: datetime, jpeg: bytes,
              device_id: str) -> FrameRecord:
    """Files written, row never committed (a crash before the insert or its refusal)."""
    rec = FrameRecord(frame_id=frame_id, camera_id="cam-a", captured_at=captured_at, width=W,
                      height=H, source=f"agent:{device_id}")
    env.gw.store.write_frame(rec, jpeg)
    return rec


def test_folder_reconcile_does_not_bring_an_erased_frame_back(
        env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll("cam-a")
    assert erase(env).status_code == 200
    _leftover(env, "f-erased", T0, frame_jpeg, dev["device_id"])
    _leftover(env, "f-kept", T0 + timedelta(hours=2), frame_jpeg, dev["device_id"])
    report = reconcile_frame_store(env.gw.db, env.gw.store, env.clock, full=True)
    assert (report.recovered_rows, report.removed_erased_frames) == (1, 1)
    assert [r.frame_id for r in env.rows()] == ["f-kept"]
    assert env.gw.store.find_frame("cam-a", "f-erased") is None


def test_object_store_reconcile_does_not_bring_an_erased_frame_back(
        make_env: Any, s3_server: Any, frame_jpeg: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    env = make_env("home", frame_store_url=f"s3://{s3_server.new_bucket('erased')}/frames",
                   s3_endpoint_url=s3_server.endpoint_url)
    dev = env.enroll("cam-a")
    assert erase(env).status_code == 200
    _leftover(env, "f-erased", T0, frame_jpeg, dev["device_id"])
    _leftover(env, "f-kept", T0 + timedelta(hours=2), frame_jpeg, dev["device_id"])
    report = reconcile_object_store(
        env.gw.db, env.gw.store, env.clock, grace=timedelta(0), max_objects=10_000,
        wall=lambda: datetime.now(UTC) + timedelta(hours=1))  # both leftovers count as old
    assert (report.recovered_rows, report.removed_erased_frames) == (1, 1)
    assert [r.frame_id for r in env.rows()] == ["f-kept"]
    assert env.gw.store.find_frame("cam-a", "f-erased") is None


# --------------------------------------------------------------------------- migration
def test_0006_adds_the_erasure_table_to_a_0005_database(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        migrations.upgrade(db, "0005")
        result = migrations.upgrade(db)
        assert (result.before, result.after) == ("0005", migrations.head_revision())
        assert "frame_erasures" in migrations.status(db).gateway_tables
        assert migrations.status(db).differences == []
    finally:
        db.dispose()
