"""Gateway: a camera's configuration document — versions, optimistic concurrency, ETags,
history, audit, who may read and write it, and the values it refuses; and the platform's
client of it (``FleetResource``: read-modify-write with one retry on a conflict).

``TestClient`` against a real SQLite file (the fixtures of tests/test_fleet_gateway.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from fleet.camera_config_schemas import CameraConfig, config_etag, document_sha256

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import T0, Env, assert_clear_4xx, bearer

make_env = gateway_tests.make_env
env = gateway_tests.env

URL = "/v1/cameras/cam-a/config"
UNTIL = T0 + timedelta(hours=2)


def boosted(factor: float = 4.0, until: datetime = UNTIL, **sampling: Any) -> dict[str, Any]:
    return {"sampling": {"base_rate": 0.05, "hourly_budget": 720.0, **sampling,
                         "boost": {"factor": factor, "until": until.isoformat(),
                                   "reason": "drift on cam-a"}}}


def put(env: Env, config: dict[str, Any], expected: int | None, *, reason: str = "test",
        token: str | None = None, camera: str = "cam-a") -> Any:
    return env.client.put(f"/v1/cameras/{camera}/config",
                          json={"config": config, "expected_version": expected, "reason": reason},
                          headers=bearer(token or env.admin))


def config_audit(env: Env) -> list[dict[str, Any]]:
    r = env.client.get("/v1/audit", params={"action": "camera_config_changed"},
                       headers=bearer(env.admin))
    assert r.status_code == 200, r.text
    return r.json()


def test_versions_etags_history_and_audit(env: Env) -> None:
    device = env.enroll("cam-a")["access_token"]
    empty = env.client.get(URL, headers=bearer(device))
    assert empty.status_code == 200, empty.text
    assert empty.json()["version"] == 0 and empty.json()["config"] == {}
    assert empty.json()["sha256"] == document_sha256({})
    assert empty.headers["etag"] == config_etag(0, document_sha256({}))

    first = put(env, boosted(), 0, reason="drift sensor: raise sampling")
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["camera_id"], body["version"], body["changed"]) == ("cam-a", 1, True)
    assert body["config"]["sampling"]["boost"]["until"] == "2026-05-04T14:00:00Z"
    assert body["config"]["sampling"]["base_rate"] == 0.05 and "notes" not in body["config"]
    assert body["sha256"] == document_sha256(body["config"])
    assert body["updated_by"].startswith("admin-token:")
    assert body["updated_at"].startswith("2026-05-04T12:00:00")

    got = env.client.get(URL, headers=bearer(device))
    assert got.status_code == 200 and got.json()["version"] == 1
    assert got.json()["config"] == body["config"] and "changed" not in got.json()
    etag = got.headers["etag"]
    assert etag == config_etag(1, body["sha256"]) and etag != empty.headers["etag"]
    same = env.client.get(URL, headers={**bearer(device), "If-None-Match": etag})
    assert same.status_code == 304 and same.headers["etag"] == etag and not same.content
    stale = env.client.get(URL, headers={**bearer(device),
                                         "If-None-Match": empty.headers["etag"]})
    assert stale.status_code == 200 and stale.json()["version"] == 1

    # The same instant in another offset is the same document: a no-op, whatever the base.
    env.clock.advance(60)
    again = put(env, boosted(until=UNTIL.astimezone(timezone(timedelta(hours=2)))), 0)
    assert again.status_code == 200, again.text
    assert (again.json()["version"], again.json()["changed"]) == (1, False)
    assert again.json()["updated_at"].startswith("2026-05-04T12:00:00")

    second = put(env, {"sampling": {"base_rate": 0.02}, "notes": "boost over"}, 1,
                 reason="boost cancelled")
    assert second.status_code == 200 and second.json()["version"] == 2
    conflict = put(env, boosted(factor=2.0), 1)
    assert_clear_4xx(conflict, 409, "version 2", "expected_version 2")
    assert conflict.headers["etag"] == config_etag(2, second.json()["sha256"])
    assert env.client.get(URL, headers={**bearer(device), "If-None-Match": etag}
                          ).status_code == 200
    blind = put(env, {"notes": "blind write"}, None)
    assert blind.status_code == 200 and blind.json()["version"] == 3

    history = env.client.get(f"{URL}/history", headers=bearer(env.admin))
    assert history.status_code == 200, history.text
    rows = history.json()
    assert [h["version"] for h in rows] == [3, 2, 1]
    assert rows[2]["reason"] == "drift sensor: raise sampling"
    assert rows[2]["config"] == body["config"] and rows[2]["sha256"] == body["sha256"]
    assert rows[1]["config"] == {"sampling": {"base_rate": 0.02}, "notes": "boost over"}
    assert all(h["created_by"] == body["updated_by"] for h in rows)
    limited = env.client.get(f"{URL}/history", params={"limit": 1}, headers=bearer(env.admin))
    assert [h["version"] for h in limited.json()] == [3]

    audit = config_audit(env)  # newest first; the no-op and the conflict are not changes
    assert [(a["detail"]["from_version"], a["detail"]["to_version"]) for a in audit] == [
        (2, 3), (1, 2), (0, 1)]
    assert audit[2]["detail"]["reason"] == "drift sensor: raise sampling"
    assert audit[2]["detail"]["camera_id"] == "cam-a"
    assert audit[2]["actor"] == body["updated_by"] and audit[2]["outcome"] == "ok"


def test_first_write_needs_version_0_and_configs_are_per_camera(env: Env) -> None:
    assert_clear_4xx(put(env, boosted(), 3), 409, "version 0")
    assert put(env, boosted(), 0).json()["version"] == 1
    other = env.client.get("/v1/cameras/cam-b/config", headers=bearer(env.admin))
    assert other.status_code == 200 and other.json()["version"] == 0
    assert put(env, {"notes": "b"}, 0, camera="cam-b").json()["version"] == 1
    assert env.client.get(URL, headers=bearer(env.admin)).json()["config"] == put(
        env, boosted(), 1).json()["config"]
    # Writing the empty document to a camera without one is already current.
    fresh = put(env, {}, 0, camera="cam-c")
    assert (fresh.json()["version"], fresh.json()["changed"]) == (0, False)
    assert env.client.get("/v1/cameras/cam-c/config/history", headers=bearer(env.admin)
                          ).json() == []


def test_who_may_read_and_write(env: Env) -> None:
    cam_a = env.enroll("cam-a")["access_token"]  # camera:write only
    cam_b = env.enroll("cam-b", scopes=["camera:read", "camera:write"])["access_token"]
    assert put(env, boosted(), 0).status_code == 200
    for method, url in (("GET", URL), ("PUT", URL), ("GET", f"{URL}/history")):
        r = env.client.request(method, url, json={"config": {}, "expected_version": None,
                                                  "reason": "x"})
        assert_clear_4xx(r, 401, "missing bearer token")
        r = env.client.request(method, url, headers=bearer("made-up"))
        assert r.status_code == 401
    assert_clear_4xx(put(env, {"notes": "x"}, 1, token=cam_a), 403, "camera:admin")
    assert_clear_4xx(env.client.get(URL, headers=bearer(cam_b)), 403, "cam-b")
    assert_clear_4xx(env.client.get(f"{URL}/history", headers=bearer(cam_b)), 403, "cam-b")
    assert_clear_4xx(env.client.get(f"{URL}/history", headers=bearer(cam_a)), 403,
                     "camera:read")
    own = env.client.get("/v1/cameras/cam-b/config/history", headers=bearer(cam_b))
    assert own.status_code == 200 and own.json() == []
    assert env.client.get(URL, headers=bearer(cam_a)).json()["version"] == 1
    assert env.client.get(URL, headers=bearer(env.admin)).json()["version"] == 1
    assert env.client.get(URL, headers=bearer(cam_a)).json()["version"] == 1


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"sampling": {"base_rate": 1.5}}, ["sampling.base_rate", "less than or equal to 1"]),
        ({"sampling": {"base_rate": -0.1}}, ["sampling.base_rate"]),
        ({"sampling": {"hourly_budget": 0}}, ["sampling.hourly_budget", "greater than 0"]),
        ({"sampling": {"hourly_budget": 1e6}}, ["sampling.hourly_budget"]),
        (boosted(factor=0.5), ["sampling.boost.factor"]),
        (boosted(factor=21), ["sampling.boost.factor"]),
        ({"sampling": {"boost": {"factor": 2, "until": "2026-05-04T14:00:00",
                                 "reason": "x"}}}, ["sampling.boost.until", "timezone"]),
        ({"sampling": {"boost": {"factor": 2, "until": UNTIL.isoformat()}}},
         ["sampling.boost.reason"]),
        ({"sampling": {"boost": {"factor": 2, "until": UNTIL.isoformat(), "reason": "x" * 201}}},
         ["sampling.boost.reason"]),
        ({"notes": "n" * 1001}, ["notes"]),
        ({"zones": []}, ["zones", "extra"]),
        ({"sampling": {"base_rate": 0.1, "rate": 0.2}}, ["sampling.rate", "extra"]),
        ({"sampling": {"base_rate": "lots"}}, ["sampling.base_rate"]),
        ({"sampling": []}, ["sampling"]),
    ],
)
def test_out_of_range_and_unknown_values_are_refused(
    env: Env, config: dict[str, Any], words: list[str]
) -> None:
    assert_clear_4xx(put(env, config, 0), 422, *words)
    assert env.client.get(URL, headers=bearer(env.admin)).json()["version"] == 0


def test_hostile_bodies_are_refused_and_store_nothing(env: Env) -> None:
    far = max(datetime.now(UTC), T0) + timedelta(days=31)
    assert_clear_4xx(put(env, boosted(until=far), 0), 422, "at most 30 days")
    headers = {**bearer(env.admin), "Content-Type": "application/json"}
    nan = b'{"config": {"sampling": {"base_rate": NaN}}, "expected_version": 0, "reason": "x"}'
    assert_clear_4xx(env.client.put(URL, content=nan, headers=headers), 422, "NaN")
    deep = b'{"config": {"notes": ' + b"[" * 40 + b"]" * 40 + b'}, "reason": "x"}'
    assert_clear_4xx(env.client.put(URL, content=deep, headers=headers), 422, "nested deeper")
    for body in ({"config": {}, "reason": "x"},  # expected_version must be stated
                 {"config": {}, "expected_version": -1, "reason": "x"},
                 {"config": {}, "expected_version": 0},
                 {"config": {}, "expected_version": 0, "reason": ""},
                 {"config": {}, "expected_version": 0, "reason": "x", "force": True}):
        assert put_raw(env, body).status_code == 422, body
    assert_clear_4xx(env.client.put("/v1/cameras/bad%20id/config", json={
        "config": {}, "expected_version": 0, "reason": "x"}, headers=bearer(env.admin)), 422)
    assert env.client.get(URL, headers=bearer(env.admin)).json()["version"] == 0
    assert config_audit(env) == []


def put_raw(env: Env, body: dict[str, Any]) -> Any:
    return env.client.put(URL, json=body, headers=bearer(env.admin))


def test_document_model_canonical_form() -> None:
    """What is stored: only the settings given, times in UTC, so equal documents hash equal."""
    doc = CameraConfig.model_validate(boosted(until=UNTIL.astimezone(
        timezone(timedelta(hours=-5))))).canonical()
    assert doc == {"sampling": {"base_rate": 0.05, "hourly_budget": 720.0, "boost": {
        "factor": 4.0, "until": "2026-05-04T14:00:00Z", "reason": "drift on cam-a"}}}
    assert CameraConfig.model_validate({"sampling": None, "notes": None}).canonical() == {}
    assert document_sha256(doc) == document_sha256(CameraConfig.model_validate(doc).canonical())


# --------------------------------------------------------------------------- FleetResource
@pytest.fixture()
def fleet(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any]]:
    """``FleetResource`` whose HTTP calls go to the in-process gateway, and a list of
    callables: each runs just before one PUT reaches the gateway (a writer racing the
    resource's read-modify-write)."""
    from resources import fleet_resource
    from roadloop import fleet_admin

    base = "http://gateway.test"
    racers: list[Any] = []

    def request(method: str, url: str, **kw: Any) -> Any:
        kw.pop("timeout", None)
        if method == "PUT" and racers:
            racers.pop(0)()
        return env.client.request(method, url.removeprefix(base), **kw)

    monkeypatch.setattr(fleet_admin.httpx, "request", request)
    return fleet_resource.FleetResource(gateway_url=base, admin_token=env.admin), racers


def test_fleet_resource_boost_merges_and_retries_once_on_a_conflict(
    env: Env, fleet: tuple[Any, list[Any]]
) -> None:
    from resources.fleet_resource import FleetConflict

    fleet, racers = fleet
    assert fleet.camera_config("cam-a")["version"] == 0
    base = {"sampling": {"base_rate": 0.05, "hourly_budget": 720.0}, "notes": "cam-a"}
    assert fleet.put_camera_config("cam-a", base, 0, "rates")["version"] == 1
    with pytest.raises(FleetConflict, match="version 1"):
        fleet.put_camera_config("cam-a", {"notes": "stale"}, 0, "stale")

    # Another writer changes the notes between the resource's GET and its PUT: the PUT is a
    # 409, the resource reads again and merges the boost into the newer document.
    racers.append(lambda: put(env, {**base, "notes": "changed meanwhile"}, 1))
    out = fleet.boost_sampling("cam-a", 3.0, UNTIL, "drift on cam-a")
    assert out["version"] == 3
    assert out["config"] == {"notes": "changed meanwhile", "sampling": {
        "base_rate": 0.05, "hourly_budget": 720.0,
        "boost": {"factor": 3.0, "until": "2026-05-04T14:00:00Z", "reason": "drift on cam-a"}}}
    history = env.client.get(f"{URL}/history", headers=bearer(env.admin)).json()
    assert [(h["version"], h["reason"]) for h in history] == [
        (3, "drift on cam-a"), (2, "test"), (1, "rates")]

    # Conflicting twice: the resource gives up with the gateway's message.
    racers.extend([lambda: put(env, {"notes": "x"}, None),
                         lambda: put(env, {"notes": "y"}, None)])
    with pytest.raises(FleetConflict, match="409"):
        fleet.boost_sampling("cam-a", 2.0, UNTIL, "again")
    with pytest.raises(ValueError, match="timezone-aware"):
        fleet.boost_sampling("cam-a", 2.0, UNTIL.replace(tzinfo=None), "naive")
    assert env.client.get(URL, headers=bearer(env.admin)).json()["config"] == {"notes": "y"}
