"""Start-up reconcile of the object-store frame store (moto's server; fleet.reconcile_objects):
records without a row get one, old JPEGs without a record go, young objects are left to
the upload that may be in flight, the work per start is bounded, two replicas may race."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleet import migrations
from fleet.db import Database, Device, FrameRow
from fleet.reconcile_objects import reconcile_object_store
from roadloop.data.object_frames import S3FrameStore, open_frame_store

from . import test_fleet_gateway as gateway_tests
from .helpers import encode_jpeg, synthetic_image
from .test_fleet_gateway import H, W, meta, post_frame
from .test_frames import T0, record

make_env = gateway_tests.make_env  # the gateway tests' fixtures, reused by name
frame_jpeg = gateway_tests.frame_jpeg

GRACE = timedelta(hours=1)
LATER = timedelta(hours=2)  # "now" for a run where the test's objects are past the grace


@pytest.fixture()
def store(s3_server: Any, tmp_path: Path) -> S3FrameStore:
    s = open_frame_store(f"s3://{s3_server.new_bucket('recon')}/fleet",
                         cache_dir=tmp_path / "cache", client=s3_server.client())
    assert isinstance(s, S3FrameStore)
    return s


@pytest.fixture()
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """SQLite; PostgreSQL when the test is parametrized with ``db=postgresql``."""
    on_pg = getattr(request, "param", "sqlite") == "postgresql"
    d = Database(request.getfixturevalue("postgres_server").new_database("recon") if on_pg
                 else f"sqlite:///{tmp_path / 'fleet.db'}")
    migrations.upgrade(d)
    with d.write() as session:
        session.add(Device(device_id="dev-1", camera_id="cam_a", scopes="camera:write",
                           agent_version="1", enrolled_at=T0, updated_at=T0))
        session.commit()
    yield d
    d.dispose()


def _run(db: Database, store: S3FrameStore, *, later: timedelta = LATER,
         max_objects: int = 1000) -> Any:
    return reconcile_object_store(db, store, lambda: T0, grace=GRACE, max_objects=max_objects,
                                  wall=lambda: datetime.now(UTC) + later)


def _write(store: S3FrameStore, frame_id: str, *, camera_id: str = "cam_a",
           at: datetime = T0) -> bytes:
    img = synthetic_image(len(frame_id) + ord(frame_id[-1]))
    jpeg = encode_jpeg(img)
    store.write_frame(record(frame_id, camera_id=camera_id, at=at, image=img), jpeg)
    return jpeg


def _rows(db: Database) -> dict[str, FrameRow]:
    with db.read() as session:
        return {r.frame_id: r for r in session.scalars(select(FrameRow))}


def _keys(store: S3FrameStore) -> list[str]:
    out = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return sorted(o["Key"].removeprefix("fleet/") for o in out)


def test_old_leftovers_are_repaired_young_ones_left(db: Database, store: S3FrameStore) -> None:
    jpeg = _write(store, "f-crash")  # record in, row never committed
    store.client.put_object(Bucket=store.bucket, Key="fleet/cam_a/2026-03-01/f-half.jpg",
                            Body=jpeg)  # JPEG in, record never PUT
    _write(store, "f-other", camera_id="cam_z")  # a camera never enrolled here

    young = _run(db, store, later=timedelta(0))  # all of it may be an upload in flight
    assert (young.young_objects_left, young.recovered_rows, young.removed_orphan_images) == (
        3, 0, 0)
    assert not _rows(db) and "cam_a/2026-03-01/f-half.jpg" in _keys(store)

    report = _run(db, store)
    assert report.finished and report.scanned_folders == 2 and report.scanned_objects == 5
    assert (report.recovered_rows, report.removed_orphan_images, report.unowned_frames) == (
        1, 1, 1)
    row = _rows(db)["f-crash"]
    assert row.recovered and row.device_id == "dev-1" and row.received_at == T0
    assert row.path == "cam_a/2026-03-01/f-crash.jpg" and row.size_bytes == len(jpeg)
    assert row.sha256 == hashlib.sha256(jpeg).hexdigest() and row.captured_at == T0
    assert store.image_path(row.path).read_bytes() == jpeg
    assert "cam_a/2026-03-01/f-half.jpg" not in _keys(store) and store.fsck().clean
    again = _run(db, store)  # idempotent: a second replica starting next finds nothing
    assert (again.recovered_rows, again.removed_orphan_images) == (0, 0)
    assert set(_rows(db)) == {"f-crash"}


def test_work_per_start_is_bounded_and_resumes(db: Database, store: S3FrameStore) -> None:
    for i in range(3):  # three date folders, two keys each
        _write(store, f"d{i}", at=T0 + timedelta(days=i))
    first = _run(db, store, max_objects=3)  # stops after the folder that crosses the cap
    assert (first.started_after, first.finished, first.scanned_folders) == ("", False, 2)
    assert set(_rows(db)) == {"d0", "d1"}
    second = _run(db, store, max_objects=3)
    assert second.started_after == "cam_a/2026-03-02/d1.json"
    assert second.finished and second.scanned_folders == 1 and set(_rows(db)) == {
        "d0", "d1", "d2"}
    third = _run(db, store, max_objects=3)  # back at the top
    assert third.started_after == "" and third.recovered_rows == 0


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_a_row_another_replica_inserted_first_is_skipped(
    db: Database, store: S3FrameStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(store, "r1")
    _write(store, "r2")
    real_load = store.load_frame

    def other_replica_first(stem: str) -> Any:
        loaded = real_load(stem)
        if stem.endswith("/r1"):  # the other replica commits r1 between our check and insert
            with db.write() as session:
                session.add(FrameRow(camera_id="cam_a", frame_id="r1", device_id="dev-1",
                                     captured_at=T0, received_at=T0, path="x", width=1,
                                     height=1, size_bytes=1, recovered=True))
                session.commit()
        return loaded

    monkeypatch.setattr(store, "load_frame", other_replica_first)
    report = _run(db, store)
    assert (report.recovered_rows, report.rows_inserted_elsewhere) == (1, 1)
    assert set(_rows(db)) == {"r1", "r2"} and _rows(db)["r1"].path == "x"


def test_orphan_delete_checks_again(store: S3FrameStore) -> None:
    """Between the listing and the delete an upload may land: a record or a fresh JPEG."""
    stem = "cam_a/2026-03-01/o1"
    store.client.put_object(Bucket=store.bucket, Key=f"fleet/{stem}.jpg", Body=b"x")
    store.client.put_object(Bucket=store.bucket, Key=f"fleet/{stem}.json", Body=b"{}")
    future, past = datetime.now(UTC) + LATER, datetime.now(UTC) - LATER
    assert not store.delete_orphan_image(stem, older_than=future)  # its record came in
    store.client.delete_object(Bucket=store.bucket, Key=f"fleet/{stem}.json")
    assert not store.delete_orphan_image(stem, older_than=past)  # re-PUT since: young
    assert store.delete_orphan_image(stem, older_than=future)
    assert _keys(store) == [] and not store.delete_orphan_image(stem, older_than=future)


def test_gateway_start_reconciles_the_object_store(
    make_env: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch, frame_jpeg: bytes,
) -> None:
    """A restart of a gateway on S3 gives a frame stored before the crash its row."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_server.new_bucket('gw')}/frames"
    opts = {"frame_store_url": url, "s3_endpoint_url": s3_server.endpoint_url,
            "reconcile_orphan_grace_s": 0}
    env = make_env("home", **opts)
    dev = env.enroll()
    assert post_frame(env.client, dev["access_token"], meta("f-ok"), frame_jpeg).status_code == 201
    crashed = record("f-crash").model_copy(update={
        "camera_id": "cam-a", "captured_at": gateway_tests.T0, "width": W, "height": H,
        "source": f"agent:{dev['device_id']}"})
    env.gw.store.write_frame(crashed, frame_jpeg)
    env.client.__exit__(None, None, None)

    env2 = make_env("home", **opts)  # same home and bucket: restart
    rows = {r.frame_id: r for r in env2.rows()}
    assert set(rows) == {"f-ok", "f-crash"} and rows["f-crash"].recovered
    assert not rows["f-ok"].recovered and rows["f-crash"].device_id == dev["device_id"]
    again = post_frame(env2.client, dev["access_token"], meta("f-crash"), frame_jpeg)
    assert again.status_code == 409
