"""Unauthenticated and hostile traffic: authentication before the body, a per-address limit
before authentication, aggregated denial auditing, bounded headers and time, and an OpenAPI
document that names every error a route can answer.

In-process (``TestClient``) where the ASGI app is the subject; a real uvicorn server on
loopback (in a thread, small bounds) where the HTTP server is: raw sockets send half a
request and the test asserts the server closes it — with generous upper bounds only.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

import fleet.workers
from fleet.app import create_app
from fleet.auth import create_admin_token
from fleet.auth_first import AuthFirstRoute
from fleet.config import GatewaySettings
from fleet.db import AuditEvent, Database
from fleet.denials import OTHER_CLIENTS, DenialLog
from fleet.ratelimit import TokenBucketLimiter
from fleet.runtime import Gateway
from fleet.server import BoundedHttpToolsProtocol, ServerBounds, uvicorn_options
from launch.localfleet import free_port

T0 = datetime(2026, 5, 4, 12, 0, 0, tzinfo=UTC)
GENEROUS_S = 15.0  # upper bound for "the server closes it"; the bounds under test are < 1 s
ATTACKER = ("203.0.113.7", 40000)
SITE = ("198.51.100.20", 40001)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def heartbeat(camera_id: str, i: int = 0) -> dict[str, Any]:
    return {"schema_version": 1, "camera_id": camera_id, "model_version": None,
            "sent_at": (T0 + timedelta(seconds=i)).isoformat()}


def admin_token(gw: Gateway) -> str:
    with gw.db.write() as session:
        token, _ = create_admin_token(session, gw.now(), ttl_s=86400, actor="test")
        session.commit()
    return token


def enroll(client: Any, admin: str, camera_id: str) -> dict[str, Any]:
    tok = client.post("/v1/enrollment-tokens", json={"camera_id": camera_id},
                      headers=bearer(admin)).json()["enrollment_token"]
    r = client.post("/v1/enroll", json={"enrollment_token": tok, "camera_id": camera_id,
                                        "agent_version": "1"})
    assert r.status_code == 201, r.text
    return r.json()


class BodyReads:
    """ASGI wrapper that counts the application's calls to ``receive`` (body reads)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.reads = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting() -> dict:
            self.reads += 1
            return await receive()

        await self.app(scope, counting, send)


@dataclass
class InProcess:
    client: TestClient
    gw: Gateway
    admin: str
    reads: BodyReads


@pytest.fixture()
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    opened: list[TestClient] = []

    def _make(client_addr: tuple[str, int] = ("testclient", 50000), **overrides: Any
              ) -> InProcess:
        app = create_app(GatewaySettings(home=tmp_path / "home", **overrides),
                         clock=lambda: T0)
        reads = BodyReads(app)
        client = TestClient(reads, client=client_addr)
        client.__enter__()
        opened.append(client)
        gw = app.state.gateway
        return InProcess(client, gw, admin_token(gw), reads)

    yield _make
    for c in opened:
        c.__exit__(None, None, None)


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method, op


def _token_required(op: dict[str, Any]) -> bool:
    """Whether an operation requires a token: a security requirement without the empty
    alternative ({} is "no credential": /metrics from loopback)."""
    security = op.get("security") or []
    return bool(security) and {} not in security


def _concrete(path: str) -> str:
    return path.replace("{", "x-").replace("}", "")


# --------------------------------------------------------------------------- auth before body
def test_unauthenticated_requests_are_refused_without_reading_the_body(make_gateway: Any) -> None:
    """Every authenticated operation in the OpenAPI document: no token or a bogus one is a
    401, a token without the route's scope (a device on an admin route, an admin on a device
    route) a 403 — and the body is never read, however malformed (a JSON route used to
    parse it first and answer 422)."""
    g = make_gateway()
    device = enroll(g.client, g.admin, "cam-d")["access_token"]
    doc = g.client.get("/openapi.json").json()
    refused = {401: 0, 403: 0}
    for path, method, op in _operations(doc):
        if not _token_required(op):
            continue
        url = _concrete(path)
        for token in (None, "not-a-token", device, g.admin):
            g.reads.reads = 0
            headers = {"Content-Type": "application/json", **(bearer(token) if token else {})}
            r = g.client.request(method.upper(), url, content=b'{"broken": json,,',
                                 headers=headers)
            if token in (None, "not-a-token"):
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
            if r.status_code in (401, 403):
                assert g.reads.reads == 0, (method, path, token, "read the body first")
                refused[r.status_code] += 1
    assert refused[401] >= 2 * 20 and refused[403] >= 15, refused


def test_malformed_json_is_401_without_a_token_and_422_with_one(make_gateway: Any) -> None:
    g = make_gateway()
    dev = enroll(g.client, g.admin, "cam-a")["access_token"]
    bad = b'{"schema_version": 1, "camera_id": '
    for route in ("/v1/heartbeats", "/v1/enrollment-tokens", "/v1/rollouts"):
        r = g.client.post(route, content=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 401, (route, r.text)
    r = g.client.post("/v1/heartbeats", content=bad,
                      headers={**bearer(dev), "Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = g.client.post("/v1/rollouts", content=bad,
                      headers={**bearer(g.admin), "Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    # A well-formed heartbeat with the token still works (the early principal is reused).
    assert g.client.post("/v1/heartbeats", json=heartbeat("cam-a"),
                         headers=bearer(dev)).status_code == 202


def test_device_rate_limit_is_checked_before_the_body(make_gateway: Any) -> None:
    g = make_gateway(rate_limit_per_s=0.001, rate_limit_burst=1)
    dev = enroll(g.client, g.admin, "cam-a")["access_token"]
    assert g.client.post("/v1/heartbeats", json=heartbeat("cam-a"),
                         headers=bearer(dev)).status_code == 202
    g.reads.reads = 0
    r = g.client.post("/v1/heartbeats", content=b"garbage",
                      headers={**bearer(dev), "Content-Type": "application/json"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert g.reads.reads == 0


def test_every_router_authenticates_first(make_gateway: Any) -> None:
    from fleet import (
        admin,
        auth,
        camera_config,
        drift,
        heartbeats,
        intake,
        intake_batch,
        privacy,
        rollouts,
        traffic,
        traffic_preview,
        traffic_queries,
    )

    routers = (admin, camera_config, drift, heartbeats, intake, intake_batch, privacy, rollouts,
               traffic, traffic_preview, traffic_queries)
    for module in (auth, *routers):
        for route in module.router.routes:
            assert isinstance(route, AuthFirstRoute), (module.__name__, route)
    g = make_gateway()
    doc = g.client.get("/openapi.json").json()
    secured = [(p, m) for p, m, op in _operations(doc) if _token_required(op)]
    routes = {(r.path, m.lower()) for mod in routers
              for r in mod.router.routes for m in r.methods
              if isinstance(r, AuthFirstRoute) and r.early_dependencies}
    assert set(secured) == routes


# --------------------------------------------------------------------------- OpenAPI
def test_openapi_documents_every_error_answer(make_gateway: Any) -> None:
    """Every operation documents 413/422/429 (the body cap, validation and the per-address
    limit apply to all); every authenticated one 401 and 403 — all as ErrorOut."""
    g = make_gateway()
    doc = g.client.get("/openapi.json").json()
    authenticated = 0
    for path, method, op in _operations(doc):
        codes = {"413", "422", "429"} | ({"401", "403"} if op.get("security") else set())
        authenticated += bool(op.get("security"))
        for code in codes:
            assert code in op["responses"], (method, path, code)
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, code)
    assert authenticated >= 20
    assert "HTTPValidationError" not in doc["components"]["schemas"]


# --------------------------------------------------------------------------- per-address limit
def test_address_limit_prices_refusals_not_authenticated_devices(make_gateway: Any) -> None:
    """Many devices behind one address (a NAT) post freely: authenticated requests cost the
    address nothing. Refused requests from an address spend its bucket; then that address
    gets 429 before authentication — except for a token that authenticated recently (a
    device behind the flood's own NAT posts on); another address is unaffected."""
    g = make_gateway(client_addr=SITE, address_rate_limit_per_s=0.001,
                     address_rate_limit_burst=5, rate_limit_per_s=1000, rate_limit_burst=1000)
    tokens = [enroll(g.client, g.admin, f"cam-{i}")["access_token"] for i in range(5)]
    for i in range(60):
        cam = i % 4
        r = g.client.post("/v1/heartbeats", json=heartbeat(f"cam-{cam}", i),
                          headers=bearer(tokens[cam]))
        assert r.status_code == 202, (i, r.text)

    a = TestClient(g.reads, client=ATTACKER)
    codes = [a.post("/v1/heartbeats", json=heartbeat("cam-0"),
                    headers=bearer("stolen?")).status_code for _ in range(8)]
    assert codes == [401] * 5 + [429] * 3
    r = a.post("/v1/heartbeats", json=heartbeat("cam-0"), headers=bearer("stolen?"))
    assert r.status_code == 429 and r.headers["connection"] == "close"  # no body drained
    r = a.get("/v1/devices")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "connection" not in r.headers  # nothing to drain: the connection stays
    assert "203.0.113.7" in r.json()["detail"]
    # The Kubernetes probes have a bucket of their own (fleet.ratelimit.PROBE_ROUTES).
    assert a.get("/healthz").status_code == 200
    # A device behind the attacker's address, its token known: still posts, body and all.
    g.reads.reads = 0
    assert a.post("/v1/heartbeats", json=heartbeat("cam-0", 98),
                  headers=bearer(tokens[0])).status_code == 202
    assert g.reads.reads > 0
    # A token never used yet is not known: from that address it waits like the flood.
    assert a.post("/v1/heartbeats", json=heartbeat("cam-4", 98),
                  headers=bearer(tokens[4])).status_code == 429
    # The site's devices still post, the unused token too (their address is not the attacker's).
    assert g.client.post("/v1/heartbeats", json=heartbeat("cam-4", 99),
                         headers=bearer(tokens[4])).status_code == 202
    assert g.gw.stats.counters["unattributed_rate_limited"] == 6


def test_overall_budget_bounds_a_flood_from_many_addresses(make_gateway: Any) -> None:
    """Each address within its own limit, together past the gateway's: the next
    unattributed request is a 429 from any address; known devices are not affected; a
    known token that stops authenticating loses its exemption."""
    g = make_gateway(unattributed_rate_limit_per_s=0.001, unattributed_rate_limit_burst=10)
    dev = enroll(g.client, g.admin, "cam-a")
    assert g.client.post("/v1/heartbeats", json=heartbeat("cam-a"),
                         headers=bearer(dev["access_token"])).status_code == 202
    for i in range(10):
        c = TestClient(g.reads, client=(f"192.0.2.{i}", 1000))
        assert c.get("/v1/devices", headers=bearer(f"bad-{i}")).status_code == 401
    fresh = TestClient(g.reads, client=("192.0.2.200", 1000))
    r = fresh.get("/v1/devices")
    assert r.status_code == 429 and "in total" in r.json()["detail"]
    assert fresh.post("/v1/heartbeats", json=heartbeat("cam-a", 1),
                      headers=bearer(dev["access_token"])).status_code == 202
    g.client.post(f"/v1/devices/{dev['device_id']}/revoke", headers=bearer(g.admin))
    assert fresh.post("/v1/heartbeats", json=heartbeat("cam-a", 2),
                      headers=bearer(dev["access_token"])).status_code == 401
    assert fresh.post("/v1/heartbeats", json=heartbeat("cam-a", 3),
                      headers=bearer(dev["access_token"])).status_code == 429


def test_address_table_is_bounded() -> None:
    now = [0.0]
    lim = TokenBucketLimiter(1.0, 2, clock=lambda: now[0], max_keys=3)
    for key in ("a", "b", "c", "d", "e"):
        lim.acquire(key)
        lim.acquire(key)
    assert len(lim) == 3
    assert lim.wait_time("e") > 0 and lim.wait_time("a") == 0.0  # "a" was dropped: full again
    lim.charge("e")
    lim.charge("e")
    assert lim.wait_time("e") == pytest.approx(3.0)  # in debt: 2 more than empty
    now[0] += 3.0
    assert lim.wait_time("e") == 0.0


# --------------------------------------------------------------------------- denial audit
def test_a_thousand_refusals_write_a_few_rows_with_their_counts(
    make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = make_gateway(address_rate_limit_per_s=1e6, address_rate_limit_burst=1_000_000,
                     unattributed_rate_limit_per_s=1e6, unattributed_rate_limit_burst=1_000_000,
                     denial_audit_window_s=3600)
    writes = []
    real_write = g.gw.db.write

    def counting_write() -> Any:
        writes.append(1)
        return real_write()

    monkeypatch.setattr(g.gw.db, "write", counting_write)
    for i in range(1000):
        headers = bearer(f"bogus-{i}") if i % 2 else {}
        r = g.client.post("/v1/heartbeats", json=heartbeat("cam-a"), headers=headers)
        assert r.status_code == 401
    assert writes == []  # no transaction, no fsync per refusal
    assert g.gw.denials.pending() == 1000
    events = g.client.get("/v1/audit", params={"action": "auth_failure"},
                          headers=bearer(g.admin)).json()
    assert len(writes) == 1  # the audit read wrote both rows in one transaction
    assert sorted((e["detail"]["reason"], e["detail"]["count"]) for e in events) == [
        ("missing_token", 500), ("unknown_token", 500)]
    for e in events:
        assert e["outcome"] == "denied" and e["client"] == "testclient"
        assert e["detail"]["path"] == "/v1/heartbeats"
    assert g.gw.stats.counters["denied_auth_failure"] == 1000
    # Successful security events keep their own rows.
    enroll(g.client, g.admin, "cam-b")
    enroll(g.client, g.admin, "cam-c")
    events = g.client.get("/v1/audit", headers=bearer(g.admin)).json()
    assert sum(e["action"] == "enrolled" for e in events) == 2
    assert sum(e["action"] == "enrollment_token_created" for e in events) == 2


def test_made_up_enrollment_and_refresh_tokens_take_no_write_lock(
    make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = make_gateway()
    dev = enroll(g.client, g.admin, "cam-a")
    writes = []
    real_write = g.gw.db.write
    monkeypatch.setattr(g.gw.db, "write", lambda: writes.append(1) or real_write())
    for i in range(20):
        r = g.client.post("/v1/enroll", json={"enrollment_token": f"made-up-{i}",
                                              "camera_id": "cam-b", "agent_version": "1"})
        assert r.status_code == 401 and "unknown enrollment token" in r.json()["detail"]
        r = g.client.post("/v1/token/refresh", json={"refresh_token": f"made-up-{i}"})
        assert r.status_code == 401 and "unknown refresh token" in r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert writes == []
    # A real token still goes through the exchange (and its write).
    r = g.client.post("/v1/token/refresh", json={"refresh_token": dev["refresh_token"]})
    assert r.status_code == 200 and len(writes) == 1


def test_refusals_are_aggregated_per_client_reason_and_route(make_gateway: Any) -> None:
    g = make_gateway(address_rate_limit_per_s=1e6, address_rate_limit_burst=1_000_000,
                     unattributed_rate_limit_per_s=1e6, unattributed_rate_limit_burst=1_000_000,
                     denial_audit_window_s=3600)
    other = TestClient(g.reads, client=ATTACKER)
    for _ in range(3):
        g.client.get("/v1/devices")
        assert other.get("/v1/nothing-here").status_code == 404  # not a refusal
        other.post("/v1/devices/dev-1/revoke", headers=bearer("nope"))
        other.post("/v1/devices/dev-2/revoke", headers=bearer("nope"))
        g.client.post("/v1/enroll", json={"enrollment_token": "nope", "camera_id": "cam-z",
                                          "agent_version": "1"})
    rows = g.client.get("/v1/audit", headers=bearer(g.admin)).json()
    got = sorted((e["action"], e["client"], e["detail"]["reason"], e["detail"]["path"],
                  e["detail"]["count"]) for e in rows if e["outcome"] == "denied")
    assert got == [
        ("auth_failure", "203.0.113.7", "unknown_token", "/v1/devices/{device_id}/revoke", 6),
        ("auth_failure", "testclient", "missing_token", "/v1/devices", 3),
        ("enroll", "testclient", "unknown_token", None, 3),
    ]
    enroll_row = next(e for e in rows if e["action"] == "enroll")
    assert enroll_row["detail"]["camera_id"] == "cam-z"


def test_denial_log_window_shutdown_and_bounded_keys(tmp_path: Path) -> None:
    settings = GatewaySettings(home=tmp_path / "h")
    gw = Gateway(settings)
    gw.prepare_storage()

    def rows() -> list[AuditEvent]:
        with gw.db.read() as s:
            return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))

    # Past max_keys, new clients fold into one "(other)" row; counts are kept.
    log = DenialLog(gw.db, gw.now, window_s=3600, max_keys=3)
    for i in range(10):
        log.record("auth_failure", "unknown_token", client=f"10.0.0.{i}", route="/v1/frames")
    assert log.flush() == 4
    got = {r.client: r.detail["count"] for r in rows()}
    assert got == {"10.0.0.0": 1, "10.0.0.1": 1, "10.0.0.2": 1, OTHER_CLIENTS: 7}

    # The window thread writes on its own; stop() writes what is left.
    log = DenialLog(gw.db, gw.now, window_s=0.05)
    log.start()
    log.record("auth_failure", "missing_token", client="10.9.9.9", route="/v1/frames")
    deadline = time.monotonic() + GENEROUS_S
    while len(rows()) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(rows()) == 5
    log.record("auth_failure", "missing_token", client="10.9.9.9", route="/v1/frames")
    log.stop()
    assert len(rows()) == 6 and log.pending() == 0
    gw.db.dispose()


def test_pending_refusals_are_written_at_shutdown(tmp_path: Path) -> None:
    settings = GatewaySettings(home=tmp_path / "h")
    app = create_app(settings)
    with TestClient(app) as client:
        for _ in range(7):
            assert client.get("/v1/devices").status_code == 401
        assert app.state.gateway.denials.pending() == 7
    db = Database(settings.database_url)
    with db.read() as s:
        (row,) = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied"))
    assert row.detail["count"] == 7 and row.detail["reason"] == "missing_token"
    db.dispose()


# --------------------------------------------------------------------------- real server bounds
@dataclass
class Served:
    url: str
    port: int
    gw: Gateway
    admin: str


@contextmanager
def _serve(tmp_path: Path, **overrides: Any) -> Iterator[Served]:
    settings = GatewaySettings(home=tmp_path / "srv", **overrides)
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    gw = app.state.gateway
    try:
        yield Served(f"http://127.0.0.1:{port}", port, gw, admin_token(gw))
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Served]:
    with _serve(tmp_path, header_timeout_s=0.5, body_idle_timeout_s=0.5, body_timeout_s=0.5,
                max_header_bytes=2048, keep_alive_timeout_s=30) as s:
        yield s


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=GENEROUS_S)
    s.settimeout(GENEROUS_S)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (socket timeout = test failure)."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else -1


def _detail(raw: bytes) -> str:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])["detail"]


def test_half_sent_headers_are_answered_408_and_closed(served: Served) -> None:
    for partial in (b"", b"POST /v1/heartbeats HTTP/1.1\r\nHost: x\r\n", b"GET /heal"):
        with _connect(served.port) as s:
            s.sendall(partial)
            t0 = time.monotonic()
            raw = _read_until_closed(s)
            assert time.monotonic() - t0 < GENEROUS_S
        assert _status(raw) == 408, raw
        assert "did not arrive within 0.5 s" in _detail(raw)


def test_trickled_headers_do_not_extend_the_deadline(served: Served) -> None:
    with _connect(served.port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        raw = b""
        try:
            while time.monotonic() - t0 < GENEROUS_S:
                s.sendall(b"X-Pad: y\r\n")  # one header line every 0.1 s: never complete
                s.settimeout(0.1)
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                raw += chunk
                if not chunk or raw.endswith(b"}"):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert time.monotonic() - t0 < GENEROUS_S, "a trickling client held the connection"
    assert raw == b"" or _status(raw) in (408, 431), raw  # b"": reset while still sending


def test_many_half_open_connections_are_all_closed(served: Served) -> None:
    socks = [_connect(served.port) for _ in range(100)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"POST /v1/frames HTTP/1.1\r\nHost: x\r\nContent-Le"[: 5 + i % 40])
        for s in socks:
            assert _status(_read_until_closed(s)) == 408
    finally:
        for s in socks:
            s.close()
    assert httpx.get(f"{served.url}/healthz", timeout=GENEROUS_S).status_code == 200


def test_oversized_headers_are_431(served: Served) -> None:
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
    with _connect(served.port) as s:  # in one piece
        s.sendall(big)
        raw = _read_until_closed(s)
    assert _status(raw) == 431 and "2048 bytes" in _detail(raw)
    with _connect(served.port) as s:  # in pieces, never complete
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        raw = b""
        try:
            for _ in range(40):
                s.sendall(b"X-Pad: " + b"b" * 90 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = _read_until_closed(s)
    assert _status(raw) == 431, raw
    # The header bound leaves ordinary requests alone.
    assert httpx.get(f"{served.url}/healthz", timeout=GENEROUS_S).status_code == 200


def test_body_bytes_do_not_count_as_header_bytes(served: Served) -> None:
    """Requests whose head + body (3 KB) pass the 2 KiB header bound, each in one piece, on
    one keep-alive connection: answered normally, the connection kept."""
    body = json.dumps({"enrollment_token": "nope", "camera_id": "cam-1", "agent_version": "1",
                       "hardware": {"pad": "x" * 3000}}).encode()
    request = (b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with _connect(served.port) as s:
        for _ in range(3):
            s.sendall(request)
            raw = b""
            while b"}" not in raw:
                chunk = s.recv(65536)
                assert chunk, f"closed after {raw!r}"
                raw += chunk
            assert _status(raw) == 401, raw


def test_half_sent_body_is_408_and_closed(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=GENEROUS_S) as c:
        dev = enroll(c, served.admin, "cam-slow")["access_token"]
    body = json.dumps(heartbeat("cam-slow")).encode()
    head = (f"POST /v1/heartbeats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {dev}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with _connect(served.port) as s:
        s.sendall(head + body[:10])
        raw = _read_until_closed(s)
    assert _status(raw) == 408, raw
    assert "request body" in _detail(raw)
    assert b"connection: close" in raw.lower()


def test_unauthenticated_half_sent_body_is_401_then_closed(served: Served) -> None:
    head = (b"POST /v1/frames HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
            b"Content-Type: multipart/form-data; boundary=z\r\nContent-Length: 5000000\r\n\r\n")
    with _connect(served.port) as s:
        s.sendall(head + b"x" * 1000)
        raw = _read_until_closed(s)  # 401 at once, closed when the body fails to drain
    assert _status(raw) == 401, raw
    assert "unknown access token" in _detail(raw)


def test_keep_alive_then_half_sent_next_request_is_closed(served: Served) -> None:
    with _connect(served.port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert _status(first) == 200
        s.sendall(b"\r\nGET /healthz HTTP/1.1\r\nHo")
        raw = _read_until_closed(s)
    assert _status(raw) == 408, raw


def test_concurrency_limit_answers_503(tmp_path: Path) -> None:
    with _serve(tmp_path, limit_concurrency=8, header_timeout_s=60) as served:
        socks = [_connect(served.port) for _ in range(8)]
        try:
            for s in socks:
                s.sendall(b"GET /healthz HTTP/1.1\r\n")  # held open, headers pending
            r = httpx.get(f"{served.url}/healthz", timeout=GENEROUS_S)
            assert r.status_code == 503
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + GENEROUS_S
        while httpx.get(f"{served.url}/healthz", timeout=GENEROUS_S).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_serve_runs_uvicorn_with_the_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    from fleet.cli import gateway_app

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    # several workers: each its own SO_REUSEPORT socket under uvicorn's supervisor
    monkeypatch.setattr(fleet.workers, "run_workers", lambda config, sockets: calls.append(
        {"http": config.http, "workers": config.workers, "sockets": sockets,
         "limit_concurrency": config.limit_concurrency}))
    for key in ("HOME", "DATABASE_URL", "HOST", "PORT", "WORKERS", "RECONCILE_ON_START"):
        # serve sets these for its workers: set-then-delete makes monkeypatch restore them
        monkeypatch.setenv(f"ROADLOOP_GATEWAY_{key}", "")
        monkeypatch.delenv(f"ROADLOOP_GATEWAY_{key}")
    # serve --workers 2 names a multiprocess metrics folder for its workers (fleet.metrics)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setenv("ROADLOOP_GATEWAY_HEADER_TIMEOUT_S", "3.5")
    monkeypatch.setenv("ROADLOOP_GATEWAY_LIMIT_CONCURRENCY", "300")
    home = str(tmp_path / "h")
    for workers in ("1", "2"):
        r = CliRunner().invoke(gateway_app, ["serve", "--home", home, "--workers", workers])
        assert r.exit_code == 0, r.output
    one, two = calls
    assert issubclass(one["http"], BoundedHttpToolsProtocol)
    assert one["http"].bounds == ServerBounds(16 * 1024, 3.5, 15.0)
    assert one["limit_concurrency"] == 300 and one["timeout_keep_alive"] == 5.0
    assert two["http"] == "fleet.server:BoundedHttpToolsProtocol" and two["workers"] == 2
    assert two["sockets"] == "reuse_port" and two["limit_concurrency"] == 300
