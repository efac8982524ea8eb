"""The edge client bounds what it reads from the gateway: at most ``MAX_RESPONSE_BYTES`` of an
answer (decoded, so a gzip bomb too) and a deadline per request (a byte-at-a-time answer,
each read inside httpx's per-read timeout, does not hold the caller). Past either: retry."""
from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from edge_agent import http_deadline
from edge_agent.client import GatewayClient
from edge_agent.errors import DownloadIncomplete, GatewayUnavailable
from edge_agent.identity import DeviceIdentity
from edge_agent.manifest import ModelManifest
from edge_agent.model_store import ModelStore

URL = "http://gateway.test"
CHUNK = 1 << 20
TOTAL = 48 * CHUNK  # far past the cap; never read whole
# What a test lets the client read of an endless answer: its cap
# (http_deadline.MAX_RESPONSE_BYTES, 4 MiB) plus a chunk, with room; fixed here so the tests
# say the same on a client without one.
READ_BOUND = 8 * CHUNK
ERROR_READ_BOUND = 2 * CHUNK  # a model download's error answer (model_store.ERROR_BODY_BYTES)


def test_the_caps_are_within_the_tests_bounds() -> None:
    from edge_agent import model_store

    assert 64 * 1024 <= http_deadline.MAX_RESPONSE_BYTES <= READ_BOUND - CHUNK
    assert model_store.ERROR_BODY_BYTES <= ERROR_READ_BOUND - CHUNK


class Counting(httpx.SyncByteStream):
    """``head``, then spaces in 1 MiB chunks up to ``total``, then ``tail``; counts what was
    taken."""

    def __init__(self, head: bytes, tail: bytes = b"}", total: int = TOTAL,
                 chunk: int = CHUNK, pause_s: float = 0.0) -> None:
        self.head, self.tail, self.total, self.chunk, self.pause_s = head, tail, total, chunk, pause_s
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        while self.sent < self.total:
            if self.pause_s:
                time.sleep(self.pause_s)
            self.sent += self.chunk
            yield b" " * self.chunk
        yield self.tail


def _client(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response], *,
            timeout_s: float = 10.0, expires_at: float = 4e9) -> GatewayClient:
    state = tmp_path / "state"
    DeviceIdentity("dev", "cam", URL, "acc", "ref", expires_at=expires_at).save(state)
    return GatewayClient(URL, state, timeout_s=timeout_s,
                         transport=httpx.MockTransport(handler))


ITEMS = [(b"\xff\xd8a\xff\xd9", {"frame_id": "f0"}), (b"\xff\xd8b\xff\xd9", {"frame_id": "f1"})]


@pytest.mark.parametrize("what", ["batch", "frame_503", "frame_422", "heartbeat",
                                  "camera_config", "manifest", "token_refresh"])
def test_an_endless_answer_is_read_up_to_the_cap_then_retried(tmp_path: Path, what: str) -> None:
    streams: list[Counting] = []

    def gw(request: httpx.Request) -> httpx.Response:
        if what != "token_refresh" and request.url.path == "/v1/token/refresh":
            raise AssertionError("no refresh expected")
        s = Counting(b'{"results": []' if what == "batch" else b'{"detail": "x"')
        streams.append(s)
        code = {"frame_503": 503, "frame_422": 422, "heartbeat": 202}.get(what, 200)
        return httpx.Response(code, stream=s, headers={"Content-Type": "application/json"})

    client = _client(tmp_path, gw, expires_at=0.0 if what == "token_refresh" else 4e9)
    try:
        if what == "batch":
            out = client.upload_frames(ITEMS)
            assert out.kind == "retry" and [r.kind for r in out.results] == ["retry", "retry"]
        elif what in ("frame_503", "frame_422", "token_refresh"):
            assert client.upload_frame(b"x", {"frame_id": "f0"}).kind == "retry"
        elif what == "heartbeat":
            assert client.post_heartbeat("{}").kind == "retry"
        else:
            poll = client.get_camera_config if what == "camera_config" else client.get_manifest
            with pytest.raises(GatewayUnavailable, match="longer than"):
                poll()
    finally:
        client.close()
    assert streams, "the gateway was not asked"
    assert max(s.sent for s in streams) <= READ_BOUND


def test_a_gzip_bomb_is_bounded_after_decoding(tmp_path: Path) -> None:
    bomb = gzip.compress(b'{"results": [' + b" " * (64 * CHUNK) + b"]}", 9)  # ~64 KiB
    assert len(bomb) < CHUNK

    def gw(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bomb, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"})

    client = _client(tmp_path, gw)
    try:
        out = client.upload_frames(ITEMS)
    finally:
        client.close()
    assert out.kind == "retry" and "longer than" in out.detail


def test_real_answers_still_read_gzipped_or_not(tmp_path: Path) -> None:
    results = {"results": [{"frame_id": "f0", "status": 201},
                           {"frame_id": "f1", "status": 409, "detail": "already stored"}]}
    gzipped = {"n": 0}

    def gw(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/frames/batch":
            gzipped["n"] += 1
            return httpx.Response(200, content=gzip.compress(json.dumps(results).encode()),
                                  headers={"Content-Encoding": "gzip",
                                           "Content-Type": "application/json"})
        if request.url.path == "/v1/frames":
            return httpx.Response(422, json={"detail": "bad metadata"})
        return httpx.Response(200, json={"camera_id": "cam"}, headers={"ETag": '"e1"'})

    client = _client(tmp_path, gw)
    try:
        batch = client.upload_frames(ITEMS)
        single = client.upload_frame(b"x", {"frame_id": "f0"})
        poll = client.get_camera_config()
    finally:
        client.close()
    assert gzipped["n"] == 1
    assert batch.kind == "results"
    assert [r.kind for r in batch.results] == ["stored", "duplicate"]
    assert (single.kind, single.detail) == ("rejected", "bad metadata")
    assert poll.changed and poll.etag == '"e1"' and poll.body == {"camera_id": "cam"}


def test_a_slow_answer_past_the_deadline_is_dropped(tmp_path: Path) -> None:
    """A body that keeps coming (each piece well inside the per-read timeout) is cut off at the
    request's deadline (a few × timeout_s), not read for as long as the gateway likes."""
    stream = Counting(b'{"detail": "x"', total=40 * 1024, chunk=1024, pause_s=0.05)  # ~2 s

    def gw(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=stream)

    client = _client(tmp_path, gw, timeout_s=0.1)
    try:
        with pytest.raises(GatewayUnavailable, match="deadline"):
            client.get_camera_config()
    finally:
        client.close()
    assert stream.sent < stream.total  # given up mid-body, however slow the machine


def test_a_slow_upload_still_gets_its_answer_read(tmp_path: Path) -> None:
    """The deadline never drops a prompt answer to a request whose sending took long (a large
    batch on a slow uplink): that batch would be resent forever."""

    def gw(request: httpx.Request) -> httpx.Response:
        time.sleep(0.4)  # 4 × timeout_s before the headers
        return httpx.Response(200, json={"results": [{"frame_id": "f0", "status": 201},
                                                     {"frame_id": "f1", "status": 201}]})

    client = _client(tmp_path, gw, timeout_s=0.1)
    try:
        out = client.upload_frames(ITEMS)
    finally:
        client.close()
    assert out.kind == "results", out.detail


class Drip(BaseHTTPRequestHandler):
    """503, then its body one byte every 0.2 s (each read inside timeout_s) for 6 s."""

    def log_message(self, *a: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.send_header("Content-Length", "30")
        self.end_headers()
        for _ in range(30):
            try:
                self.wfile.write(b" ")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)


def test_a_trickled_answer_does_not_hold_the_uploader(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    DeviceIdentity("dev", "cam", url, "acc", "ref", expires_at=4e9).save(tmp_path)
    client = GatewayClient(url, tmp_path, timeout_s=0.5)
    try:
        t0 = time.monotonic()
        out = client.upload_frame(b"x", {"frame_id": "f0"})
        took = time.monotonic() - t0
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    assert out.kind == "retry" and "deadline" in out.detail
    assert took < 4.0, f"held {took:.1f} s with timeout_s=0.5"


def test_a_model_download_error_body_is_bounded(tmp_path: Path) -> None:
    streams: list[Counting] = []

    def gw(request: httpx.Request) -> httpx.Response:
        s = Counting(b'{"detail": "x"')
        streams.append(s)
        return httpx.Response(500, stream=s)

    client = _client(tmp_path, gw)
    store = ModelStore(tmp_path / "models", client)
    m = ModelManifest(model_version="1", sha256="a" * 64, size=10, input_size=64,
                      class_names=("car",), key_id="k")
    try:
        with pytest.raises(DownloadIncomplete):
            store.download(m)
    finally:
        client.close()
    assert streams and max(s.sent for s in streams) <= ERROR_READ_BOUND
