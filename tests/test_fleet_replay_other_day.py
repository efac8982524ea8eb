# ruff: noqa: F811 - the fixtures of tests/test_fleet_gateway.py are imported by name
"""A replay of a stored frame id under another capture day (a buggy or hostile agent).

The frame id is unique per camera, so the replay is a 409. It must not leave a second,
complete copy under the other day's folder: every reader of the store (the platform's
datasets, the reconcile) would see the frame twice, once with a record the database never
accepted. Both frame stores (the local folder and S3 on moto's server), the single and the
batch route, and the start-up reconcile for a copy a crash left behind."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fleet.reconcile import reconcile_frame_store
from roadloop.data.frame_records import FrameRecord

from .helpers import synthetic_jpeg
from .test_fleet_gateway import (  # noqa: F401 - fixtures
    T0,
    Env,
    H,
    W,
    assert_clear_4xx,
    frame_jpeg,
    make_env,
    meta,
    post_frame,
)
from .test_frame_batch import batch_body, post_batch

NEXT_DAY = (T0 + timedelta(days=1)).isoformat()


@pytest.fixture(params=["folder", "s3"])
def make_store_env(request: pytest.FixtureRequest, make_env: Any,
                   monkeypatch: pytest.MonkeyPatch) -> Any:
    """Gateways on the local folder store, or on an S3 bucket of moto's server."""
    def _make(**settings: Any) -> Env:
        if request.param == "folder":
            return make_env("home", **settings)
        s3 = request.getfixturevalue("s3_server")
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        return make_env("home", frame_store_url=f"s3://{s3.new_bucket('replay')}/frames",
                        s3_endpoint_url=s3.endpoint_url, **settings)
    return _make


@pytest.fixture()
def store_env(make_store_env: Any) -> Env:
    return make_store_env()


def _frames(env: Env) -> list[tuple[str, str]]:
    """(frame_id, capture day) of every complete frame a reader of the store sees."""
    return [(rec.frame_id, rec.captured_at.date().isoformat())
            for rec, _ in env.gw.store.iter_frames("cam-a")]


def test_a_replay_under_another_day_is_a_409_and_leaves_no_copy(
    store_env: Env, frame_jpeg: bytes
) -> None:
    env = store_env
    tok = env.enroll()["access_token"]
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    assert_clear_4xx(post_frame(env.client, tok, meta("f-1", captured_at=NEXT_DAY), frame_jpeg),
                     409, "f-1 already stored")
    # The same inside a batch, beside a new frame; and a frame id twice in one batch.
    r = post_batch(env, tok, batch_body([
        (meta("f-1", captured_at=NEXT_DAY), frame_jpeg),
        (meta("f-2"), frame_jpeg),
        (meta("f-3"), frame_jpeg),
        (meta("f-3", captured_at=NEXT_DAY), frame_jpeg),
    ]))
    assert [(x["frame_id"], x["status"]) for x in r.json()["results"]] == [
        ("f-1", 409), ("f-2", 201), ("f-3", 201), ("f-3", 409)]
    day = T0.date().isoformat()
    assert _frames(env) == [("f-1", day), ("f-2", day), ("f-3", day)]
    assert [(row.frame_id, row.path) for row in sorted(env.rows(), key=lambda r: r.frame_id)] == [
        (f, f"cam-a/{day}/{f}.jpg") for f in ("f-1", "f-2", "f-3")]
    assert env.gw.store.fsck().clean


def test_an_upload_finding_another_uploads_frame_under_its_id_inserts_no_row(
    store_env: Env, frame_jpeg: bytes
) -> None:
    """The store holds a complete frame f-1 with no row yet (another worker's or replica's
    upload between its files and its commit, or a crash's), and a second upload of f-1 with
    other content arrives. It found the files (``already_existed``), then inserted a row
    built from its own bytes: a 201 for a row whose size and SHA-256 describe pixels the
    store does not hold. It is a 409 now, with no row; the store's frame keeps its own."""
    env = store_env
    tok = env.enroll()["access_token"]
    theirs = FrameRecord(frame_id="f-1", camera_id="cam-a", captured_at=T0, width=W, height=H,
                         source="agent:other-upload")
    env.gw.store.write_frame(theirs, synthetic_jpeg(5, (W, H)))
    r = post_frame(env.client, tok, meta("f-1"), frame_jpeg)
    assert_clear_4xx(r, 409, "f-1 already stored (with other content")
    assert env.rows() == []
    stored = env.gw.store.read_record("cam-a", "f-1")
    assert stored is not None and stored.source == "agent:other-upload"
    # The same upload once more (a retry of the frame it stored) is still its plain 409.
    assert post_frame(env.client, tok, meta("f-2"), frame_jpeg).status_code == 201
    assert_clear_4xx(post_frame(env.client, tok, meta("f-2"), frame_jpeg), 409,
                     "f-2 already stored")


def test_a_copy_the_replay_could_not_remove_waits_for_the_reconcile(
    store_env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal after the 409 fails (or the gateway dies before it): the copy stays
    until the start-up reconcile, which removes it and leaves the stored frame alone."""
    env = store_env
    tok = env.enroll()["access_token"]
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    stored = env.gw.store.find_frame("cam-a", "f-1")
    assert stored is not None
    # The copy a replay under the next day writes, as it stands after its refused insert.
    copy = FrameRecord.model_validate_json(stored.with_suffix(".json").read_bytes()) \
        if env.gw.store.is_local else env.gw.store.read_record("cam-a", "f-1")
    assert copy is not None
    copy = copy.model_copy(update={"captured_at": T0 + timedelta(days=1)})
    if env.gw.store.is_local:  # write_frame would find the stored frame: put the files there
        target = env.gw.store.frame_path(copy)
        target.parent.mkdir(parents=True)
        shutil.copyfile(stored, target)
        target.with_suffix(".json").write_text(copy.model_dump_json())
    else:
        assert not env.gw.store.write_frame(copy, frame_jpeg).already_existed
    day, next_day = T0.date().isoformat(), NEXT_DAY[:10]
    assert _frames(env) == [("f-1", day), ("f-1", next_day)]

    if env.gw.store.is_local:
        report = reconcile_frame_store(env.gw.db, env.gw.store, env.gw.now, full=True)
    else:
        from fleet.reconcile_objects import reconcile_object_store

        report = reconcile_object_store(  # "now" two hours on: the objects are past the grace
            env.gw.db, env.gw.store, env.gw.now, grace=timedelta(hours=1), max_objects=1000,
            wall=lambda: datetime.now(UTC) + timedelta(hours=2))
    assert report.removed_unstored_copies == 1 and report.recovered_rows == 0
    assert _frames(env) == [("f-1", day)]
    assert env.gw.store.find_frame("cam-a", "f-1") is not None
    assert env.gw.store.fsck().clean and len(env.rows()) == 1


def test_a_failed_removal_still_answers_409(
    store_env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = store_env
    tok = env.enroll()["access_token"]
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201

    def failing_remove(image_path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(env.gw.store, "remove_frame", failing_remove)
    assert_clear_4xx(post_frame(env.client, tok, meta("f-1", captured_at=NEXT_DAY), frame_jpeg),
                     409, "f-1 already stored")
    assert env.gw.stats.snapshot()["counters"].get("frames_duplicate_copy_removed", 0) == 0
    assert len(env.rows()) == 1


def test_an_upload_never_walks_the_cameras_date_folders(
    make_store_env: Any, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A camera has as many date folders as capture days its agent has claimed: thousands
    within the accepted range (2000-01-01 to tomorrow). What an upload costs must not grow
    with them: a new frame, its replay (409), a replay under another day and the read-back
    (``frame_read_back``) look in the record's own date folder only."""
    env = make_store_env(frame_read_back=True)
    tok = env.enroll()["access_token"]
    assert post_frame(env.client, tok, meta("f-0", captured_at="2001-01-01T00:00:00+00:00"),
                      frame_jpeg).status_code == 201

    def walks(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the gateway walked the camera's date folders")

    monkeypatch.setattr(env.gw.store, "find_frame", walks)
    if not env.gw.store.is_local:
        monkeypatch.setattr(env.gw.store, "_days", walks)
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    assert_clear_4xx(post_frame(env.client, tok, meta("f-1"), frame_jpeg), 409, "already")
    assert_clear_4xx(post_frame(env.client, tok, meta("f-0"), frame_jpeg), 409, "already")
    assert len(env.rows()) == 2
