"""The edge agent's batched frame uploads (``edge_agent.uploader``, ``GatewayClient.upload_frames``)
against a gateway played by ``httpx.MockTransport``: per-frame settling, the fallback to single
uploads on a gateway without the batch route, whole-request failures, the envelope's bytes."""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent import uploader as uploader_module
from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent
from edge_agent.client import (
    BATCH_CONTENT_TYPE,
    GatewayClient,
    UploadOutcome,
    encode_frame_batch,
)
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.identity import DeviceIdentity
from edge_agent.outbox import BackoffPolicy, Outbox, OutboxItem
from edge_agent.record_outbox import RecordOutbox
from edge_agent.uploader import BATCH_ROUTE_RETRY_S, FrameUploader, UploadEvents, linger_wait

from . import test_fleet_gateway as gateway_tests
from .helpers import synthetic_jpeg
from .test_fleet_gateway import H, W, meta, post_frame

make_env = gateway_tests.make_env  # fixture: an in-process gateway

URL = "http://gateway.test"


def split_envelope(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The protocol, read independently: 4-byte big-endian manifest length, the JSON manifest,
    then the JPEGs in manifest order; the body ends right after the last one."""
    (length,) = struct.unpack(">I", body[:4])
    manifest = json.loads(body[4:4 + length].decode("utf-8"))
    offset, frames = 4 + length, []
    for entry in manifest["frames"]:
        size = entry["image_bytes"]
        frames.append((entry["metadata"], body[offset:offset + size]))
        offset += size
    assert offset == len(body), "bytes left after the last JPEG"
    return frames


class FakeGateway:
    """Records requests; ``batch`` decides the batch route's answer, singles get 201."""

    def __init__(self, batch: Callable[[list[tuple[dict, bytes]]], httpx.Response]) -> None:
        self.batch = batch
        self.batches: list[list[str]] = []  # frame ids per batch request
        self.singles: list[str] = []
        self.tokens: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.tokens.append(request.headers.get("Authorization", ""))
        if request.url.path == "/v1/frames/batch":
            assert request.headers["Content-Type"] == BATCH_CONTENT_TYPE
            frames = split_envelope(request.content)
            self.batches.append([m["frame_id"] for m, _ in frames])
            return self.batch(frames)
        if request.url.path == "/v1/frames":
            fid = re.search(rb'"frame_id": "([^"]+)"', request.content).group(1).decode()
            self.singles.append(fid)
            return httpx.Response(201, json={"frame_id": fid, "stored": True})
        return httpx.Response(404, json={"detail": "Not Found"})


def results(codes: list[int], frames: list[tuple[dict, bytes]], **kw: Any) -> httpx.Response:
    body = {"results": [{"frame_id": m["frame_id"], "status": c, "detail": f"status {c}"}
                        for (m, _), c in zip(frames, codes, strict=True)]}
    return httpx.Response(200, json=body, **kw)


class Recorder(UploadEvents):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def acknowledged(self, frame_id: str, duplicate: bool) -> None:
        self.seen.append((frame_id, "duplicate" if duplicate else "acked"))

    def failed(self, frame_id: str, outcome: UploadOutcome) -> None:
        self.seen.append((frame_id, "failed"))

    def rejected(self, frame_id: str, reason: str) -> None:
        self.seen.append((frame_id, "rejected"))


@pytest.fixture()
def make(tmp_path: Path):
    opened: list[Any] = []

    def _make(gateway: FakeGateway, n: int, **kw: Any) -> tuple[FrameUploader, Outbox]:
        state = tmp_path / "state"
        if not (state / "identity.json").exists():
            DeviceIdentity("dev", "cam", URL, "acc", "ref", expires_at=4e9).save(state)
        client = GatewayClient(URL, state, transport=httpx.MockTransport(gateway))
        outbox = Outbox(tmp_path / "outbox", backoff=BackoffPolicy(0.01, 0.02), seed=0)
        opened.extend([client, outbox])
        for i in range(n):
            outbox.put(f"f{i}", b"\xff\xd8jpeg-%d\xff\xd9" % i, {"frame_id": f"f{i}"}, 1.0)
        return FrameUploader(client, outbox, **kw), outbox

    yield _make
    for obj in opened:
        obj.close()


def test_envelope_splits_back_into_metadata_and_jpegs() -> None:
    items = [(b"\xff\xd8" + bytes(range(256)) * 3 + b"\xff\xd9", {"frame_id": "a", "n": 1}),
             (b"\xff\xd8\x00\xff\xd9", {"frame_id": "b", "note": "ünïcode \u2603"}),
             (b"\xff\xd8" + b"\x00" * 5000 + b"\xff\xd9", {"frame_id": "c", "boxes": [[1, 2]]})]
    body = encode_frame_batch(items)
    assert split_envelope(body) == [(meta, jpeg) for jpeg, meta in items]
    assert len(body) == 4 + struct.unpack(">I", body[:4])[0] + sum(len(j) for j, _ in items)


def test_mixed_per_frame_results_settle_each_frame(make) -> None:
    codes = [201, 409, 422, 403, 413, 429, 503]
    gw = FakeGateway(lambda frames: results(codes, frames))
    events = Recorder()
    up, outbox = make(gw, len(codes), events=events)
    before = time.time()
    pause = up.upload(outbox.due(float("inf")))
    assert gw.batches == [[f"f{i}" for i in range(7)]] and gw.singles == []
    assert pause is not None and pause >= 0
    journal = outbox.journal()
    assert journal == {"f0": "acked", "f1": "duplicate", "f2": "rejected", "f3": "rejected",
                       "f4": "rejected", "f5": "queued", "f6": "queued"}
    assert outbox.due(before) == []  # the two retried frames wait for their backoff
    assert {i.frame_id: i.attempts for i in outbox.due(float("inf"))} == {"f5": 1, "f6": 1}
    assert dict(events.seen) == {"f0": "acked", "f1": "duplicate", "f2": "rejected",
                                 "f3": "rejected", "f4": "rejected", "f5": "failed",
                                 "f6": "failed"}


def test_gateway_without_batch_route_gets_single_uploads_and_a_retry_after_10_min(
        make, caplog: pytest.LogCaptureFixture) -> None:
    supported = {"yes": False}

    def batch(frames):
        if supported["yes"]:
            return results([201] * len(frames), frames)
        return httpx.Response(404, json={"detail": "Not Found"})

    gw = FakeGateway(batch)
    now = [1000.0]
    up, outbox = make(gw, 3, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="edge_agent.uploader")

    def round_of(ids: list[str]) -> None:
        for fid in ids:
            outbox.put(fid, b"\xff\xd8x\xff\xd9", {"frame_id": fid}, 1.0)
        assert up.upload(outbox.due(float("inf"))) is None
        assert outbox.depth() == 0

    round_of([])
    assert len(gw.batches) == 1 and gw.singles == ["f0", "f1", "f2"]
    now[0] += BATCH_ROUTE_RETRY_S - 1
    round_of(["g0", "g1"])
    assert len(gw.batches) == 1 and gw.singles[3:] == ["g0", "g1"]  # no batch tried
    now[0] += 2
    round_of(["h0", "h1"])
    assert len(gw.batches) == 2 and gw.singles[5:] == ["h0", "h1"]  # tried again: still 404
    assert sum("no batch route" in r.getMessage() for r in caplog.records) == 1  # logged once
    supported["yes"] = True  # the gateway was upgraded
    now[0] += BATCH_ROUTE_RETRY_S
    round_of(["k0", "k1", "k2"])
    assert gw.batches[-1] == ["k0", "k1", "k2"] and len(gw.singles) == 7
    assert set(outbox.journal().values()) == {"acked"} and len(outbox.journal()) == 10


def test_whole_request_503_keeps_every_frame_queued_with_backoff(make) -> None:
    gw = FakeGateway(lambda frames: httpx.Response(503, json={"detail": "storage busy"},
                                                   headers={"Retry-After": "7"}))
    events = Recorder()
    up, outbox = make(gw, 4, events=events)
    before = time.time()
    pause = up.upload(outbox.due(float("inf")))
    assert pause is not None and pause >= 7
    assert len(gw.batches) == 1 and gw.singles == []
    assert outbox.depth() == 4 and set(outbox.journal().values()) == {"queued"}
    assert outbox.due(before + 6.9) == []  # Retry-After honoured for every frame
    assert {i.attempts for i in outbox.due(float("inf"))} == {1}
    assert [s for _, s in events.seen] == ["failed"] * 4


def test_batches_respect_batch_max_and_one_due_frame_takes_the_single_route(make) -> None:
    gw = FakeGateway(lambda frames: results([201] * len(frames), frames))
    up, outbox = make(gw, 5, batch_max=2)
    assert up.upload(outbox.due(float("inf"))) is None
    assert gw.batches == [["f0", "f1"], ["f2", "f3"]] and gw.singles == ["f4"]
    off = FrameUploader(up.client, outbox, batch_max=1)  # 1 disables batches
    outbox.put("z0", b"\xff\xd8z\xff\xd9", {"frame_id": "z0"}, 1.0)
    outbox.put("z1", b"\xff\xd8z\xff\xd9", {"frame_id": "z1"}, 1.0)
    assert off.upload(outbox.due(float("inf"))) is None
    assert len(gw.batches) == 2 and gw.singles[1:] == ["z0", "z1"]


def test_whole_request_413_sends_the_round_singly_and_shrinks_batches(make) -> None:
    gw = FakeGateway(lambda frames: httpx.Response(413, json={"detail": "over 1 bytes"}))
    up, outbox = make(gw, 3)
    assert up.upload(outbox.due(float("inf"))) is None
    assert len(gw.batches) == 1 and gw.singles == ["f0", "f1", "f2"]
    assert outbox.depth() == 0 and up.batch_max_bytes == uploader_module.MIN_BATCH_BYTES


def test_whole_request_422_sends_the_round_singly_and_halves_batch_max(make) -> None:
    gw = FakeGateway(lambda frames: httpx.Response(422, json={"detail": "more than 4 frames"}))
    up, outbox = make(gw, 10, batch_max=8)
    assert up.upload(outbox.due(float("inf"))) is None
    assert [len(b) for b in gw.batches] == [8, 2] and len(gw.singles) == 10
    assert outbox.depth() == 0 and up.batch_max == 2


def test_older_gateway_costs_one_refused_batch_then_frames_go_singly(make) -> None:
    """A gateway without the batch route caps the body of a route it does not know at 1 MiB
    (413 before routing, so no 404): the first default batch of camera-sized frames is over
    it, the halved budget is under it, and the next batch gets the 404 that switches the
    uploader to one frame a request. No frame is lost or refused."""
    old_cap = 1024 * 1024
    bodies: list[int] = []

    class OlderGateway(FakeGateway):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/frames/batch":
                bodies.append(len(request.content))
                if len(request.content) > old_cap:
                    return httpx.Response(413, json={"detail": "request body too large"})
                return httpx.Response(404, json={"detail": "Not Found"})
            return super().__call__(request)

    gw = OlderGateway(lambda frames: pytest.fail("no batch reaches the batch route"))
    up, outbox = make(gw, 0)
    jpeg = b"\xff\xd8" + bytes(46_000) + b"\xff\xd9"  # a 640-px camera's frame, by size
    for rnd in range(2):
        for i in range(uploader_module.DEFAULT_BATCH_MAX):
            outbox.put(f"r{rnd}-{i}", jpeg, {"frame_id": f"r{rnd}-{i}"}, 1.0)
        due = outbox.due(float("inf"), limit=uploader_module.DEFAULT_BATCH_MAX)
        assert up.upload(due) is None
    assert len(bodies) == 2 and bodies[0] > old_cap >= bodies[1]
    assert up.batch_max_bytes < old_cap and not up.batch_route_usable
    assert len(gw.singles) == 2 * uploader_module.DEFAULT_BATCH_MAX and outbox.depth() == 0
    assert set(outbox.journal().values()) == {"acked"}


def test_default_batch_fits_the_default_gateway_and_is_not_cut_by_its_byte_budget() -> None:
    """The agent's defaults against the gateway's: a default batch is never a 422 or 413 from
    a default gateway, and 640-px frames (the shared videos' JPEGs average 46 KB) fill it to
    ``DEFAULT_BATCH_MAX`` rather than stopping at the byte budget."""
    from fleet.config import GatewaySettings

    gateway = GatewaySettings()
    assert uploader_module.DEFAULT_BATCH_MAX == gateway.max_batch_frames
    assert uploader_module.DEFAULT_BATCH_MAX_BYTES <= gateway.max_batch_bytes
    per_frame = 46_098 + 1024 + uploader_module._ENTRY_OVERHEAD  # JPEG, metadata, manifest
    assert uploader_module.DEFAULT_BATCH_MAX * per_frame <= uploader_module.DEFAULT_BATCH_MAX_BYTES


def test_401_on_a_batch_refreshes_the_token_and_resends(make) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/token/refresh":
            return httpx.Response(200, json={"access_token": "acc2", "refresh_token": "ref2",
                                             "expires_in": 3600})
        if request.headers["Authorization"] == "Bearer acc":
            return httpx.Response(401, json={"detail": "expired"})
        return gw(request)

    gw = FakeGateway(lambda frames: results([201] * len(frames), frames))
    up, outbox = make(handler, 2)  # type: ignore[arg-type]
    assert up.upload(outbox.due(float("inf"))) is None
    assert gw.batches == [["f0", "f1"]] and outbox.depth() == 0
    assert up.client.identity.access_token == "acc2"


def test_kill_hook_counts_frames_acknowledged_in_a_batch(make, monkeypatch) -> None:
    class Killed(Exception):
        pass

    def kill(pid: int, sig: int) -> None:
        raise Killed

    monkeypatch.setattr(uploader_module.os, "kill", kill)
    gw = FakeGateway(lambda frames: results([201] * len(frames), frames))
    up, outbox = make(gw, 5, kill_after_acks=3)
    with pytest.raises(Killed):
        up.upload(outbox.due(float("inf")))
    journal = outbox.journal()
    assert journal == {"f0": "acked", "f1": "acked", "f2": "queued", "f3": "queued",
                       "f4": "queued"}  # the gateway stored all five; f2 was never acked here


def _agent(state: Path, client: GatewayClient, camera: str = "cam"
           ) -> tuple[EdgeAgent, AgentSummary]:
    """An agent with only what its upload loop needs (a client, the outboxes, telemetry)."""
    cfg = AgentConfig(gateway_url=client.gateway_url, camera_id=camera, source="x",
                      model_path=state / "m.onnx", state_dir=state)
    agent = EdgeAgent(cfg, status_stream=open("/dev/null", "w"))  # noqa: SIM115
    agent.client = client
    agent.outbox = Outbox(state / "outbox")
    agent.records = RecordOutbox(state / "records")
    agent.telemetry = TelemetryWindow(camera, "v", ["car"])
    agent.redactor = object()  # type: ignore[assignment]  # frames may leave
    agent.summary = summary = AgentSummary(camera, "dev", "v", stopped_by="test")
    return agent, summary


def _run_uploader(agent: EdgeAgent, done: Callable[[], bool]) -> None:
    """The agent's uploader thread until ``done()`` (or 20 s), then stopped."""
    thread = threading.Thread(target=agent._upload_loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        agent._uploads_stop.set()
        agent._wake_uploader.set()
        thread.join(5)


def test_agent_counters_are_per_frame_with_batches(tmp_path: Path) -> None:
    codes = {"f0": 201, "f1": 409, "f2": 422, "f3": 201}
    gw = FakeGateway(lambda frames: results([codes[m["frame_id"]] for m, _ in frames], frames))
    DeviceIdentity("dev", "cam", URL, "acc", "ref", expires_at=4e9).save(tmp_path)
    agent, summary = _agent(tmp_path, GatewayClient(URL, tmp_path,
                                                    transport=httpx.MockTransport(gw)))
    for fid in codes:
        agent.outbox.put(fid, b"\xff\xd8x\xff\xd9", {"frame_id": fid}, 1.0)
    try:
        _run_uploader(agent, lambda: agent.outbox.depth() == 0)
    finally:
        agent.client.close()
        agent.outbox.close()
        agent.records.close()
    assert gw.batches == [["f0", "f1", "f2", "f3"]] and gw.singles == []
    assert (summary.uploads_ok, summary.duplicates_absorbed, summary.rejected,
            summary.upload_failures) == (3, 1, 1, 0)
    assert agent.telemetry.uploads_ok_total == 3


def _due(created_at: float, attempts: int = 0) -> OutboxItem:
    return OutboxItem(frame_id=f"f{created_at}", path=Path("x.jpg"), metadata={},
                      importance=0.5, size=10, created_at=created_at, attempts=attempts,
                      next_attempt_at=created_at, last_error=None)


def test_linger_holds_fresh_frames_until_the_oldest_waited_or_the_batch_is_full() -> None:
    now = 1000.0
    fresh = [_due(now - 5.0), _due(now - 1.0)]
    assert linger_wait(fresh, batch_max=16, linger_s=60.0, now=now) == pytest.approx(55.0)
    assert linger_wait([_due(now - 61.0), *fresh], 16, 60.0, now) == 0.0  # the oldest waited
    assert linger_wait(fresh, batch_max=2, linger_s=60.0, now=now) == 0.0  # batch full
    assert linger_wait(fresh, batch_max=16, linger_s=0.0, now=now) == 0.0  # linger off
    assert linger_wait([_due(now - 1.0, attempts=1)], 16, 60.0, now) == 0.0  # a retry goes
    assert linger_wait([], 16, 60.0, now) == 0.0


def test_agent_linger_holds_frames_sends_a_full_batch_and_everything_when_draining(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an hour's linger: 4 due frames (= batch_max) go at once; 2 more are held (the
    loop decided to wait, and nothing was sent) until the run drains, then go together."""
    import edge_agent.agent as agent_module

    holds: list[float] = []

    def recording_linger_wait(*args: Any) -> float:
        holds.append(uploader_module.linger_wait(*args))
        return holds[-1]

    monkeypatch.setattr(agent_module, "linger_wait", recording_linger_wait)
    gw = FakeGateway(lambda frames: results([201] * len(frames), frames))
    DeviceIdentity("dev", "cam", URL, "acc", "ref", expires_at=4e9).save(tmp_path)
    agent, _ = _agent(tmp_path, GatewayClient(URL, tmp_path, transport=httpx.MockTransport(gw)))
    agent.config.upload_linger_s = 3600.0
    agent.config.upload_batch_max = 4
    jpeg = b"\xff\xd8x\xff\xd9"
    try:
        for fid in ("a0", "a1", "a2", "a3"):
            agent.outbox.put(fid, jpeg, {"frame_id": fid}, 1.0)
        _run_uploader(agent, lambda: agent.outbox.depth() == 0)
        assert gw.batches == [["a0", "a1", "a2", "a3"]]
        for fid in ("b0", "b1"):
            agent.outbox.put(fid, jpeg, {"frame_id": fid}, 1.0)
        holds.clear()
        agent._uploads_stop.clear()
        _run_uploader(agent, lambda: any(h > 3000 for h in holds))
        assert any(h > 3000 for h in holds) and agent.outbox.depth() == 2
        assert gw.batches == [["a0", "a1", "a2", "a3"]]  # held, not sent
        agent._uploads_stop.clear()
        agent._draining.set()
        _run_uploader(agent, lambda: agent.outbox.depth() == 0)
    finally:
        agent.client.close()
        agent.outbox.close()
        agent.records.close()
    assert gw.batches == [["a0", "a1", "a2", "a3"], ["b0", "b1"]] and gw.singles == []


@pytest.mark.parametrize(("flag", "attr", "config_field", "default", "good", "bad", "message"), [
    ("--upload-batch-max", "upload_batch_max", "upload_batch_max", 32, ("1", 1), "0",
     "must be >= 1"),
    ("--upload-linger", "upload_linger", "upload_linger_s", 0.0, ("60", 60.0), "-1",
     "must be >= 0"),
    ("--upload-linger", "upload_linger", "upload_linger_s", 0.0, ("3600", 3600.0), "inf",
     "at most 3600 s"),
    ("--upload-linger", "upload_linger", "upload_linger_s", 0.0, ("0", 0.0), "nan",
     "must be >= 0"),
    ("--upload-linger", "upload_linger", "upload_linger_s", 0.0, ("0", 0.0), "1e9",
     "at most 3600 s"),
])
def test_cli_upload_flags(capsys: pytest.CaptureFixture[str], flag: str, attr: str,
                          config_field: str, default: float, good: tuple[str, float],
                          bad: str, message: str) -> None:
    from edge_agent.cli import build_parser

    base = ["run", "--gateway", URL, "--camera-id", "cam", "--source", "x.mp4"]
    parser = build_parser()
    assert getattr(parser.parse_args(base), attr) == getattr(AgentConfig, config_field) == default
    assert getattr(parser.parse_args([*base, flag, good[0]]), attr) == good[1]
    with pytest.raises(SystemExit):
        parser.parse_args([*base, flag, bad])
    assert message in capsys.readouterr().err


# ------------------------------------------------------------- a real in-process gateway
def test_agent_drains_a_full_outbox_through_batches_into_a_real_gateway(
        tmp_path: Path, make_env: Any) -> None:
    """The gateway of ``fleet.app`` (in process): 40 queued frames, two of them already
    stored before (a crash between the gateway's 201 and the local ack), go as batches;
    every frame is stored exactly once and the outbox forgets each one."""
    env = make_env()
    client = GatewayClient("http://testserver", tmp_path / "agent",
                           transport=env.client._transport)
    client.enroll(env.enrollment_token(), "cam-a", "0.1.0")
    ids = [f"b{i:03d}" for i in range(40)]
    jpegs = {fid: synthetic_jpeg(i, (W, H), cells=(12, 9), quality=85)
             for i, fid in enumerate(ids)}
    for fid in ids[:2]:  # stored before the agent's ack was written
        assert post_frame(env.client, client.identity.access_token, meta(fid),
                          jpegs[fid]).status_code == 201
    agent, summary = _agent(tmp_path / "agent", client, camera="cam-a")
    for fid in ids:
        agent.outbox.put(fid, jpegs[fid], meta(fid), 1.0)
    try:
        _run_uploader(agent, lambda: agent.outbox.depth() == 0)
        assert agent.outbox.journal() == {fid: "duplicate" if fid in ids[:2] else "acked"
                                          for fid in ids}
    finally:
        client.close()
        agent.outbox.close()
        agent.records.close()
    assert agent.frame_uploader.batches_sent == 2  # 32 + 8 frames, no single upload
    stored = [row.frame_id for row in env.rows()]
    assert sorted(stored) == ids  # each once
    assert (summary.uploads_ok, summary.duplicates_absorbed, summary.upload_failures) == (40, 2, 0)
