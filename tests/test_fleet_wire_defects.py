# ruff: noqa: F811 - the fixtures of tests/test_fleet_gateway.py are imported by name
"""Two answers the gateway got wrong on the wire (found by a black-box audit): a batch entry
whose ``frame_id`` is a lone surrogate made the whole answer a 500 after the good frames of
the batch were stored (and a refused entry's id was echoed whole, however long), and a
client that closed the connection mid-body was logged as an unhandled error and counted as
a 500 (on a JSON route, a 400). TestClient against a real SQLite file, as tests/test_fleet_gateway.py; the dropped
client is a hand-written ASGI call whose ``receive`` reports the disconnect mid-body."""

from __future__ import annotations

import json
import logging
import struct
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.requests import ClientDisconnect

from fleet.db import HeartbeatRow
from fleet.intake_batch import BATCH_CONTENT_TYPE

from .test_fleet_gateway import (  # noqa: F401 - fixtures
    T0,
    Env,
    env,
    frame_jpeg,
    make_env,
    meta,
)
from .test_frame_batch import batch_body, post_batch


def raw_batch(manifest_text: str, images: list[bytes]) -> bytes:
    """A batch envelope around a manifest given as JSON text (escapes kept as written)."""
    manifest = manifest_text.encode("utf-8")
    return struct.pack(">I", len(manifest)) + manifest + b"".join(images)


# --------------------------------------------------------------------------- batch ids
def test_a_lone_surrogate_frame_id_is_that_frames_422(env: Env, frame_jpeg: bytes) -> None:
    tok = env.enroll("cam-a")["access_token"]
    metas = [meta("ok-1"), meta("SURROGATE"), meta("ok-2")]
    text = json.dumps({"frames": [{"metadata": m, "image_bytes": len(frame_jpeg)}
                                  for m in metas]})
    text = text.replace('"SURROGATE"', '"\\ud800"')  # the JSON escape, as a client sends it
    r = post_batch(env, tok, raw_batch(text, [frame_jpeg] * 3))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["frame_id"], x["status"]) for x in results] == [
        ("ok-1", 201), (None, 422), ("ok-2", 201)]
    assert "frame_id" in results[1]["detail"] and "surrogate" in results[1]["detail"]
    assert (r.json()["stored"], r.json()["refused"]) == (2, 1)
    assert sorted(row.frame_id for row in env.rows()) == ["ok-1", "ok-2"]


def test_a_refused_entry_echoes_only_a_valid_frame_id(env: Env, frame_jpeg: bytes) -> None:
    tok = env.enroll("cam-a")["access_token"]
    frames = [
        (meta("ok-1"), frame_jpeg),
        (meta("x" * 200_000), frame_jpeg),  # 200 KB, too long for a frame id: 422
        (meta("../not an id"), frame_jpeg),  # not a frame id: 422
        (meta("ok-bad", importance=-1.0), frame_jpeg),  # a valid id, another field bad
        ({"frame_id": 7, "camera_id": "cam-a"}, frame_jpeg),  # not a string
    ]
    r = post_batch(env, tok, batch_body(frames))
    assert r.status_code == 200, r.text[:300]
    results = r.json()["results"]
    assert [(x["frame_id"], x["status"]) for x in results] == [
        ("ok-1", 201), (None, 422), (None, 422), ("ok-bad", 422), (None, 422)]
    assert "x" * 100 not in r.text and len(r.content) < 4000, len(r.content)
    assert "importance" in results[3]["detail"]
    assert [row.frame_id for row in env.rows()] == ["ok-1"]


# --------------------------------------------------------------------------- disconnects
def _requests(env: Env, route: str, status: int) -> float:
    value = env.gw.metrics.registry.get_sample_value(
        "roadloop_gateway_requests_total",
        {"method": "POST", "route": route, "status": str(status)})
    return value or 0.0


def _body(frame_jpeg: bytes, route: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a valid request to ``route`` (frame "gone-1" on the uploads)."""
    if route == "/v1/heartbeats":  # a JSON body, which FastAPI reads itself
        return "application/json", json.dumps({
            "schema_version": 1, "camera_id": "cam-a", "model_version": None,
            "sent_at": T0.isoformat()}).encode()
    if route == "/v1/frames/batch":
        return BATCH_CONTENT_TYPE, batch_body([(meta("gone-1"), frame_jpeg),
                                               (meta("gone-2"), frame_jpeg)])
    req = httpx.Request("POST", "http://x/v1/frames",
                        files={"image": ("f.jpg", frame_jpeg, "image/jpeg")},
                        data={"metadata": json.dumps(meta("gone-1"))})
    return req.headers["content-type"], req.read()


def _send_half_then_disconnect(env: Env, route: str, token: str, ctype: str,
                               body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Call the app as a server would for a client that sends the headers (with the full
    Content-Length) and half the body, then goes away: (what the app sent, whether
    ``ClientDisconnect`` escaped the app)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": route,
        "raw_path": route.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode()),
                    (b"content-type", ctype.encode()),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {},
    }
    pending = [{"type": "http.request", "body": body[: len(body) // 2], "more_body": True}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def call() -> bool:
        try:
            await env.client.app(scope, receive, send)
        except ClientDisconnect:
            return True
        return False

    portal = env.client.portal  # the event loop the app's lifespan runs on
    assert portal is not None
    return sent, portal.call(call)


def _heartbeats(env: Env) -> int:
    with env.gw.db.read() as s:
        return len(list(s.scalars(select(HeartbeatRow))))


@pytest.mark.parametrize("route", ["/v1/frames/batch", "/v1/frames", "/v1/heartbeats"])
def test_a_client_gone_mid_body_is_499_not_a_logged_500(
        env: Env, frame_jpeg: bytes, route: str, caplog: pytest.LogCaptureFixture) -> None:
    tok = env.enroll("cam-a")["access_token"]
    ctype, body = _body(frame_jpeg, route)
    errors_before = _requests(env, route, 500)
    caplog.set_level(logging.INFO)
    sent, escaped = _send_half_then_disconnect(env, route, tok, ctype, body)
    assert _requests(env, route, 500) == errors_before
    assert _requests(env, route, 499) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(r.levelno == logging.INFO and "disconnect" in r.getMessage()
               and route in r.getMessage() for r in caplog.records), caplog.text
    assert not escaped  # the server would log it again as an exception in the application
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert env.rows() == [] and env.gw.store.find_frame("cam-a", "gone-1") is None
    assert _heartbeats(env) == 0
    # The gateway still serves the device: the same request whole is taken.
    full = env.client.post(route, content=body,
                           headers={"Authorization": f"Bearer {tok}", "Content-Type": ctype})
    assert full.status_code in (200, 201, 202), full.text
    if route == "/v1/heartbeats":
        assert _heartbeats(env) == 1
    else:
        assert "gone-1" in {row.frame_id for row in env.rows()}
