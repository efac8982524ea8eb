"""The edge agent against a gateway (or whatever sits in front of it) that answers outside the
contract of ``docs/fleet-api.md``: the upload calls never raise, the uploader thread never
dies, no frame or traffic record is dropped without the gateway's acknowledgement (201/409)
or refusal (4xx), and a server's ``Retry-After`` is honoured (delta-seconds or HTTP-date)
but bounded (``edge_agent.outbox.MAX_RETRY_AFTER_S``)."""

from __future__ import annotations

import json
import math
import threading
import time
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest

import edge_agent.gateway_answers as answers_module
import edge_agent.outbox as outbox_module
from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent
from edge_agent.client import GatewayClient
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.identity import DeviceIdentity
from edge_agent.outbox import BackoffPolicy, Outbox
from edge_agent.record_outbox import RecordOutbox

from . import test_agent_batch_upload as batch_tests
from .test_agent_batch_upload import URL, FakeGateway, results

make = batch_tests.make  # fixture: make(gateway, n) -> (FrameUploader, Outbox) with n frames

NESTED = b"[" * 100_000  # json gives up with RecursionError, not ValueError
MAX_RETRY_AFTER_S = 3600.0  # edge_agent.outbox.MAX_RETRY_AFTER_S, the documented bound


def _frames(n: int) -> list[tuple[bytes, dict]]:
    return [(b"\xff\xd8x\xff\xd9", {"frame_id": f"f{i}"}) for i in range(n)]


def _client(tmp_path: Path, handler, *, expires_at: float = 4e9) -> GatewayClient:
    state = tmp_path / "state"
    DeviceIdentity("dev", "cam", URL, "acc", "ref", expires_at=expires_at).save(state)
    return GatewayClient(URL, state, transport=httpx.MockTransport(handler))


# ---------------------------------------------------------------- D2: unreadable answers
@pytest.mark.parametrize("n", [1, 2])
def test_deeply_nested_json_error_body_is_a_retry_and_keeps_the_frames(make, n: int) -> None:
    up, outbox = make(lambda r: httpx.Response(503, content=NESTED), n)
    assert up.client.upload_frame(*_frames(1)[0]).kind == "retry"
    assert up.client.upload_frames(_frames(2)).kind == "retry"
    assert up.upload(outbox.due(float("inf"))) is not None
    assert set(outbox.journal().values()) == {"queued"}


def test_deeply_nested_json_in_batch_results_is_a_retry(make) -> None:
    up, outbox = make(lambda r: httpx.Response(200, content=b'{"results":' + NESTED), 2)
    out = up.client.upload_frames(_frames(2))
    assert out.kind == "retry" and len(out.results) == 2
    assert all(o.kind == "retry" for o in out.results)
    assert up.upload(outbox.due(float("inf"))) is not None
    assert outbox.journal() == {"f0": "queued", "f1": "queued"}


@pytest.mark.parametrize("body", [
    b"<html>proxy page</html>",
    NESTED,
    b"[]",
    b'{"access_token": "A2"}',
    b'{"access_token": "A2", "refresh_token": "R2", "expires_in": "soon"}',
    b'{"access_token": "A2", "refresh_token": "R2", "expires_in": Infinity}',
    b'{"access_token": "A2", "refresh_token": "R2", "expires_in": -5}',
    b'{"access_token": "A2", "refresh_token": "R2", "expires_in": true}',
    b'{"access_token": "", "refresh_token": "R2", "expires_in": 3600}',
    b'{"access_token": "A2", "refresh_token": ["R2"], "expires_in": 3600}',
], ids=["html", "nested", "list", "no-refresh", "soon", "inf", "negative", "bool", "empty",
        "not-str"])
def test_unreadable_token_refresh_is_a_retry_and_changes_no_identity(
        tmp_path: Path, body: bytes) -> None:
    """A 200 from /v1/token/refresh that is not a whole token pair: nothing is applied (memory
    and identity.json keep the pair they had, equal), and the upload is retried later."""
    uploads: list[str] = []

    def gw(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/v1/token/refresh":
            return httpx.Response(200, content=body)
        uploads.append(r.url.path)
        return httpx.Response(201)

    client = _client(tmp_path, gw, expires_at=0.0)  # expired: the next call refreshes
    try:
        assert client.upload_frame(*_frames(1)[0]).kind == "retry"
        assert client.upload_frames(_frames(2)).kind == "retry"
        assert client.post_traffic_interval('{"record_id": "r"}').kind == "retry"
        on_disk = DeviceIdentity.load(tmp_path / "state")
        assert on_disk == client.identity
        assert (client.identity.access_token, client.identity.refresh_token) == ("acc", "ref")
        assert uploads == []
    finally:
        client.close()


def test_a_good_token_refresh_still_rotates_and_persists_the_pair(tmp_path: Path) -> None:
    def gw(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/v1/token/refresh":
            return httpx.Response(200, json={"access_token": "A2", "refresh_token": "R2",
                                             "expires_in": 1800})
        assert r.headers["Authorization"] == "Bearer A2"
        return httpx.Response(201)

    client = _client(tmp_path, gw, expires_at=0.0)
    try:
        assert client.upload_frame(*_frames(1)[0]).kind == "stored"
        on_disk = DeviceIdentity.load(tmp_path / "state")
        assert on_disk == client.identity and on_disk.refresh_token == "R2"
        assert on_disk.ttl_s == 1800.0 and on_disk.expires_at > time.time() + 1700
    finally:
        client.close()


def _agent(state: Path, client: GatewayClient) -> EdgeAgent:
    """An agent with only what its upload loop needs, with a fast backoff."""
    cfg = AgentConfig(gateway_url=client.gateway_url, camera_id="cam", source="x",
                      model_path=state / "m.onnx", state_dir=state, retry_base_s=0.01,
                      retry_max_s=0.02)
    agent = EdgeAgent(cfg, status_stream=open("/dev/null", "w"))  # noqa: SIM115
    agent.client = client
    agent.outbox = Outbox(state / "outbox", backoff=BackoffPolicy(0.01, 0.02))
    agent.records = RecordOutbox(state / "records", backoff=BackoffPolicy(0.01, 0.02))
    agent.telemetry = TelemetryWindow("cam", "v", ["car"])
    agent.redactor = object()  # type: ignore[assignment]  # frames may leave
    agent.summary = AgentSummary("cam", "dev", "v", stopped_by="test")
    return agent


def _drain_with_uploader(agent: EdgeAgent) -> tuple[bool, int]:
    """Run the agent's uploader thread until the outbox is empty (10 s at most); returns
    (the thread was still alive then, frames left)."""
    thread = threading.Thread(target=agent._upload_loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while agent.outbox.depth() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return thread.is_alive(), agent.outbox.depth()
    finally:
        agent._uploads_stop.set()
        agent._wake_uploader.set()
        thread.join(5)
        agent.client.close()
        agent.outbox.close()
        agent.records.close()


@pytest.mark.parametrize("first", ["nested_json", "refresh_garbage", "bug_in_a_round"])
def test_upload_loop_survives_a_bad_answer_and_drains_after_recovery(
        tmp_path: Path, first: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def gw(r: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if r.url.path == "/v1/token/refresh":
            if calls["n"] <= 2:
                return httpx.Response(200, content=b"<html>proxy page</html>")
            return httpx.Response(200, json={"access_token": "A", "refresh_token": "R",
                                             "expires_in": 3600})
        if first == "nested_json" and calls["n"] == 1:
            return httpx.Response(503, content=NESTED)
        return httpx.Response(201)

    expires = 0.0 if first == "refresh_garbage" else 4e9
    DeviceIdentity("dev", "cam", URL, "acc", "ref", expires_at=expires).save(tmp_path)
    agent = _agent(tmp_path, GatewayClient(URL, tmp_path, transport=httpx.MockTransport(gw)))
    if first == "bug_in_a_round":  # anything raising inside a round, e.g. the outbox's disk
        real_due, raised = agent.outbox.due, []

        def due(*args, **kwargs):
            if not raised:
                raised.append(1)
                raise OSError("disk I/O error")
            return real_due(*args, **kwargs)

        monkeypatch.setattr(agent.outbox, "due", due)
    agent.outbox.put("f0", b"\xff\xd8x\xff\xd9", {"frame_id": "f0"}, 1.0)
    alive, depth = _drain_with_uploader(agent)
    assert alive, "the uploader thread died"
    assert depth == 0, "the frame was never uploaded after the gateway recovered"


# ---------------------------------------------------------------- D3: out-of-contract statuses
@pytest.mark.parametrize("code", [0, -1, 100, 200, 202, 204, 301, 302, 304, 600])
def test_per_frame_status_outside_the_contract_keeps_the_frame(make, code: int) -> None:
    up, outbox = make(FakeGateway(lambda frames: results([code] * len(frames), frames)), 2)
    assert up.upload(outbox.due(float("inf"))) is not None  # a transient failure: pause
    assert outbox.journal() == {"f0": "queued", "f1": "queued"}


def test_documented_per_frame_refusals_still_reject_including_410(make) -> None:
    codes = [201, 409, 403, 410, 413, 422, 400, 429, 503, 507]
    up, outbox = make(FakeGateway(lambda frames: results(codes, frames)), len(codes))
    up.upload(outbox.due(float("inf")))
    assert list(outbox.journal().values()) == [
        "acked", "duplicate", "rejected", "rejected", "rejected", "rejected", "rejected",
        "queued", "queued", "queued"]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("n", [1, 2])  # the single route, the batch route
def test_a_redirect_keeps_every_frame_and_says_so(make, code: int, n: int) -> None:
    up, outbox = make(lambda r: httpx.Response(
        code, headers={"Location": "https://elsewhere.example/"}), n)
    out = up.client.upload_frame(*_frames(1)[0])
    assert out.kind == "retry" and "elsewhere.example" in out.detail
    assert up.upload(outbox.due(float("inf"))) is not None
    assert set(outbox.journal().values()) == {"queued"}, outbox.journal()


@pytest.mark.parametrize("code", [100, 200, 202, 204, 302])
def test_single_upload_answer_other_than_201_is_not_an_acknowledgement(make, code: int) -> None:
    """E.g. a captive portal's 200 login page in front of the gateway."""
    up, outbox = make(lambda r: httpx.Response(
        code, content=b"<html>login</html>", headers={"Content-Type": "text/html"}), 1)
    assert up.upload(outbox.due(float("inf"))) is not None
    assert outbox.journal() == {"f0": "queued"}


@pytest.mark.parametrize("code", [201, 202, 204, 302])
def test_whole_batch_answer_other_than_200_outside_4xx_keeps_the_frames(make, code: int) -> None:
    up, outbox = make(FakeGateway(lambda frames: httpx.Response(code)), 2)
    batch = up.client.upload_frames(_frames(2))
    assert batch.kind == "retry" and [o.kind for o in batch.results] == ["retry", "retry"]
    assert up.upload(outbox.due(float("inf"))) is not None
    assert outbox.journal() == {"f0": "queued", "f1": "queued"}


@pytest.mark.parametrize(("code", "kept"), [(200, True), (302, True), (100, True),
                                            (201, False), (409, False), (422, False)])
def test_traffic_records_are_dropped_only_on_201_409_or_a_refusal(
        tmp_path: Path, code: int, kept: bool) -> None:
    client = _client(tmp_path, lambda r: httpx.Response(code, json={"detail": "x"}))
    agent = _agent(tmp_path, client)
    try:
        agent.records.put("r1", {"record_id": "r1"})
        pause = agent._send_records()
        assert (pause is not None) == kept
        assert agent.records.depth() == (1 if kept else 0)
    finally:
        client.close()
        agent.outbox.close()
        agent.records.close()


def test_heartbeat_is_acknowledged_by_202_only(tmp_path: Path) -> None:
    codes = iter([202, 200, 302])
    client = _client(tmp_path, lambda r: httpx.Response(next(codes)))
    try:
        assert [client.post_heartbeat("{}").kind for _ in range(3)] == ["stored", "retry",
                                                                         "retry"]
    finally:
        client.close()


# ---------------------------------------------------------------- D1: Retry-After
@pytest.mark.parametrize("value", ["99999999999", "1" + "0" * 400, "inf", "1e308",
                                   "Fri, 31 Dec 9999 23:59:59 GMT"])
@pytest.mark.parametrize("n", [1, 2])  # the single route, the batch route
def test_huge_retry_after_is_bounded(make, value: str, n: int) -> None:
    up, outbox = make(lambda r: httpx.Response(503, headers={"Retry-After": value}), n)
    before = time.time()
    pause = up.upload(outbox.due(float("inf")))
    assert pause is not None and pause == MAX_RETRY_AFTER_S
    assert outbox.due(before + MAX_RETRY_AFTER_S - 60) == []  # the server's delay, honoured
    assert len(outbox.due(time.time() + MAX_RETRY_AFTER_S + 1)) == n  # and no longer


def test_http_date_retry_after_is_honoured(make) -> None:
    date = formatdate(time.time() + 600, usegmt=True)
    up, outbox = make(lambda r: httpx.Response(503, headers={"Retry-After": date}), 1)
    pause = up.upload(outbox.due(float("inf")))
    assert pause is not None and 500 <= pause <= 601
    assert outbox.due(time.time() + 300) == []
    assert len(outbox.due(time.time() + 700)) == 1


def test_parse_retry_after() -> None:
    assert outbox_module.MAX_RETRY_AFTER_S == MAX_RETRY_AFTER_S
    parse_retry_after = answers_module.parse_retry_after
    now = 1_000_000_000.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 2.5 ", now) == 2.5
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after("", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after("-inf", now) == MAX_RETRY_AFTER_S
    assert parse_retry_after("99999999999", now) == MAX_RETRY_AFTER_S
    assert parse_retry_after(formatdate(now + 120, usegmt=True), now) == pytest.approx(120)
    assert parse_retry_after(formatdate(now - 120, usegmt=True), now) == 0.0  # past: now
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 -0000", now) == 0.0
    assert parse_retry_after("Mon, 99 Foo 2020 99:99:99 GMT", now) is None


@pytest.mark.parametrize("value", [math.inf, 1e12, -5.0, math.nan])
def test_outboxes_bound_a_retry_after_they_are_given(tmp_path: Path, value: float) -> None:
    now = 1_000_000.0
    with Outbox(tmp_path / "ob", backoff=BackoffPolicy(0.01, 0.02)) as ob, \
            RecordOutbox(tmp_path / "rec", backoff=BackoffPolicy(0.01, 0.02)) as rec:
        ob.put("f", b"\xff\xd8x\xff\xd9", {"frame_id": "f"}, 1.0)
        rec.put("r", {"record_id": "r"}, now=now)
        delay = ob.fail("f", "503", now=now, retry_after=value)
        rec.fail("r", "503", now=now, retry_after=value)
        assert 0.0 <= delay <= MAX_RETRY_AFTER_S and math.isfinite(delay)
        assert rec.next_due_at() is not None
        assert now <= rec.next_due_at() <= now + MAX_RETRY_AFTER_S
        if value > 0:  # a large request is taken as the bound, never as "never"
            assert delay == MAX_RETRY_AFTER_S
            assert rec.next_due_at() == now + MAX_RETRY_AFTER_S


def test_traffic_record_pause_is_bounded(tmp_path: Path) -> None:
    client = _client(tmp_path, lambda r: httpx.Response(503, headers={"Retry-After": "1e400"}))
    agent = _agent(tmp_path, client)
    try:
        agent.records.put("r1", {"record_id": "r1"})
        assert agent._send_records() == MAX_RETRY_AFTER_S
        assert agent.records.due(time.time() + MAX_RETRY_AFTER_S + 1) != []
    finally:
        client.close()
        agent.outbox.close()
        agent.records.close()


def test_per_frame_retry_in_a_batch_carries_the_bounded_retry_after(tmp_path: Path) -> None:
    body = json.dumps({"results": [{"frame_id": "f0", "status": 429}]}).encode()
    client = _client(tmp_path, lambda r: httpx.Response(
        200, content=body, headers={"Retry-After": "1" + "0" * 400}))
    try:
        out = client.upload_frames(_frames(1))
    finally:
        client.close()
    assert out.kind == "results" and out.results[0].kind == "retry"
    assert out.results[0].retry_after == MAX_RETRY_AFTER_S
