"""The fleet gateway on PostgreSQL (its production database), on a real server on loopback
(``postgres_server`` in conftest: skips when the server binaries are not installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from roadloop.data.frame_records import FrameRecord
from roadloop.data.frames import FrameStore

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import (
    T0,
    _hb,
    assert_clear_4xx,
    assert_one_token_one_winner,
    bearer,
    meta,
    post_frame,
    run_concurrently,
)

# The gateway tests' fixtures, reused here by name.
frame_jpeg = gateway_tests.frame_jpeg
make_env = gateway_tests.make_env

@pytest.fixture()
def pg_env(postgres_server: Any, make_env: Any) -> Any:
    """A gateway on its own new database of the cluster."""
    return make_env(database_url=postgres_server.new_database("fleet"))


def test_enroll_upload_replay_heartbeat_on_postgres(pg_env: Any, frame_jpeg: bytes) -> None:
    assert pg_env.gw.db.engine.dialect.name == "postgresql"
    dev = pg_env.enroll()
    r = post_frame(pg_env.client, dev["access_token"], meta("f-1"), frame_jpeg)
    assert r.status_code == 201, r.text
    assert_clear_4xx(post_frame(pg_env.client, dev["access_token"], meta("f-1"), frame_jpeg),
                     409, "already stored")
    for _ in range(2):  # the second is a duplicate of the first
        hb = pg_env.client.post("/v1/heartbeats", json=_hb("cam-a", T0),
                                headers=bearer(dev["access_token"]))
        assert hb.status_code == 202, hb.text
    assert hb.json()["duplicate"] is True
    series = pg_env.client.get("/v1/cameras/cam-a/heartbeats", headers=bearer(pg_env.admin))
    assert len(series.json()) == 1 and series.json()[0]["payload"]["per_class_counts"] == {"car": 4}
    assert [(row.camera_id, row.frame_id) for row in pg_env.rows()] == [("cam-a", "f-1")]


def test_one_token_enrolls_one_device_on_postgres(pg_env: Any) -> None:
    """Concurrent enrollments with one token: the row lock lets exactly one through."""
    assert_one_token_one_winner(pg_env, refresh_camera="cam-z")


def test_one_camera_one_live_device_on_postgres(pg_env: Any) -> None:
    """Concurrent enrollments of one camera with different tokens: the unique index decides,
    and a losing token is not used up."""
    tokens = [pg_env.enrollment_token() for _ in range(6)]
    status: dict[str, int] = {}

    def enroll(tok: str) -> None:
        body = {"enrollment_token": tok, "camera_id": "cam-shared", "agent_version": "1"}
        status[tok] = pg_env.client.post("/v1/enroll", json=body).status_code

    run_concurrently(enroll, [(t,) for t in tokens])
    assert sorted(status.values()) == [201] + [409] * 5
    devices = pg_env.client.get("/v1/devices", headers=bearer(pg_env.admin)).json()
    (winner,) = [d for d in devices if d["camera_id"] == "cam-shared"]
    r = pg_env.client.post(f"/v1/devices/{winner['device_id']}/revoke",
                           headers=bearer(pg_env.admin))
    assert r.status_code == 200, r.text
    loser = next(t for t, code in status.items() if code == 409)
    body = {"enrollment_token": loser, "camera_id": "cam-shared", "agent_version": "1"}
    again = pg_env.client.post("/v1/enroll", json=body)
    assert again.status_code == 201, again.text


def test_database_refuses_a_second_live_device_for_a_camera(pg_env: Any) -> None:
    """The enrollment race above is decided by this index; here it is hit directly."""
    from datetime import UTC, datetime

    from sqlalchemy.exc import IntegrityError

    from fleet.db import Device

    now = datetime.now(UTC)

    def device(i: int, revoked: bool = False) -> Device:
        return Device(device_id=f"dev-{i}", camera_id="cam-q", status="active", scopes="camera:write",
                      agent_version="1", enrolled_at=now, updated_at=now,
                      revoked_at=now if revoked else None)

    with pg_env.gw.db.write() as session:
        session.add_all([device(1, revoked=True), device(2)])  # a revoked one does not count
        session.commit()
    with pg_env.gw.db.write() as session, pytest.raises(IntegrityError):
        session.add(device(3))
        session.flush()


def test_bare_postgresql_url_uses_the_installed_driver(postgres_server: Any) -> None:
    from fleet import migrations
    from fleet.db import Database

    url = postgres_server.new_database("bare").replace("postgresql+psycopg2://", "postgresql://")
    db = Database(url)
    migrations.upgrade(db)
    assert db.engine.dialect.driver == "psycopg2"
    db.engine.dispose()


def test_database_url_is_used_not_sqlite(pg_env: Any) -> None:
    home = Path(pg_env.settings.home)
    assert not (home / "fleet" / "fleet.db").exists()


def test_nul_is_a_422_and_a_nul_orphan_does_not_stop_a_restart(
        postgres_server: Any, make_env: Any, frame_jpeg: bytes) -> None:
    """PostgreSQL cannot store NUL in text: such a value was a 500 that left the frame's
    files without a row, and the start-up reconcile then failed to insert it at every start."""
    url = postgres_server.new_database("fleet")
    env = make_env("pg-home", database_url=url)
    dev = env.enroll()
    text = json.dumps(meta("f-nul")).replace('"model_version": "sha256:abc"',
                                                           '"model_version": "m\\u0000"')
    assert "\\u0000" in text
    assert_clear_4xx(post_frame(env.client, dev["access_token"], text, frame_jpeg), 422, "NUL")
    hb = _hb("cam-a", T0)
    hb["model_version"] = "m\x00"
    r = env.client.post("/v1/heartbeats", json=hb, headers=bearer(dev["access_token"]))
    assert_clear_4xx(r, 422, "NUL")
    # a frame an older gateway left behind (files written, insert refused)
    store = FrameStore(env.settings.frame_store)
    orphan = FrameRecord(frame_id="f-orphan", camera_id="cam-a", captured_at=T0,
                         source=f"agent:{dev['device_id']}", width=meta("x")["width"],
                         height=meta("x")["height"], model_version="m\x00")
    path = store.write_frame(orphan, frame_jpeg).path
    env.client.__exit__(None, None, None)
    env2 = make_env("pg-home", database_url=url)  # restart on the same database
    assert env2.rows() == [] and not path.exists()
    ok = post_frame(env2.client, dev["access_token"], meta("f-ok"), frame_jpeg)
    assert ok.status_code == 201, ok.text
