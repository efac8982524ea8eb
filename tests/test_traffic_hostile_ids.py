"""Traffic ids a device cannot bend: query filters and cursors with a NUL (a 422 on SQLite and
PostgreSQL alike, not a 500 on the latter), event ids of another camera (refused, and never
able to hide that camera's events), record ids that name another interval (a resend under a
second id would count twice). The agent's own records still pass.

``TestClient`` against the gateway (the fixtures of tests/test_fleet_gateway.py; PostgreSQL
from ``postgres_server``, skipped without the server binaries).
"""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edge_agent.traffic.events import Crossing, FrameTraffic, TrafficEvent
from edge_agent.traffic.intervals import IntervalAccumulator
from fleet.traffic import record_rows
from fleet.traffic_schemas import TrafficIntervalIn
from roadloop.traffic import rollups

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import Env, assert_clear_4xx, bearer
from .test_fleet_traffic import START, URL, record, stored

make_env = gateway_tests.make_env
env = gateway_tests.env


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _events(env: Env) -> list[tuple[str, str]]:
    r = env.client.get("/v1/traffic/events", headers=bearer(env.admin))
    assert r.status_code == 200, r.text
    return [(e["camera_id"], e["event_id"]) for e in r.json()]


def _car_count(env: Env) -> int:
    r = env.client.get("/v1/traffic/counts", params={"class_name": "car"},
                       headers=bearer(env.admin))
    assert r.status_code == 200, r.text
    return sum(v["count"] for v in r.json())


# --------------------------------------------------------------------------- 1. NUL in queries
@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, make_env: Any) -> Env:
    """A gateway holding one record of cam-a, on SQLite or on PostgreSQL."""
    if request.param == "sqlite":
        built = make_env()
    else:
        server = request.getfixturevalue("postgres_server")
        built = make_env(database_url=server.new_database("fleet"))
    device = built.enroll("cam-a")["access_token"]
    assert built.client.post(URL, json=record(1), headers=bearer(device)).status_code == 201
    return built


@pytest.mark.parametrize(("url", "params", "words"), [
    ("/v1/traffic/counts", {"direction": "a\x00b"}, ["direction", "NUL"]),
    ("/v1/traffic/counts", {"class_name": "a\x00b"}, ["class_name", "NUL"]),
    ("/v1/traffic/intervals",
     {"cursor": _cursor(f"{START.isoformat()}|x\x00y".encode())}, ["cursor", "NUL"]),
])
def test_a_nul_in_a_traffic_query_is_a_422_naming_it_on_both_databases(
        any_db: Env, url: str, params: dict[str, str], words: list[str]) -> None:
    client = TestClient(any_db.client.app, raise_server_exceptions=False)
    assert_clear_4xx(client.get(url, params=params, headers=bearer(any_db.admin)), 422, *words)
    # the same filters without the NUL still answer
    clean = {k: v.replace("\x00", "") for k, v in params.items() if k != "cursor"}
    assert client.get(url, params=clean, headers=bearer(any_db.admin)).status_code == 200
    assert _car_count(any_db) == 3


# --------------------------------------------------------------------------- 2. event ids
def test_a_device_cannot_post_or_hide_another_cameras_event(env: Env) -> None:
    a = env.enroll("cam-a")["access_token"]
    b = env.enroll("cam-b")["access_token"]
    real = record(1)
    victim = real["events"][0]["event_id"]  # "cam-a.ev.1.<ts>"
    squat = record(7, camera="cam-b")
    squat["events"][0]["event_id"] = victim
    assert_clear_4xx(env.client.post(URL, json=squat, headers=bearer(b)), 422,
                     "events[0].event_id", victim, "cam-b.ev.")
    assert stored(env) == (0, 0)
    assert env.client.post(URL, json=real, headers=bearer(a)).status_code == 201
    assert _events(env) == [("cam-a", victim)]


@pytest.mark.parametrize("event_id", [
    "cam-a.b.ev.1.2",  # the id space of camera "cam-a.b"
    "cam-a.1.2",  # no ".ev."
    "cam-a.ev.1",  # one integer
    "cam-a.ev.1.2.3",
    "cam-a.ev.01.2",  # a second spelling of "cam-a.ev.1.2"
    "cam-a.ev.1.x",
    "cam-a.ev..2",
])
def test_an_event_id_outside_the_cameras_own_form_is_a_422(env: Env, event_id: str) -> None:
    device = env.enroll("cam-a")["access_token"]
    body = record(1)
    body["events"][0]["event_id"] = event_id
    assert_clear_4xx(env.client.post(URL, json=body, headers=bearer(device)), 422,
                     "event_id", "cam-a.ev.<agent run, ms>.<sequence>")
    assert stored(env) == (0, 0)


def test_stored_rows_of_two_cameras_with_one_event_id_both_list(env: Env) -> None:
    """Rows stored before event ids were checked: one camera's cannot hide the other's."""
    a = env.enroll("cam-a")["access_token"]
    victim = record(1)["events"][0]["event_id"]
    older = TrafficIntervalIn.model_validate(record(7, camera="cam-b"))
    older.events[0].event_id = victim  # what an earlier gateway accepted and stored
    parent, *children = record_rows(older, None, env.clock())
    with env.gw.db.write() as session:
        session.add(parent)
        session.flush()  # the interval row before the rows that refer to it
        session.add_all(children)
        session.commit()
    assert env.client.post(URL, json=record(1), headers=bearer(a)).status_code == 201
    assert sorted(_events(env)) == [("cam-a", victim), ("cam-b", victim)]


def test_the_rollup_lists_an_event_once_per_camera() -> None:
    def rec(camera: str, record_id: str) -> dict[str, Any]:
        return {"record_id": record_id, "camera_id": camera, "interval_start": START,
                "interval_s": 60, "events": [{"event_id": "e1", "kind": "jam", "at": START}]}

    got = rollups.events([rec("cam-b", "rb"), rec("cam-a", "ra"), rec("cam-a", "ra2")])
    assert [(e.camera_id, e.event_id) for e in got] == [("cam-a", "e1"), ("cam-b", "e1")]


# --------------------------------------------------------------------------- 3. record ids
@pytest.mark.parametrize("record_id", [
    "cam-a.0.1",  # another interval's number, the same run
    f"cam-a.{int(START.timestamp()) - 60}.1",  # the minute before
])
def test_a_record_id_naming_another_interval_is_a_422_and_counts_once(
        env: Env, record_id: str) -> None:
    device = env.enroll("cam-a")["access_token"]
    assert env.client.post(URL, json=record(1), headers=bearer(device)).status_code == 201
    again = {**record(1), "record_id": record_id}
    assert_clear_4xx(env.client.post(URL, json=again, headers=bearer(device)), 422,
                     "record_id", "interval_start", f"cam-a.{int(START.timestamp())}.")
    assert stored(env) == (1, 2)
    assert _car_count(env) == 3


@pytest.mark.parametrize("record_id", [
    f"cam-a.0{int(START.timestamp())}.1",  # this interval with a leading zero
    f"cam-a.{int(START.timestamp())}.01",  # this run with a leading zero
])
def test_a_record_id_has_one_spelling(env: Env, record_id: str) -> None:
    device = env.enroll("cam-a")["access_token"]
    assert env.client.post(URL, json=record(1), headers=bearer(device)).status_code == 201
    again = {**record(1), "record_id": record_id}
    assert_clear_4xx(env.client.post(URL, json=again, headers=bearer(device)), 422,
                     "record_id", "cam-a.<interval start")
    assert stored(env) == (1, 2)
    assert _car_count(env) == 3


def test_the_agents_records_pass_with_their_ids(env: Env) -> None:
    """Records as ``edge_agent.traffic.intervals`` writes them, two segments of one minute
    (the wall clock stepped back) included: every one is stored, and every event listed."""
    device = env.enroll("cam-a")["access_token"]
    t0 = START.timestamp()
    acc = IntervalAccumulator("cam-a", interval_s=60, zones=["lane_1"], segment_started_at=t0,
                              config_version=1, model_version="m")
    cross = Crossing("northbound", "in", "car", 1, 0.0, 40.0, 1.0, False)
    stop = TrafficEvent("stopped_vehicle", 0.0, "car 1 stopped", zone="lane_1", track_id=1)
    records = []
    for i in range(1200):  # 120 s at 10 fps; the wall clock goes back 90 s after 60 s
        wall = t0 + i / 10 - (90.0 if i >= 600 else 0.0)
        frame = FrameTraffic([], crossings=[cross] if i % 100 == 0 else [],
                             events=[stop] if i % 300 == 0 else [])
        records += acc.add(frame, wall, stream_time_to_wall=wall - i / 10)
    records += acc.close()
    assert len({r["record_id"] for r in records}) == len(records) == 3
    # the first record's id on a minute it does not name: refused, and it leaves the id free
    moved = {**records[0], "interval_start": (START + timedelta(minutes=1)).isoformat()}
    assert_clear_4xx(env.client.post(URL, json=moved, headers=bearer(device)), 422, "record_id")
    for body in records:
        r = env.client.post(URL, json=body, headers=bearer(device))
        assert r.status_code == 201, r.text
    assert _car_count(env) == 12
    posted = [("cam-a", e["event_id"]) for r in records for e in r["events"]]
    assert len(posted) == 4 and sorted(_events(env)) == sorted(posted)
