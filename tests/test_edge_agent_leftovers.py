"""Edge agent against a broken or hostile gateway, the audit's leftovers: a malformed enrollment
answer, a manifest holding a lone surrogate, response headers trickled a byte at a time, and a
model download's body trickled past any sensible time."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent import model_store
from edge_agent.client import GatewayClient
from edge_agent.errors import DownloadIncomplete, GatewayUnavailable
from edge_agent.http_deadline import MAX_RESPONSE_BYTES
from edge_agent.identity import IDENTITY_FILE, DeviceIdentity
from edge_agent.manifest import ModelManifest
from edge_agent.model_store import ModelStore

from .helpers import AnsweringServer
from .test_edge_updater import (  # noqa: F401 - fixtures
    Rig,
    _publish,
    _state_json,
    baseline,
    gateway,
    models,
    public_b64,
    rig,
    signing_key,
)

URL = "http://gateway.test"
GOOD = {"device_id": "dev-1", "access_token": "A1", "refresh_token": "R1", "expires_in": 3600,
        "scopes": ["camera:write"]}


# ---------------------------------------------------------------- 1: enrollment answers
def _enroll(tmp_path: Path, content: bytes) -> GatewayClient:
    def gw(r: httpx.Request) -> httpx.Response:
        assert r.url.path == "/v1/enroll"
        return httpx.Response(201, content=content)

    return GatewayClient(URL, tmp_path / "state", transport=httpx.MockTransport(gw))


def _with(**kw) -> bytes:
    return json.dumps({**GOOD, **kw}).encode()


def _without(name: str) -> bytes:
    return json.dumps({k: v for k, v in GOOD.items() if k != name}).encode()


@pytest.mark.parametrize("content", [
    b"<html>captive portal</html>",
    b"[1, 2]",
    b"[" * 100_000,
    _without("device_id"),
    _without("access_token"),
    _without("refresh_token"),
    _with(expires_in="soon"),
    b'{"device_id": "d", "access_token": "A", "refresh_token": "R", "expires_in": NaN}',
    _with(expires_in=-5),
    _with(expires_in=0),
    _with(expires_in=10**400),
    _with(expires_in=1e300),
    _with(expires_in=True),
    _with(access_token=123),
    _with(refresh_token=["R"]),
    _with(access_token="A\nB"),
    _with(device_id=""),
    _with(device_id={"id": 1}),
    _with(scopes="camera:write"),
    _with(model_public_key=42),
    _with(device_id="\ud800"),
    b'{"device_id": "d", "access_token": "A", "refresh_token": "R", "pad": "'
    + b"x" * (MAX_RESPONSE_BYTES + 10) + b'"}',
], ids=["html", "list", "nested", "no-device-id", "no-access", "no-refresh", "soon", "nan",
        "negative", "zero", "huge-int", "huge", "bool", "token-int", "token-list",
        "token-newline", "empty-device", "device-object", "scopes-str", "key-int",
        "surrogate", "over-cap"])
def test_malformed_enrollment_answer_is_gateway_unavailable_and_saves_nothing(
        tmp_path: Path, content: bytes) -> None:
    client = _enroll(tmp_path, content)
    try:
        with pytest.raises(GatewayUnavailable, match="enrollment"):
            client.enroll("tok", "cam-1", "1.0")
        assert client.identity is None
        assert not (tmp_path / "state" / IDENTITY_FILE).exists()
    finally:
        client.close()


def test_a_good_enrollment_answer_is_still_saved(tmp_path: Path) -> None:
    client = _enroll(tmp_path, _with(model_public_key="a2V5"))
    try:
        ident = client.enroll("tok", "cam-1", "1.0")
        assert (ident.device_id, ident.access_token, ident.refresh_token) == ("dev-1", "A1", "R1")
        assert ident.scopes == ["camera:write"] and ident.ttl_s == 3600.0
        assert ident.model_public_key == "a2V5"
        assert DeviceIdentity.load(tmp_path / "state") == ident
    finally:
        client.close()


# ---------------------------------------------------------------- 2: a lone surrogate
@pytest.mark.parametrize("where", ["model_version", "rollout_id", "key"])
def test_manifest_with_a_lone_surrogate_is_refused_and_reported(
        rig: Rig, models, signing_key, where: str) -> None:  # noqa: F811 - fixtures
    manifest = _publish(rig, models["candidate"], signing_key)
    if where == "key":
        manifest["\ud800"] = 1
    else:
        manifest[where] = "x\ud800y"
    assert rig.updater.poll_once() == "rejected"
    assert rig.slot.sha256 == rig.base_sha  # the current model keeps serving
    fields = rig.updater.heartbeat_fields()
    assert fields["update_status"] == "rejected"
    assert "not valid Unicode" in fields["update_reason"]
    json.dumps(fields, ensure_ascii=False).encode("utf-8")  # the heartbeat can carry it
    state = _state_json(rig)
    assert state["status"] == "rejected" and "not valid Unicode" in state["reason"]
    assert rig.gw.model_requests() == []  # nothing downloaded
    rig.updater.etag = None  # offered again: the remembered refusal, no crash
    assert rig.updater.poll_once() == "skipped"
    assert rig.updater.heartbeat_fields()["update_status"] == "rejected"


# ---------------------------------------------------------------- 3 and 4: trickles


@pytest.fixture()
def trickle_headers() -> Iterator[AnsweringServer]:
    server = AnsweringServer(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\n\r\n{}", interval_s=0.3, max_s=30)
    yield server
    server.close()


def _client(tmp_path: Path, url: str, timeout_s: float) -> GatewayClient:
    state = tmp_path / "state"
    DeviceIdentity("dev", "cam", url, "acc", "ref", expires_at=4e9).save(state)
    return GatewayClient(url, state, timeout_s=timeout_s)


def test_headers_trickled_a_byte_at_a_time_meet_the_request_deadline(
        tmp_path: Path, trickle_headers: AnsweringServer) -> None:
    """Each byte comes well inside the 1 s read timeout; the request's 2 s deadline (2 x
    timeout_s) must still end it: the whole head would take ~24 s."""
    client = _client(tmp_path, trickle_headers.url, timeout_s=1.0)
    try:
        t0 = time.monotonic()
        out = client.upload_frame(b"\xff\xd8x\xff\xd9", {"frame_id": "f0"})
        assert time.monotonic() - t0 < 6.0
        assert out.kind == "retry" and "deadline" in out.detail
        t0 = time.monotonic()
        with pytest.raises(GatewayUnavailable):
            client.get_manifest()
        assert time.monotonic() - t0 < 6.0
    finally:
        client.close()


def test_trickled_model_download_meets_its_deadline_and_keeps_what_it_got(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body trickled a byte every 20 ms (each read well inside the read timeout): past the
    download's deadline (here 1 s: patched down from minutes) the attempt fails as a
    retryable ``DownloadIncomplete``; the bytes received stay in the partial file, for the
    next poll to resume from (no model file is in place). The head and the body's first
    bytes come at once: trickled too, the head alone took ~0.8 s of the 1 s, and on a busy
    host no body byte had arrived by the deadline."""
    monkeypatch.setattr(model_store, "MIN_DOWNLOAD_S", 1.0)
    data = bytes(range(256)) * 40
    sha = hashlib.sha256(data).hexdigest()
    head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    server = AnsweringServer(data[64:], interval_s=0.02, max_s=8, prefix=head + data[:64])
    client = _client(tmp_path, server.url, timeout_s=1.0)
    store = ModelStore(tmp_path / "models", client)
    m = ModelManifest(model_version="1", sha256=sha, size=len(data), input_size=320,
                      class_names=(), key_id="k")
    try:
        assert model_store.download_deadline_s(10 * 1024 * 1024) == 320.0  # 32 KiB/s
        t0 = time.monotonic()
        with pytest.raises(DownloadIncomplete, match="too slow"):
            store.download(m)
        assert time.monotonic() - t0 < 5.0
        [partial] = list((tmp_path / "models").iterdir())
        assert ".partial" in partial.name and 0 < partial.stat().st_size < len(data)
        assert data.startswith(partial.read_bytes())
    finally:
        client.close()
        server.close()
