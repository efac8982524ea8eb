"""A line-by-line review of ``edge_agent/client.py``: each test of a defect fails on the
client before the review's fixes (the ``..._still_...`` tests guard what did not change).

* the environment's proxies (``HTTP_PROXY``…) are honoured, and an answer trickled through
  one — or through an ``httpx.HTTPTransport`` passed in — meets the request's deadline;
* ``/v1/token/refresh`` and ``/v1/enroll`` answered 408/429/5xx (the gateway's flood limit)
  are "try again after Retry-After", not a revoked device or a refused enrollment;
* an early refresh that fails transiently does not stop a request whose token is still valid;
* no message quotes the bytes of a credential answer (a live token would reach the logs);
* a manifest or camera config the JSON parser gives up on is a ``GatewayError``;
* a damaged ``identity.json`` is a ``GatewayError`` at once, not a failure of every request.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.client import GatewayClient, UploadOutcome
from edge_agent.errors import AuthError, EnrollmentError, GatewayError, GatewayUnavailable
from edge_agent.identity import IDENTITY_FILE, DeviceIdentity

from .helpers import AnsweringServer

URL = "http://gateway.test"
JPEG = b"\xff\xd8x\xff\xd9"


def _client(tmp_path: Path, handler, *, expires_at: float = 4e9, url: str = URL,
            **kw) -> GatewayClient:
    state = tmp_path / "state"
    DeviceIdentity("dev", "cam", url, "acc", "ref", expires_at=expires_at).save(state)
    return GatewayClient(url, state, transport=httpx.MockTransport(handler), **kw)


# ---------------------------------------------------------------- loopback servers


CREATED = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def _closed_port_url() -> str:
    """A loopback URL nothing listens on: a direct connection is refused at once."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# A gateway only the proxy can reach (the name does not resolve here; loopback would go direct).
BEHIND_PROXY = "http://gateway.roadloop.invalid:8700"


@pytest.fixture()
def env_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., AnsweringServer]]:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    servers: list[AnsweringServer] = []

    def start(answer: bytes, **kw) -> AnsweringServer:
        server = AnsweringServer(answer, **kw)
        servers.append(server)
        monkeypatch.setenv("HTTP_PROXY", server.url)
        return server

    yield start
    for server in servers:
        server.close()


def _real_client(tmp_path: Path, url: str, timeout_s: float, **kw) -> GatewayClient:
    state = tmp_path / "state"
    DeviceIdentity("dev", "cam", url, "acc", "ref", expires_at=4e9).save(state)
    return GatewayClient(url, state, timeout_s=timeout_s, **kw)


def _upload_once(tmp_path: Path, url: str, timeout_s: float, **kw) -> UploadOutcome:
    client = _real_client(tmp_path, url, timeout_s=timeout_s, **kw)
    try:
        return client.upload_frame(JPEG, {"frame_id": "f0"})
    finally:
        client.close()


# ---------------------------------------------------------------- 1: proxies and transports
def test_the_environments_http_proxy_is_honoured(tmp_path: Path, env_proxy) -> None:
    """A site that reaches the gateway through a proxy (``HTTP_PROXY``): the client must send
    through it, as httpx does by default (the deadline transport switched that off)."""
    proxy = env_proxy(CREATED)
    out = _upload_once(tmp_path, BEHIND_PROXY, timeout_s=2.0)
    assert out.kind == "stored", out.detail
    assert proxy.request_lines == [f"POST {BEHIND_PROXY}/v1/frames HTTP/1.1"]


def test_a_gateway_on_loopback_is_reached_directly_with_a_proxy_set(
        tmp_path: Path, env_proxy) -> None:
    """A proxy cannot reach this host's 127.0.0.1 (its own loopback is itself): the local
    fleet harness and a gateway beside the agent are reached directly, NO_PROXY or not."""
    proxy = env_proxy(CREATED)
    gateway = AnsweringServer(CREATED)
    try:
        for url in (gateway.url, gateway.url.replace("127.0.0.1", "localhost")):
            out = _upload_once(tmp_path, url, timeout_s=2.0)
            assert out.kind == "stored", out.detail
    finally:
        gateway.close()
    assert proxy.request_lines == [] and len(gateway.request_lines) == 2


def test_headers_trickled_through_the_proxy_meet_the_request_deadline(
        tmp_path: Path, env_proxy) -> None:
    """Each byte inside the 0.5 s read timeout; the request's deadline (2 × timeout_s = 1 s)
    must end it, not the ~16 s the head would take (the server hangs up after 4 s)."""
    proxy = env_proxy(CREATED, interval_s=0.2, max_s=4.0)
    out = _upload_once(tmp_path, BEHIND_PROXY, timeout_s=0.5)
    assert proxy.request_lines, "the request did not go through the proxy"
    # the deadline ended it (unbounded, the server's hang-up at 4 s would: another error)
    assert out.kind == "retry" and "deadline" in out.detail, out.detail


def test_headers_trickled_through_a_passed_httpx_transport_meet_the_deadline(
        tmp_path: Path) -> None:
    """An ``httpx.HTTPTransport`` passed in (own TLS settings, a local address…) is bounded
    like the default one."""
    server = AnsweringServer(CREATED, interval_s=0.2, max_s=4.0)
    try:
        out = _upload_once(tmp_path, server.url, timeout_s=0.5, transport=httpx.HTTPTransport())
    finally:
        server.close()
    assert out.kind == "retry" and "deadline" in out.detail, out.detail  # not the hang-up


# ---------------------------------------------------------------- 2: busy is not refused
NOT_NOW = [(429, {"Retry-After": "30"}, 30.0), (408, {}, None), (503, {"Retry-After": "7"}, 7.0),
           (302, {"Location": "http://login.portal/"}, None)]


@pytest.mark.parametrize(("code", "headers", "retry_after"), NOT_NOW,
                         ids=["429", "408", "503", "302"])
def test_a_busy_token_refresh_is_try_later_with_its_retry_after(
        tmp_path: Path, code: int, headers: dict, retry_after: float | None) -> None:
    """The gateway answers 429 to refreshes under a flood (docs/fleet-api.md: "they retry after
    Retry-After"): not ``AuthError`` ("revoked — enroll again with a fresh state dir"), and
    the upload it came before is retried after the gateway's Retry-After."""
    uploads: list[str] = []

    def gw(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/v1/token/refresh":
            return httpx.Response(code, headers=headers, json={"detail": "slow down"})
        uploads.append(r.url.path)
        return httpx.Response(201)

    client = _client(tmp_path, gw, expires_at=0.0)  # expired: each call refreshes first
    try:
        with pytest.raises(GatewayUnavailable) as info:
            client.refresh()
        assert info.value.retry_after == retry_after
        assert "revoked" not in str(info.value)
        out = client.upload_frame(JPEG, {"frame_id": "f0"})
        assert out.kind == "retry" and out.retry_after == retry_after, out
        assert "revoked" not in out.detail
        assert client.upload_frames([(JPEG, {"frame_id": "f1"})]).retry_after == retry_after
        assert (client.identity.access_token, client.identity.refresh_token) == ("acc", "ref")
        assert uploads == []
    finally:
        client.close()


def test_a_refused_token_refresh_is_still_auth_error(tmp_path: Path) -> None:
    def gw(r: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "refresh token was already used"})

    client = _client(tmp_path, gw, expires_at=0.0)
    try:
        with pytest.raises(AuthError, match="already used"):
            client.refresh()
    finally:
        client.close()


@pytest.mark.parametrize(("code", "headers", "retry_after"), NOT_NOW[:3], ids=["429", "408", "503"])
def test_a_busy_enrollment_is_try_later_not_a_refusal(
        tmp_path: Path, code: int, headers: dict, retry_after: float | None) -> None:
    """``EnrollmentError`` ends the agent (only ``GatewayUnavailable`` is retried): a 429 from
    the gateway's flood limit must not."""
    client = GatewayClient(URL, tmp_path / "state", transport=httpx.MockTransport(
        lambda r: httpx.Response(code, headers=headers, json={"detail": "busy"})))
    try:
        with pytest.raises(GatewayUnavailable) as info:
            client.enroll("tok", "cam", "1.0")
        assert info.value.retry_after == retry_after
        assert client.identity is None
        assert not (tmp_path / "state" / IDENTITY_FILE).exists()
    finally:
        client.close()


def test_a_refused_enrollment_is_still_enrollment_error(tmp_path: Path) -> None:
    client = GatewayClient(URL, tmp_path / "state", transport=httpx.MockTransport(
        lambda r: httpx.Response(401, json={"detail": "enrollment token was already used"})))
    try:
        with pytest.raises(EnrollmentError, match="already used"):
            client.enroll("tok", "cam", "1.0")
    finally:
        client.close()


def test_an_early_refresh_that_fails_does_not_stop_a_valid_token(tmp_path: Path) -> None:
    """60 s left of a 1 h token (inside the 120 s refresh margin), the refresh route busy: the
    upload goes with the still-valid token, and the refresh is tried again next time."""
    seen: list[tuple[str, str | None]] = []

    def gw(r: httpx.Request) -> httpx.Response:
        seen.append((r.url.path, r.headers.get("Authorization")))
        if r.url.path == "/v1/token/refresh":
            return httpx.Response(503, headers={"Retry-After": "5"})
        return httpx.Response(201)

    client = _client(tmp_path, gw, expires_at=time.time() + 60)
    try:
        assert client.upload_frame(JPEG, {"frame_id": "f0"}).kind == "stored"
        assert client.upload_frame(JPEG, {"frame_id": "f1"}).kind == "stored"
        assert seen == [("/v1/token/refresh", None), ("/v1/frames", "Bearer acc")] * 2
    finally:
        client.close()


# ---------------------------------------------------------------- 3: no token in messages
SECRET_A, SECRET_R = "SECRETaccess" + "a" * 30, "SECRETrefresh" + "r" * 30


@pytest.mark.parametrize("bad", [{"expires_in": "3600"}, {"expires_in": 10**9},
                                 {"refresh_token": SECRET_R + "\n"}],
                         ids=["expires-str", "expires-huge", "token-newline"])
def test_an_unusable_credential_answer_never_reaches_a_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: dict) -> None:
    """A 200/201 whose pair the agent cannot use is still live on the gateway: its bytes must
    not be quoted in the exception, the outcome's detail (logged by the agent) or the log."""
    pair = {"access_token": SECRET_A, "refresh_token": SECRET_R, "expires_in": 3600,
            "device_id": "dev-1", **bad}

    def gw(r: httpx.Request) -> httpx.Response:
        return httpx.Response(201 if r.url.path == "/v1/enroll" else 200, json=pair)

    caplog.set_level(logging.DEBUG)
    client = _client(tmp_path, gw, expires_at=0.0)
    fresh = GatewayClient(URL, tmp_path / "fresh", transport=httpx.MockTransport(gw))
    try:
        with pytest.raises(GatewayUnavailable) as refresh_info:
            client.refresh()
        out = client.upload_frame(JPEG, {"frame_id": "f0"})
        with pytest.raises(GatewayUnavailable) as enroll_info:
            fresh.enroll("tok", "cam", "1.0")
    finally:
        client.close()
        fresh.close()
    assert out.kind == "retry"
    texts = [str(refresh_info.value), out.detail, str(enroll_info.value),
             *(r.getMessage() for r in caplog.records)]
    assert "expires_in" in texts[0] or "refresh_token" in texts[0]  # still says what is wrong
    for text in texts:
        assert "SECRET" not in text, text


# ---------------------------------------------------------------- 4: unreadable documents
@pytest.mark.parametrize("call", ["get_manifest", "get_camera_config"])
def test_a_manifest_or_config_the_parser_gives_up_on_is_a_gateway_error(
        tmp_path: Path, call: str) -> None:
    """``[[[[…`` makes json raise RecursionError: callers catch ``GatewayError`` (the updater's
    poll), so it must come out as one."""
    client = _client(tmp_path, lambda r: httpx.Response(200, content=b"[" * 100_000))
    try:
        with pytest.raises(GatewayError, match="not JSON"):
            getattr(client, call)()
    finally:
        client.close()


GOOD_IDENTITY = {"device_id": "dev", "camera_id": "cam", "gateway_url": URL,
                 "access_token": "acc", "refresh_token": "ref", "expires_at": 4e9}


@pytest.mark.parametrize("content", [
    "[]", '"x"', "[" * 100_000,
    json.dumps({**GOOD_IDENTITY, "expires_at": "soon"}),
    json.dumps({**GOOD_IDENTITY, "access_token": None}),
    json.dumps({**GOOD_IDENTITY, "refresh_token": ""}),
    json.dumps({**GOOD_IDENTITY, "access_token": "a\nb"}),
    json.dumps({**GOOD_IDENTITY, "ttl_s": 0}),
    json.dumps({**GOOD_IDENTITY, "expires_at": 10**400}),
    json.dumps({**GOOD_IDENTITY, "scopes": "camera:write"}),
], ids=["list", "str", "nested", "expires-str", "token-null", "refresh-empty", "token-newline",
        "ttl-zero", "expires-huge", "scopes-str"])
def test_a_damaged_identity_file_is_a_gateway_error_at_once(tmp_path: Path, content: str) -> None:
    """Said once, at start, with the file's name and what to do — not an AttributeError, nor
    every later request failing as an "unreadable answer"."""
    (tmp_path / IDENTITY_FILE).write_text(content)
    with pytest.raises(GatewayError, match="unreadable device identity"):
        GatewayClient(URL, tmp_path, transport=httpx.MockTransport(lambda r: httpx.Response(201)))


def test_a_good_identity_file_still_loads(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).write_text(json.dumps({**GOOD_IDENTITY, "future_field": 1}))
    ident = DeviceIdentity.load(tmp_path)
    assert ident is not None and ident.access_token == "acc" and ident.ttl_s == 3600.0


def test_the_agent_waits_out_a_busy_enrollments_retry_after(tmp_path: Path) -> None:
    """EdgeAgent._enroll retries GatewayUnavailable on its own backoff (1 s first here), but
    not sooner than the gateway's Retry-After (a flood's 429 asked for 30 s)."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.agent_config import AgentConfig

    answers = iter([httpx.Response(429, headers={"Retry-After": "30"}, json={"detail": "busy"}),
                    httpx.Response(503, json={"detail": "down"})])
    client = GatewayClient(URL, tmp_path / "state", transport=httpx.MockTransport(
        lambda r: next(answers)))
    agent = EdgeAgent(AgentConfig(camera_id="cam", gateway_url=URL, enroll_token="tok",
                                  source="unused.mp4", model_path=tmp_path / "m.onnx",
                                  state_dir=tmp_path / "state",
                                  retry_base_s=1.0, retry_max_s=60.0))
    waits: list[float] = []

    def wait(delay: float) -> bool:  # the stop event: records the delay, stops after two
        waits.append(delay)
        return len(waits) == 2

    agent._stop.wait = wait  # type: ignore[method-assign]
    try:
        with pytest.raises(GatewayUnavailable):
            agent._enroll(client)
    finally:
        client.close()
    assert waits[0] == pytest.approx(30.0)  # the gateway's Retry-After, over our 1 s
    assert waits[1] < 30.0  # a 503 without one: our own backoff
