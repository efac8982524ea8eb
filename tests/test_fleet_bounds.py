"""Every input that used to answer 500 — out-of-range dates, integers beyond 64 (or 32) bits,
deeply nested JSON, unbounded admin fields — is a 422 with a message and stores nothing; the
bounds themselves (``fleet.bounds``, ``fleet.bodies``); refresh-token reuse revokes the token
family; an empty scope list is refused instead of becoming ``camera:write``.

Gateway tests reuse ``tests/test_fleet_gateway.py``'s environment (``TestClient`` on a real
SQLite file, a clock moved by hand).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from fleet import bodies
from fleet.auth import create_enrollment_token
from fleet.bounds import (
    CLOCK_SKEW,
    INT32_MAX,
    MAX_HOLD_S,
    MAX_JSON_DEPTH,
    MAX_JSON_NODES,
    MAX_JSON_STRING,
    MAX_JSON_VALUES,
    MAX_TOKEN_TTL_S,
    check_json_value,
)
from fleet.config import GatewaySettings
from roadloop.data.frames import FrameStore
from roadloop.release.signing import (
    PUBLIC_KEY_FILE,
    build_manifest,
    load_or_create_signing_key,
    sign_manifest,
)

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import T0, Env, _hb, assert_clear_4xx, bearer, meta, post_frame

# The gateway tests' fixtures, reused here by name.
frame_jpeg = gateway_tests.frame_jpeg
make_env = gateway_tests.make_env
env = gateway_tests.env

# Datetimes Python can hold whose conversion to UTC (how the database stores them) overflows.
OVERFLOWING = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]
OUT_OF_RANGE = [*OVERFLOWING, "1999-12-31T23:59:59+00:00", "0001-01-01T00:00:00Z"]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def json_post(env: Env, path: str, text: str, token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers.update(bearer(token))
    return env.client.post(path, content=text.encode(), headers=headers)


def heartbeats_of(env: Env, camera: str = "cam-a") -> list[dict[str, Any]]:
    r = env.client.get(f"/v1/cameras/{camera}/heartbeats", headers=bearer(env.admin))
    assert r.status_code == 200, r.text
    return r.json()


# =========================================================================== frames
@pytest.mark.parametrize("captured_at", [*OUT_OF_RANGE, "2026-05-04T12:00:00"])
def test_frame_capture_time_out_of_range_is_422(env: Env, frame_jpeg: bytes,
                                                captured_at: str) -> None:
    dev = env.enroll()
    r = post_frame(env.client, dev["access_token"], meta("f-1", captured_at=captured_at),
                   frame_jpeg)
    assert_clear_4xx(r, 422, "captured_at")
    assert env.rows() == [] and FrameStore(env.settings.frame_store).count("cam-a") == 0


def test_frame_capture_time_in_the_future_beyond_the_skew_is_422(env: Env,
                                                                 frame_jpeg: bytes) -> None:
    dev = env.enroll()
    now = datetime.now(UTC)
    late = post_frame(env.client, dev["access_token"],
                      meta("f-late", captured_at=(now + CLOCK_SKEW + timedelta(hours=1))
                           .isoformat()), frame_jpeg)
    assert_clear_4xx(late, 422, "captured_at", "ahead", "clock")
    # Within the skew (a device clock a few hours fast) is still taken.
    soon = post_frame(env.client, dev["access_token"],
                      meta("f-soon", captured_at=(now + timedelta(hours=3)).isoformat()),
                      frame_jpeg)
    assert soon.status_code == 201, soon.text
    assert [r.frame_id for r in env.rows()] == ["f-soon"]


def test_capture_time_bound_follows_the_gateway_clock(env: Env, frame_jpeg: bytes) -> None:
    """"Now" is the later of the wall clock and the gateway's: a gateway whose clock is ahead
    (here: set by the test) takes what its devices stamp with that clock."""
    env.clock.now = datetime.now(UTC) + timedelta(days=30)
    env.admin = gateway_tests._admin_token(env.gw, env.clock)
    token = env.enroll()["access_token"]
    at = env.clock.now.isoformat()
    frame = post_frame(env.client, token, meta("f-1", captured_at=at), frame_jpeg)
    assert frame.status_code == 201, frame.text
    hb = env.client.post("/v1/heartbeats", json=_hb("cam-a", env.clock.now),
                         headers=bearer(token))
    assert hb.status_code == 202, hb.text
    late = env.clock.now + CLOCK_SKEW + timedelta(minutes=1)
    r = env.client.post("/v1/heartbeats", json=_hb("cam-a", late), headers=bearer(token))
    assert_clear_4xx(r, 422, "sent_at", "ahead")


@pytest.mark.parametrize(("text", "words"), [
    (json.dumps({**meta("f-1"), "extra": json.loads(deep(40))}), ("nested", "32")),
    ('{"frame_id": "f-1", "x": ' + deep(5000) + "}", ("nested",)),
    ('{"frame_id": "f-1", "x": ' + "9" * 5000 + "}", ("digits",)),
    (json.dumps(meta("f-1", width=2**64)), ("width",)),
    (json.dumps(meta("f-1", detections=[{"class_id": 2**64, "class_name": "car",
                                         "confidence": 0.5, "xyxy": [0, 0, 1, 1]}])),
     ("class_id",)),
    (json.dumps(meta("f-1", detections=[{"class_id": 0, "class_name": "c" * 1000,
                                         "confidence": 0.5, "xyxy": [0, 0, 1, 1]}])),
     ("class_name",)),
    (json.dumps(meta("f-1", detections=[{"class_id": 0, "class_name": "car",
                                         "confidence": 0.5, "xyxy": [0, 0, 1e300, 1]}])),
     ("xyxy",)),
])
def test_hostile_frame_metadata_is_422_and_stores_nothing(env: Env, frame_jpeg: bytes,
                                                          text: str, words: tuple[str]) -> None:
    dev = env.enroll()
    r = post_frame(env.client, dev["access_token"], text, frame_jpeg)
    assert_clear_4xx(r, 422, "metadata", *words)
    assert env.rows() == []


def test_largest_frame_metadata_is_within_the_json_bounds(env: Env, frame_jpeg: bytes) -> None:
    from fleet.schemas import MAX_DETECTIONS

    dev = env.enroll()
    boxes = [{"class_id": 79, "class_name": "two_wheeler", "confidence": 0.123456,
              "xyxy": [1.5, 2.5, 30.25, 40.75]}] * MAX_DETECTIONS
    r = post_frame(env.client, dev["access_token"], meta("f-big", detections=boxes), frame_jpeg)
    assert r.status_code == 201, r.text


def test_malformed_multipart_is_422_not_500(env: Env) -> None:
    dev = env.enroll()
    boundary = "b0undary"
    body = f"--{boundary}\r\nBroken header\r\r\n\r\nx\r\n--{boundary}--\r\n".encode()
    r = env.client.post("/v1/frames", content=body, headers={
        **bearer(dev["access_token"]),
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_clear_4xx(r, 422, "multipart")


# =========================================================================== heartbeats
@pytest.mark.parametrize("sent_at", OUT_OF_RANGE)
def test_heartbeat_time_out_of_range_is_422(env: Env, sent_at: str) -> None:
    dev = env.enroll()
    r = env.client.post("/v1/heartbeats", json={**_hb("cam-a", T0), "sent_at": sent_at},
                        headers=bearer(dev["access_token"]))
    assert_clear_4xx(r, 422, "sent_at")
    assert heartbeats_of(env) == []


@pytest.mark.parametrize(("field", "value"), [
    ("errors", 2**63), ("errors", 2**64 + 1), ("errors", INT32_MAX + 1), ("errors", 1e300),
    ("dropped_frames", -(2**40)), ("outbox_depth", 2**31), ("schema_version", 2**63),
    ("schema_version", 10**6), ("error_count", 2**40), ("latency_ms", {"p95": 1e300}),
    ("fps", 1e300), ("extra", 2**70),
])
def test_heartbeat_numbers_beyond_their_columns_are_422(env: Env, field: str,
                                                        value: Any) -> None:
    dev = env.enroll()
    body = {**_hb("cam-a", T0), field: value}
    r = env.client.post("/v1/heartbeats", json=body, headers=bearer(dev["access_token"]))
    assert_clear_4xx(r, 422)
    assert heartbeats_of(env) == []


@pytest.mark.parametrize(("tail", "words"), [
    (', "x": ' + deep(900), ("nested",)),  # parsed, then a RecursionError while storing: 500
    (', "x": ' + deep(100_000), ("nested",)),  # the parser's own recursion
    (', "x": ' + "9" * 5000, ("digits",)),
    (', "x": 1e400', ("finite",)),  # parses to inf
    (', "x": NaN', ("NaN",)),
    (', "x": -Infinity', ("Infinity",)),
    (', "x": "' + "s" * (MAX_JSON_STRING + 1) + '"', ("longer",)),
    (', "x": [' + ",".join(["0"] * (MAX_JSON_NODES + 1)) + "]", ("values",)),
    (', "x": [' + ",".join(["[]"] * (MAX_JSON_VALUES + 1)) + "]", ("values",)),  # pre-parse
])
def test_hostile_heartbeat_json_is_422_and_stores_nothing(env: Env, tail: str,
                                                          words: tuple[str]) -> None:
    dev = env.enroll()
    text = json.dumps(_hb("cam-a", T0))[:-1] + tail + "}"
    r = json_post(env, "/v1/heartbeats", text, dev["access_token"])
    assert_clear_4xx(r, 422, *words)
    assert heartbeats_of(env) == []
    # The same heartbeat without the hostile part is stored: nothing else was wrong with it.
    ok = env.client.post("/v1/heartbeats", json=_hb("cam-a", T0), headers=bearer(
        dev["access_token"]))
    assert ok.status_code == 202, ok.text


def test_body_that_is_not_utf8_is_422(env: Env) -> None:
    dev = env.enroll()
    r = env.client.post("/v1/heartbeats", content=json.dumps(_hb("cam-a", T0)).encode("utf-16"),
                        headers={**bearer(dev["access_token"]),
                                 "Content-Type": "application/json"})
    assert_clear_4xx(r, 422, "UTF-8")


# =========================================================================== query parameters
@pytest.mark.parametrize("since", [*OVERFLOWING, "2100-01-01T00:00:00Z", "1999-01-01T00:00:00Z"])
@pytest.mark.parametrize("path", ["/v1/cameras/cam-a/heartbeats", "/v1/audit"])
def test_query_datetimes_out_of_range_are_422(env: Env, path: str, since: str) -> None:
    r = env.client.get(path, params={"since": since}, headers=bearer(env.admin))
    assert_clear_4xx(r, 422, "since")


def test_query_strings_and_path_ids_are_bounded(env: Env) -> None:
    for path, params in (("/v1/audit", {"device_id": "d" * 65}),
                         ("/v1/audit", {"action": "a" * 65}),
                         ("/v1/devices", {"camera_id": "c" * 65})):
        assert_clear_4xx(env.client.get(path, params=params, headers=bearer(env.admin)), 422)
    long_id = "d" * 65
    assert_clear_4xx(env.client.post(f"/v1/devices/{long_id}/revoke", headers=bearer(
        env.admin)), 422, "device_id")
    assert_clear_4xx(env.client.get(f"/v1/rollouts/{'r' * 101}", headers=bearer(env.admin)),
                     422, "rollout_id")


# =========================================================================== admin fields
@pytest.mark.parametrize("ttl_s", [MAX_TOKEN_TTL_S + 1, 10**12, 10**20, 2**64])
def test_enrollment_token_lifetime_is_bounded(env: Env, ttl_s: int) -> None:
    r = env.client.post("/v1/enrollment-tokens", json={"ttl_s": ttl_s},
                        headers=bearer(env.admin))
    assert_clear_4xx(r, 422, "ttl_s")


def test_longest_enrollment_token_lifetime_works(env: Env) -> None:
    r = env.client.post("/v1/enrollment-tokens", json={"ttl_s": MAX_TOKEN_TTL_S},
                        headers=bearer(env.admin))
    assert r.status_code == 201, r.text
    expires = datetime.fromisoformat(r.json()["expires_at"])
    assert expires == env.clock() + timedelta(seconds=MAX_TOKEN_TTL_S)


def test_enroll_hardware_is_bounded_json(env: Env) -> None:
    def enroll(hardware: str) -> Any:
        token = env.enrollment_token()
        return json_post(env, "/v1/enroll", '{"enrollment_token": "' + token + '", '
                         '"camera_id": "cam-h", "agent_version": "1", "hardware": '
                         + hardware + "}")

    assert_clear_4xx(enroll('{"x": ' + deep(900) + "}"), 422, "nested")
    assert_clear_4xx(enroll('{"x": Infinity}'), 422, "Infinity")
    assert_clear_4xx(enroll('{"x": 1e400}'), 422, "finite")
    assert_clear_4xx(enroll('{"x": ' + str(2**70) + "}"), 422, "64 bits")
    assert enroll('{"cpu": "arm", "cores": 4}').status_code == 201
    listed = env.client.get("/v1/devices", headers=bearer(env.admin))
    assert listed.status_code == 200 and [d["hardware"] for d in listed.json()] == [
        {"cpu": "arm", "cores": 4}]


@pytest.fixture()
def rollout_env(make_env: Any, tmp_path: Path) -> tuple[Env, Any]:
    key = load_or_create_signing_key(tmp_path / "keys")
    return make_env(model_public_key_file=tmp_path / "keys" / PUBLIC_KEY_FILE), key


def tmp_model(env: Env) -> Path:
    """A model file of random bytes beside the gateway's home."""
    path = Path(env.settings.home).parent / f"model-{uuid.uuid4().hex[:8]}.onnx"
    path.write_bytes(os.urandom(1024))
    return path


def publish(env: Env, key: Any, version: str) -> tuple[str, dict[str, Any]]:
    rollout_id = f"ro-{version}-{uuid.uuid4().hex[:6]}"
    path = tmp_model(env)
    manifest = sign_manifest(build_manifest(version, path, 320, ["car"], rollout_id), key)
    r = env.client.post("/v1/models", files={"file": ("m.onnx", path.read_bytes())},
                        data={"manifest": json.dumps(manifest)}, headers=bearer(env.admin))
    assert r.status_code == 201, r.text
    return rollout_id, manifest


@pytest.mark.parametrize(("body", "words"), [
    ('{"hold_seconds": 1e20}', ("hold_seconds",)),  # timedelta overflow at /evaluate
    ('{"hold_seconds": Infinity}', ("Infinity",)),
    ('{"hold_seconds": 1e400}', ("1e400", "finite")),  # refused as it is parsed
    ('{"hold_seconds": ' + str(MAX_HOLD_S + 1) + "}", ("hold_seconds",)),
    ('{"budgets": {"p95_latency_budget_ms": 1e400}}', ("1e400", "finite")),
    ('{"budgets": {"min_frames": ' + str(2**70) + "}}", ("min_frames",)),
    ('{"budgets": {"min_cohort_devices": ' + str(2**64) + "}}", ("min_cohort_devices",)),
    ('{"stages": [' + ",".join(['{"percent": 100}'] * 21) + "]}", ("stages",)),
    ('{"stages": []}', ("stages",)),
])
def test_rollout_fields_are_bounded(rollout_env: tuple[Env, Any], body: str,
                                    words: tuple[str]) -> None:
    env, key = rollout_env
    publish(env, key, "1")
    text = '{"model_version": "1", ' + body[1:]
    assert_clear_4xx(json_post(env, "/v1/rollouts", text, env.admin), 422, *words)
    listed = env.client.get("/v1/rollouts", headers=bearer(env.admin))
    assert listed.status_code == 200 and listed.json() == []


def test_longest_hold_evaluates(rollout_env: tuple[Env, Any]) -> None:
    env, key = rollout_env
    rollout_id, _ = publish(env, key, "1")
    r = env.client.post("/v1/rollouts", json={"model_version": "1", "hold_seconds": MAX_HOLD_S},
                        headers=bearer(env.admin))
    assert r.status_code == 201, r.text
    env.clock.advance(MAX_HOLD_S * 2)
    admin = gateway_tests._admin_token(env.gw, env.clock)  # the first one expired meanwhile
    ev = env.client.post(f"/v1/rollouts/{rollout_id}/evaluate", headers=bearer(admin))
    assert ev.status_code == 200 and ev.json()["decision"] == "hold", ev.text


def test_rollout_stored_before_the_bounds_still_evaluates(rollout_env: tuple[Env, Any]) -> None:
    """A database written before holds were bounded may hold any hold: /evaluate builds no
    timedelta from it."""
    from fleet.db import RolloutRow

    env, key = rollout_env
    rollout_id, _ = publish(env, key, "1")
    assert env.client.post("/v1/rollouts", json={"model_version": "1"},
                           headers=bearer(env.admin)).status_code == 201
    with env.gw.db.write() as session:
        session.get(RolloutRow, rollout_id).hold_seconds = 1e20
        session.commit()
    ev = env.client.post(f"/v1/rollouts/{rollout_id}/evaluate", headers=bearer(env.admin))
    assert ev.status_code == 200 and ev.json()["decision"] == "hold", ev.text


@pytest.mark.parametrize("text", ['{"a": ' + deep(5000) + "}", '{"a": ' + "9" * 5000 + "}"])
def test_hostile_model_manifest_is_422(rollout_env: tuple[Env, Any], text: str) -> None:
    env, _ = rollout_env
    r = env.client.post("/v1/models", files={"manifest": (None, text)},
                        headers=bearer(env.admin))
    assert_clear_4xx(r, 422, "manifest")


def test_cli_token_lifetimes_are_bounded(tmp_path: Path) -> None:
    from fleet.cli import fleet_app

    runner = CliRunner()
    home = str(tmp_path / "h")
    for args in (["token", "create"], ["admin-token", "create"]):
        r = runner.invoke(fleet_app, [*args, "--home", home, "--ttl", str(10**12)])
        assert r.exit_code != 0 and "--ttl" in r.output, r.output
        assert "Traceback" not in r.output
        ok = runner.invoke(fleet_app, [*args, "--home", home, "--ttl", str(MAX_TOKEN_TTL_S)])
        assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("field", ["access_token_ttl_s", "refresh_token_ttl_s",
                                   "enrollment_token_ttl_s", "admin_token_ttl_s",
                                   "rollout_hold_seconds"])
def test_settings_durations_are_bounded(tmp_path: Path, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        GatewaySettings(home=tmp_path, **{field: 10**12})


# =========================================================================== PostgreSQL
@pytest.fixture()
def pg_env(postgres_server: Any, make_env: Any, tmp_path: Path) -> tuple[Env, Any]:
    """A gateway on its own PostgreSQL database (``postgres_server`` in conftest)."""
    key = load_or_create_signing_key(tmp_path / "keys")
    return make_env(database_url=postgres_server.new_database("bounds"),
                    model_public_key_file=tmp_path / "keys" / PUBLIC_KEY_FILE), key


def test_values_fit_postgres_columns(pg_env: tuple[Env, Any], frame_jpeg: bytes) -> None:
    """INTEGER is 32-bit and VARCHAR(n) is enforced on PostgreSQL: values SQLite would take
    were a DataError (500) there."""
    env, key = pg_env
    dev = env.enroll()
    token = dev["access_token"]
    for field in ("errors", "dropped_frames", "outbox_depth"):
        r = env.client.post("/v1/heartbeats", json={**_hb("cam-a", T0), field: INT32_MAX + 1},
                            headers=bearer(token))
        assert_clear_4xx(r, 422, field)
    ok = env.client.post("/v1/heartbeats", json={**_hb("cam-a", T0), "outbox_depth": INT32_MAX},
                         headers=bearer(token))
    assert ok.status_code == 202, ok.text
    assert [h["outbox_depth"] for h in heartbeats_of(env)] == [INT32_MAX]
    for captured_at in OVERFLOWING:
        r = post_frame(env.client, token, meta("f-1", captured_at=captured_at), frame_jpeg)
        assert_clear_4xx(r, 422, "captured_at")
    for since in OVERFLOWING:
        r = env.client.get("/v1/audit", params={"since": since}, headers=bearer(env.admin))
        assert_clear_4xx(r, 422, "since")
    # A signed manifest whose rollout id does not fit rollouts.rollout_id (VARCHAR(100)).
    path = tmp_model(env)
    manifest = sign_manifest(build_manifest("1", path, 320, ["car"], "ro-" + "x" * 100), key)
    r = env.client.post("/v1/models", files={"file": ("m.onnx", path.read_bytes())},
                        data={"manifest": json.dumps(manifest)}, headers=bearer(env.admin))
    assert_clear_4xx(r, 422, "rollout_id", "100")


# =========================================================================== tokens
def test_replayed_refresh_token_revokes_the_family(env: Env) -> None:
    dev = env.enroll("cam-a")
    first = env.client.post("/v1/token/refresh", json={"refresh_token": dev["refresh_token"]})
    assert first.status_code == 200, first.text
    rotated = first.json()
    hb = env.client.post("/v1/heartbeats", json=_hb("cam-a", T0),
                         headers=bearer(rotated["access_token"]))
    assert hb.status_code == 202, hb.text

    replay = env.client.post("/v1/token/refresh", json={"refresh_token": dev["refresh_token"]})
    assert_clear_4xx(replay, 401, "already used", "revoked", "enroll again")
    # Every token of the family is dead: the rotated pair and the original access token.
    for token in (rotated["access_token"], dev["access_token"]):
        r = env.client.post("/v1/heartbeats", json=_hb("cam-a", T0 + timedelta(seconds=1)),
                            headers=bearer(token))
        assert_clear_4xx(r, 401, "revoked")
    again = env.client.post("/v1/token/refresh",
                            json={"refresh_token": rotated["refresh_token"]})
    assert_clear_4xx(again, 401, "revoked")
    devices = env.client.get("/v1/devices", headers=bearer(env.admin)).json()
    assert [d["revoked_at"] is not None for d in devices] == [True]
    assert ("token_family_revoked", "denied") in env.audit_actions()
    # The camera enrolls again with a new enrollment token.
    assert env.enroll("cam-a")["device_id"] != dev["device_id"]


def test_refresh_of_an_untouched_family_keeps_working(env: Env) -> None:
    """Reuse detection does not fire on an ordinary chain of rotations."""
    dev = env.enroll("cam-a")
    refresh = dev["refresh_token"]
    for _ in range(3):
        r = env.client.post("/v1/token/refresh", json={"refresh_token": refresh})
        assert r.status_code == 200, r.text
        refresh = r.json()["refresh_token"]
    assert ("token_family_revoked", "denied") not in env.audit_actions()


def test_empty_scope_list_is_refused(env: Env, tmp_path: Path) -> None:
    for scopes in ([], [""]):
        r = env.client.post("/v1/enrollment-tokens", json={"scopes": scopes},
                            headers=bearer(env.admin))
        assert_clear_4xx(r, 422, "scopes")
    default = env.client.post("/v1/enrollment-tokens", json={}, headers=bearer(env.admin))
    assert default.status_code == 201 and default.json()["scopes"] == ["camera:write"]

    with env.gw.db.write() as session, pytest.raises(ValueError, match="at least one scope"):
        create_enrollment_token(session, env.clock(), ttl_s=60, scopes=[])

    from fleet.cli import fleet_app

    runner = CliRunner()
    for value in ("", ","):
        r = runner.invoke(fleet_app, ["token", "create", "--home", str(tmp_path / "h"),
                                      "--scopes", value])
        assert r.exit_code != 0 and "at least one scope" in r.output, r.output


# =========================================================================== the bounds themselves
def _reference_depth(text: bytes) -> int:
    """The parser's own nesting, byte by byte (strings and escapes understood)."""
    depth = best = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            best = max(best, depth)
        elif c in b"]}":
            depth -= 1
    return best


def _random_json(rng: random.Random, level: int = 0) -> Any:
    roll = rng.random()
    if level > 8 or roll < 0.3:
        return rng.choice(['a"]', "\\", '\\"[', "[{", 1, None, "é\\\\\"}", ""])
    if roll < 0.65:
        return [_random_json(rng, level + 1) for _ in range(rng.randint(0, 3))]
    return {f'k{i}"[\\': _random_json(rng, level + 1) for i in range(rng.randint(0, 3))}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 15])
def test_nesting_depth_matches_the_parser_across_chunks(monkeypatch: pytest.MonkeyPatch,
                                                        chunk: int) -> None:
    monkeypatch.setattr(bodies, "_CHUNK", chunk)
    rng = random.Random(chunk)
    for _ in range(300):
        text = json.dumps(_random_json(rng), ensure_ascii=False).encode()
        assert bodies.nesting_depth(text) == _reference_depth(text), text
    assert bodies.nesting_depth(b'["\\\\\\"[[[", [[]]]') == 3  # an escaped quote, then a real one
    assert bodies.nesting_depth(b"[" * 10**6, stop_above=MAX_JSON_DEPTH) > MAX_JSON_DEPTH
    assert bodies.json_shape(b'[1, 2, {"a": [3, ","]}, "[,"]') == (3, 8)


def test_loads_within_bounds() -> None:
    assert bodies.loads(deep(MAX_JSON_DEPTH)) == json.loads(deep(MAX_JSON_DEPTH))
    assert bodies.loads(b'\xef\xbb\xbf{"a": "[[["}') == {"a": "[[["}
    for bad in (deep(MAX_JSON_DEPTH + 1), '{"a": NaN}', "[" + "1" * 5000 + "]", b"\xff{}"):
        with pytest.raises(bodies.JsonRejected):
            bodies.loads(bad)
    with pytest.raises(json.JSONDecodeError):
        bodies.loads("{nope")


def test_check_json_value_limits() -> None:
    fine = {"a": [1, 2.5, None, True, "x" * MAX_JSON_STRING], "b": {"c": -(2**63)}}
    assert check_json_value(fine) is fine
    nested: Any = []
    for _ in range(MAX_JSON_DEPTH):
        nested = [nested]
    too_long = "x" * (MAX_JSON_STRING + 1)
    for bad, words in ((nested, "nested"), ({"a": 2**63}, "64 bits"),
                       ({"a": float("nan")}, "finite"), ({"a": too_long}, "longer"),
                       ({"k" * 257: 1}, "key"), ({"a": object()}, "not JSON"),
                       (list(range(MAX_JSON_NODES)), "values")):
        with pytest.raises(ValueError, match=words):
            check_json_value(bad)
