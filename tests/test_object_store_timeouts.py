"""The object store's client timeouts (``roadloop.data.s3_client.S3Timeouts``, the
gateway's ``s3_*`` settings): a store that accepts connections and never answers fails a
request after ``max_attempts`` tries of ``read_s`` each (an ``OSError``: the gateway's 503),
instead of botocore's 60 s reads tried up to 5 times. The stalled store is a socket that
accepts and never answers; it counts the connections, so the attempts are checked, not the
time they took."""

from __future__ import annotations

import dataclasses
import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent_config import AgentConfig
from fleet.config import GatewaySettings
from roadloop.data import s3_client
from roadloop.data.object_frames import S3FrameStore, open_frame_store

from . import test_fleet_gateway as gateway_tests
from .helpers import encode_jpeg, synthetic_image
from .test_fleet_gateway import bearer, meta, post_frame
from .test_frames import record

make_env = gateway_tests.make_env  # fixture: an in-process gateway
frame_jpeg = gateway_tests.frame_jpeg
QUICK = {"s3_connect_timeout_s": 0.5, "s3_read_timeout_s": 0.2, "s3_max_attempts": 2}


class StalledStore:
    """A TCP endpoint that accepts connections and never answers (a hung S3 proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.accepted: list[socket.socket] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with self._changed:
                self.accepted.append(conn)
                self._changed.notify_all()

    def connections(self, at_least: int) -> int:
        """The connections accepted, once ``at_least`` were (this thread may accept a client's
        connection after the client gave up on it)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.accepted) >= at_least, timeout=60)
            return len(self.accepted)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture()
def stalled(monkeypatch: pytest.MonkeyPatch, s3_server: Any) -> Iterator[StalledStore]:
    for k, v in s3_server.env.items():  # credentials for the clients built from settings
        monkeypatch.setenv(k, v)
    store = StalledStore()
    yield store
    store.close()


def _config(store: S3FrameStore) -> tuple[float, float, dict[str, Any]]:
    c = store.client.meta.config
    return c.connect_timeout, c.read_timeout, c.retries


def test_the_defaults_answer_before_the_agent_gives_up(tmp_path: Path,
                                                       stalled: StalledStore) -> None:
    """botocore's defaults (60 s connect, 60 s read, legacy retries) are replaced, and the
    worst case of one stalled request (every attempt's connect and read, and the < 1 s
    backoff before the retry) stays under the agent's HTTP timeout."""
    store = open_frame_store("s3://frames-bucket/p", cache_dir=tmp_path)
    assert isinstance(store, S3FrameStore)
    assert _config(store) == (1.0, 2.0, {"total_max_attempts": 2, "mode": "standard"})
    settings = GatewaySettings(home=tmp_path)
    t = s3_client.S3Timeouts()
    assert (settings.s3_connect_timeout_s, settings.s3_read_timeout_s,
            settings.s3_max_attempts) == (t.connect_s, t.read_s, t.max_attempts)
    agent_timeout = {f.name: f.default for f in dataclasses.fields(AgentConfig)}["http_timeout_s"]
    assert t.max_attempts * (t.connect_s + t.read_s) + 1.0 <= agent_timeout - 2.0
    with pytest.raises(ValueError):
        s3_client.S3Timeouts(read_s=0)


def test_a_stalled_store_fails_each_request_after_its_attempts(
        tmp_path: Path, stalled: StalledStore) -> None:
    store = open_frame_store("s3://frames-bucket/p", cache_dir=tmp_path,
                             endpoint_url=stalled.url,
                             timeouts=s3_client.S3Timeouts(connect_s=0.5, read_s=0.2,
                                                               max_attempts=2))
    assert isinstance(store, S3FrameStore)
    img = synthetic_image(1)
    with pytest.raises(OSError) as info:
        store.write_frame(record("f1", image=img), encode_jpeg(img))
    assert info.value.errno == errno.EIO and "object store" in str(info.value)
    assert stalled.connections(2) == 2  # the first try and one retry, each on a new connection
    # A read is an OSError too, not FileNotFoundError: "retry later", not "no such frame".
    with pytest.raises(OSError) as info:
        store.image_path("cam_a/2026-03-01/f1.jpg")
    assert not isinstance(info.value, FileNotFoundError)
    assert stalled.connections(4) == 4


def test_the_gateway_answers_503_while_its_store_is_stalled(
        s3_server: Any, tmp_path: Path, make_env: Any, stalled: StalledStore,
        frame_jpeg: bytes) -> None:
    """Replica B's object store endpoint stalls: an upload and a preview get 503 from B (with
    the timeouts of its settings), while A, on the store itself, serves."""
    shared = {"database_url": f"sqlite:///{tmp_path / 'shared.db'}",
              "frame_store_url": f"s3://{s3_server.new_bucket('stall')}/frames"}
    a = make_env("a", **shared, s3_endpoint_url=s3_server.endpoint_url)
    b = make_env("b", **shared, s3_endpoint_url=stalled.url, reconcile_on_start=False, **QUICK)
    assert _config(b.gw.store) == (0.5, 0.2, {"total_max_attempts": 2, "mode": "standard"})
    dev = a.enroll("cam-s")
    token = dev["access_token"]
    assert post_frame(a.client, token, meta("s-1", "cam-s"), frame_jpeg).status_code == 201
    r = post_frame(b.client, token, meta("s-2", "cam-s"), frame_jpeg)
    assert r.status_code == 503, r.text
    assert "retry later" in r.json()["detail"]
    assert stalled.connections(2) == 2
    preview = b.client.get("/v1/cameras/cam-s/preview.jpg", headers=bearer(b.admin))
    assert preview.status_code == 503, preview.text  # the frame exists: the store is down
    assert a.client.get("/v1/cameras/cam-s/preview.jpg",
                        headers=bearer(a.admin)).status_code == 200
