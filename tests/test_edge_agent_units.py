"""Edge agent runtime units: density hysteresis, samplers and budget, the durable outbox,
the latest-frame reader, heartbeat schema, and the agent's import hygiene.

No gateway here (tests/test_edge_agent_e2e.py runs the real one); the only HTTP server is a
tiny local fake for the outbox retry path, as allowed for retry/backoff unit tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest

from edge_agent.client import GatewayClient
from edge_agent.counting import DensityState, DensityThresholds, DensityTracker, count_per_class
from edge_agent.fsutil import (
    copy_file_atomic,
    file_sha256,
    write_bytes_atomic,
    write_text_atomic,
)
from edge_agent.heartbeat import (
    BRIGHTNESS_BIN_EDGES,
    CONFIDENCE_BIN_EDGES,
    DETECTIONS_BIN_EDGES,
    HEARTBEAT_SCHEMA_VERSION,
    SHARPNESS_BIN_EDGES,
    Heartbeat,
    TelemetryWindow,
    confidence_histogram,
    histogram_bin,
)
from edge_agent.identity import DeviceIdentity
from edge_agent.outbox import BackoffPolicy, Outbox, read_journal
from edge_agent.samplers import FrameSampler, SamplerConfig
from edge_agent.sources import (
    Frame,
    FrameSource,
    ImageFolderSource,
    LatestFrameReader,
    SourceError,
    VideoFileSource,
    open_source,
)

from .helpers import SHARED_DIR, needs_shared

REPO = Path(__file__).resolve().parents[1]
VIDEO = SHARED_DIR / "videos" / "cctv_street.mp4"


@dataclass
class Det:
    class_id: int
    class_name: str
    confidence: float


def dets(*confs: float, name: str = "car") -> list[Det]:
    return [Det(0, name, c) for c in confs]


# ---------------------------------------------------------------- counting / density
def test_density_hysteresis_transitions_exactly() -> None:
    tracker = DensityTracker(capacity=20)  # occupancy steps of 0.05
    N, W, H, J = DensityState.NORMAL, DensityState.WARNING, DensityState.HEAVY, DensityState.JAM
    steps = [
        (5, N, False),  # 0.25 < enter 0.3
        (6, W, True),  # 0.30 enters warning
        (5, W, False),  # 0.25: above leave 0.2, stays
        (4, N, True),  # 0.20 leaves warning
        (5, N, False),  # 0.25: not back in without reaching 0.3
        (6, W, True),
        (11, W, False),  # 0.55 < 0.6
        (12, H, True),  # 0.60 enters heavy
        (11, H, False),  # 0.55 stays (leave at 0.5)
        (10, W, True),  # 0.50 leaves heavy
        (12, H, True),
        (15, H, False),  # 0.75 < 0.8
        (16, J, True),  # 0.80 enters jam
        (15, J, False),  # 0.75 stays (leave at 0.7)
        (14, H, True),  # 0.70 leaves jam
        (16, J, True),
        (3, N, True),  # 0.15: several levels down at once
        (17, J, True),  # 0.85: several levels up at once
    ]
    for n, want, changed in steps:
        state, did_change = tracker.update(n)
        assert (n, state, did_change) == (n, want, changed)
    assert tracker.state.label == "jam"
    assert tracker.occupancy == pytest.approx(0.85)


def test_density_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="capacity"):
        DensityTracker(0)
    with pytest.raises(ValueError, match="below its enter"):
        DensityThresholds(enter=(0.3, 0.6, 0.8), leave=(0.3, 0.5, 0.7))
    with pytest.raises(ValueError, match="increase"):
        DensityThresholds(enter=(0.6, 0.3, 0.8))


def test_count_per_class_lists_every_class() -> None:
    d = [Det(0, "car", 0.9), Det(0, "car", 0.5), Det(2, "", 0.4)]
    assert count_per_class(d, ["car", "bus", "truck"]) == {"car": 2, "bus": 0, "truck": 1}


# ---------------------------------------------------------------- samplers
def test_sampler_reasons_and_importance() -> None:
    s = FrameSampler(SamplerConfig(base_rate=0.0, rare_classes={"bus"}, hourly_budget=None))
    assert not s.decide(dets(0.9, 0.5), now=0).sampled  # 0.5 is outside [0.25, 0.5)
    d = s.decide(dets(0.9, 0.49), now=1)
    assert d.sampled and d.reasons == ("low_confidence",) and d.importance == pytest.approx(1.5)
    d = s.decide(dets(0.9, name="bus"), now=2)
    assert d.reasons == ("rare_class",) and d.importance == pytest.approx(1.8)
    assert not s.decide(dets(*[0.9] * 20), now=3).sampled  # 20 is not more than 20
    d = s.decide(dets(*[0.9] * 21), now=4)
    assert d.reasons == ("crowded",) and d.importance == pytest.approx(1.3)
    d = s.decide(dets(0.9), now=5, edge_case=True)
    assert d.reasons == ("edge_case",) and d.importance == pytest.approx(2.0)
    every = dets(*[0.9] * 20, 0.3) + dets(0.8, name="bus")
    d = s.decide(every, now=6, edge_case=True)
    assert set(d.reasons) == {"edge_case", "low_confidence", "rare_class", "crowded"}
    assert d.importance == pytest.approx(2.0 * 1.5 * 1.8 * 1.3)  # 7.02, under the cap


def test_sampler_importance_is_capped() -> None:
    cfg = SamplerConfig(
        base_rate=0.0,
        rare_classes={"bus"},
        hourly_budget=None,
        multipliers={"edge_case": 4.0, "rare_class": 3.0},
    )
    d = FrameSampler(cfg).decide(dets(0.9, name="bus"), now=0, edge_case=True)
    assert d.importance == 10.0  # 12 capped


def test_sampler_base_rate_is_seeded() -> None:
    def run(seed: int) -> list[bool]:
        s = FrameSampler(SamplerConfig(base_rate=0.3, seed=seed, hourly_budget=None))
        return [s.decide([], now=i).sampled for i in range(2000)]

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert 0.25 < sum(a) / len(a) < 0.35
    s = FrameSampler(SamplerConfig(base_rate=0.3, seed=7, hourly_budget=None))
    d = [s.decide([], now=i) for i in range(2000)][a.index(True)]
    assert d.reasons == ("base_rate",) and d.importance == 1.0
    assert not any(
        FrameSampler(SamplerConfig(base_rate=0.0)).decide([], now=i).sampled for i in range(100)
    )


def test_budget_stop_policy_refills_per_hour() -> None:
    s = FrameSampler(SamplerConfig(base_rate=0.0, hourly_budget=3, budget_policy="stop"))
    got = [s.decide(dets(0.3), now=0.0) for _ in range(5)]
    assert [g.sampled for g in got] == [True, True, True, False, False]
    assert got[3].refused_by_budget and got[3].reasons == ("low_confidence",)
    # even a far more important frame waits for a token under "stop"
    assert not s.decide(dets(0.3), now=0.0, edge_case=True).sampled
    assert not s.decide(dets(0.3), now=1100.0).sampled  # 3/3600*1100 = 0.92 token
    assert s.decide(dets(0.3), now=1200.0).sampled  # one token refilled
    assert not s.decide(dets(0.3), now=1200.0).sampled
    assert s.refused_by_budget == 5 and s.frames_sampled == 4


def test_budget_importance_policy_lets_better_frames_through_boundedly() -> None:
    s = FrameSampler(SamplerConfig(base_rate=0.0, hourly_budget=2, budget_policy="importance"))
    assert s.overdraft == 1.0  # 10 % of 2, at least one frame
    assert s.decide(dets(0.3), now=0).sampled
    assert s.decide(dets(0.3), now=0).sampled  # budget spent; mean taken = 1.5
    assert not s.decide(dets(0.3), now=0).sampled  # 1.5 does not beat 1.5
    better = s.decide(dets(0.3), now=0, edge_case=True)  # 3.0 > 1.5
    assert better.sampled and better.over_budget
    assert not s.decide(dets(0.3), now=0, edge_case=True).sampled  # overdraft used up
    # the debt is repaid before ordinary frames are taken again: -1 + 2/3600*t >= 1 → t >= 3600
    assert not s.decide(dets(0.3), now=1800).sampled
    assert s.decide(dets(0.3), now=3600).sampled


def test_sampler_config_is_validated() -> None:
    with pytest.raises(ValueError, match="base_rate"):
        SamplerConfig(base_rate=1.5)
    with pytest.raises(ValueError, match="low_confidence_band"):
        SamplerConfig(low_confidence_band=(0.6, 0.4))
    with pytest.raises(ValueError, match="budget_policy"):
        SamplerConfig(budget_policy="drop")  # type: ignore[arg-type]


# ---------------------------------------------------------------- outbox
def _jpeg(size: int = 1000) -> bytes:
    return b"\xff\xd8\xff" + os.urandom(size - 3)


def test_outbox_persists_across_reopen_and_acks(tmp_path: Path) -> None:
    root = tmp_path / "outbox"
    with Outbox(root) as ob:
        for i, imp in enumerate([1.0, 3.0, 2.0]):
            assert ob.put(f"f{i}", _jpeg(), {"frame_id": f"f{i}", "n": i}, imp, now=100 + i).queued
        assert ob.depth() == 3 and ob.total_bytes() == 3000
    with Outbox(root) as ob:  # reopen: nothing lost
        due = ob.due(now=200)
        assert [i.frame_id for i in due] == ["f1", "f2", "f0"]  # most important first
        assert due[0].metadata == {"frame_id": "f1", "n": 1}
        assert due[0].read_bytes()[:3] == b"\xff\xd8\xff"
        ob.ack("f1")
        ob.ack("f2", duplicate=True)
        assert not (root / "spool" / "f1.jpg").exists()
        assert ob.put("f1", _jpeg(), {}, 1.0).queued is False  # already sent: ignored
    with Outbox(root) as ob:
        assert [i.frame_id for i in ob.due(now=200)] == ["f0"]
        assert ob.journal() == {"f0": "queued", "f1": "acked", "f2": "duplicate"}
        assert ob.counters()["duplicates"] == 1
    assert read_journal(root)["f2"] == "duplicate"


def test_backoff_schedule_and_full_jitter_bounds() -> None:
    policy = BackoffPolicy(base_s=0.5, max_s=8.0)
    assert [policy.ceiling(a) for a in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    rng = random.Random(1)
    for attempt in range(7):
        delays = [policy.delay(attempt, rng) for _ in range(400)]
        assert all(0.0 <= d <= policy.ceiling(attempt) for d in delays)
        # full jitter: spread over the whole interval, not clustered at the ceiling
        assert (
            min(delays)
            < 0.1 * policy.ceiling(attempt)
            < 0.9 * policy.ceiling(attempt)
            < max(delays)
        )
    with pytest.raises(ValueError):
        BackoffPolicy(base_s=2.0, max_s=1.0)


def test_outbox_fail_schedules_retries(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob", backoff=BackoffPolicy(1.0, 4.0), seed=3) as ob:
        ob.put("a", _jpeg(), {}, 1.0, now=0)
        now = 10.0
        for attempt in range(5):
            delay = ob.fail("a", "503", now=now)
            assert 0.0 <= delay <= min(4.0, 2.0**attempt)
            item_due = ob.due(now=now + delay + 1e-6)
            assert [i.frame_id for i in item_due] == ["a"] and item_due[0].attempts == attempt + 1
            if delay > 1e-3:
                assert ob.due(now=now + delay - 1e-3) == []
            now += delay
        assert ob.fail("a", "429", now=now, retry_after=30.0) >= 30.0  # Retry-After is a floor
        assert ob.due(now=now + 29.0) == []
        assert ob.due(now=now + 30.5)[0].last_error == "429"


def test_outbox_evicts_lowest_importance_first_and_counts(tmp_path: Path) -> None:
    root = tmp_path / "ob"
    with Outbox(root, max_bytes=3000) as ob:
        for fid, imp in [("hi", 5.0), ("lo", 1.0), ("mid", 3.0)]:
            assert ob.put(fid, _jpeg(), {}, imp).queued
        r = ob.put("new", _jpeg(), {}, 2.0)  # over budget: "lo" goes
        assert r.queued and r.evicted == ["lo"]
        r = ob.put("junk", _jpeg(), {}, 0.5)  # the least important is the new one itself
        assert not r.queued and r.evicted == ["junk"]
        r = ob.put("big", _jpeg(1500), {}, 4.0)  # needs two evictions: "new" (2.0), "mid" (3.0)
        assert r.evicted == ["new", "mid"]
        assert sorted(i.frame_id for i in ob.due()) == ["big", "hi"]
        assert ob.evicted_total == 4 and ob.total_bytes() <= 3000
        assert not (root / "spool" / "lo.jpg").exists()
    with Outbox(root, max_bytes=3000) as ob:  # the count survives a restart
        assert ob.evicted_total == 4
        assert ob.journal("evicted").keys() == {"lo", "junk", "new", "mid"}


def test_outbox_reconciles_crash_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "ob"
    with Outbox(root) as ob:
        ob.put("kept", _jpeg(), {}, 1.0)
        ob.put("gone", _jpeg(), {}, 1.0)
    spool = root / "spool"
    (spool / ".x.jpg.tmp-1234").write_bytes(b"partial")  # crash while writing
    (spool / "orphan.jpg").write_bytes(_jpeg())  # crash between rename and row
    (spool / "gone.jpg").unlink()  # a row whose file vanished
    with Outbox(root) as ob:
        rep = ob.last_reconcile
        assert (rep.temp_files_removed, rep.orphan_files_removed, rep.rows_without_file) == (
            1,
            1,
            1,
        )
        assert [i.frame_id for i in ob.due()] == ["kept"]
        assert ob.journal()["gone"] == "lost"
    assert sorted(p.name for p in spool.iterdir()) == ["kept.jpg"]


def test_outbox_rejects_bad_ids(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob") as ob:
        for bad in ("../x", ".hidden", "", "a/b", "x" * 65):
            with pytest.raises(ValueError, match="invalid frame_id"):
                ob.put(bad, _jpeg(), {}, 1.0)
        assert ob.depth() == 0 and list((tmp_path / "ob" / "spool").iterdir()) == []


class _FlakyGateway(BaseHTTPRequestHandler):
    """503 (Retry-After: 0) twice, then 201; a frame seen before gets 409; 'bad' gets 422."""

    calls: ClassVar[list[str]] = []
    stored: ClassVar[set[str]] = set()

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        frame_id = re.search(rb'"frame_id": "([^"]+)"', body).group(1).decode()
        type(self).calls.append(frame_id)
        if frame_id == "bad":
            code, payload = 422, {"detail": "metadata invalid"}
        elif len(type(self).calls) <= 2:
            code, payload = 503, {"detail": "busy"}
        elif frame_id in type(self).stored:
            code, payload = 409, {"detail": f"frame {frame_id} already stored"}
        else:
            type(self).stored.add(frame_id)
            code, payload = 201, {"frame_id": frame_id, "stored": True}
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)


def test_outbox_retry_against_a_flaky_server(tmp_path: Path) -> None:
    """The upload cycle the agent runs: transient failures are retried, 409 acks, 422 drops."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    DeviceIdentity("dev", "cam", url, "acc", "ref", expires_at=4e9).save(tmp_path / "state")
    client = GatewayClient(url, tmp_path / "state")
    ob = Outbox(tmp_path / "ob", backoff=BackoffPolicy(0.01, 0.02), seed=0)
    try:
        for fid in ("a", "b", "bad"):
            ob.put(fid, _jpeg(), {"frame_id": fid}, 1.0)
        _FlakyGateway.stored.add("b")  # "b" reached the gateway before a crash
        outcomes = []
        for _ in range(50):
            items = ob.due(now=float("inf"))
            if not items:
                break
            for item in items:
                out = client.upload_frame(item.read_bytes(), item.metadata)
                outcomes.append((item.frame_id, out.kind))
                if out.acknowledged:
                    ob.ack(item.frame_id, duplicate=out.kind == "duplicate")
                elif out.kind == "retry":
                    assert out.retry_after == 0.0
                    ob.fail(item.frame_id, out.detail, retry_after=out.retry_after)
                else:
                    ob.reject(item.frame_id, out.detail)
        assert ob.depth() == 0
        assert [k for _, k in outcomes].count("retry") == 2
        assert ob.journal() == {"a": "acked", "b": "duplicate", "bad": "rejected"}
        assert list((tmp_path / "ob" / "spool").iterdir()) == []
    finally:
        ob.close()
        client.close()
        server.shutdown()


def test_identity_file_is_private(tmp_path: Path) -> None:
    ident = DeviceIdentity("dev-1", "cam-1", "http://gw", "acc", "ref", expires_at=123.0)
    path = ident.save(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DeviceIdentity.load(tmp_path / "state") == ident
    path.write_text("{not json")
    with pytest.raises(Exception, match="identity.json"):
        DeviceIdentity.load(tmp_path / "state")


def test_fsutil_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new", mode=0o600, sync_dir=True)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    write_text_atomic(tmp_path / "t.json", '{"é": 1}')
    assert (tmp_path / "t.json").read_text(encoding="utf-8") == '{"é": 1}'
    copy_file_atomic(target, tmp_path / "copy.bin", sync_dir=True)
    assert file_sha256(tmp_path / "copy.bin") == hashlib.sha256(b"new").hexdigest()
    with pytest.raises(FileNotFoundError):
        write_bytes_atomic(tmp_path / "missing" / "x", b"x")  # target folder absent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin", "f.bin", "t.json"]


# ---------------------------------------------------------------- sources
class _BurstSource(FrameSource):
    """Yields ``n`` tiny frames as fast as it can, then signals ``done``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.done = threading.Event()

    def frames(self, stop: threading.Event):
        for i in range(self.n):
            yield Frame(np.full((4, 4, 3), i, np.uint8), i, float(i), f"burst#{i}")
        self.done.set()


def test_latest_frame_reader_drops_and_counts_stale_frames() -> None:
    src = _BurstSource(10)
    reader = LatestFrameReader(src, drop_stale=True).start()
    assert src.done.wait(5)  # the consumer fell behind the whole burst
    frame = reader.get(timeout=5)
    assert frame is not None and frame.index == 9  # only the freshest survives
    assert reader.get(timeout=5) is None and reader.exhausted
    assert reader.dropped == 9 and reader.delivered == 1 and reader.produced == 10
    reader.stop()


def test_lossless_reader_delivers_every_frame_in_order() -> None:
    reader = LatestFrameReader(_BurstSource(10), drop_stale=False).start()
    got = []
    while (f := reader.get(timeout=5)) is not None:
        got.append(f.index)
    assert got == list(range(10)) and reader.dropped == 0
    reader.stop()


@needs_shared(VIDEO)
def test_video_source_as_fast_as_possible_and_realtime() -> None:
    src = open_source(str(VIDEO), realtime=False)
    assert isinstance(src, VideoFileSource) and src.fps == pytest.approx(25.0)
    reader = LatestFrameReader(src).start()
    assert reader.drop_stale is False  # files read as fast as possible lose nothing
    frames = [reader.get(timeout=10) for _ in range(5)]
    reader.stop()
    assert [f.index for f in frames] == list(range(5))
    assert frames[0].image.shape == (360, 640, 3) and frames[0].source_ref.endswith("#0")
    assert LatestFrameReader(open_source(str(VIDEO), realtime=True)).drop_stale is True


def test_image_folder_skips_unreadable_files(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), np.full((8, 8, 3), 50 * i, np.uint8))
    (tmp_path / "1b.jpg").write_bytes(b"not a jpeg")
    src = open_source(str(tmp_path), realtime=False)
    assert isinstance(src, ImageFolderSource)
    got = list(src.frames(threading.Event()))
    assert [Path(f.source_ref.split(":", 1)[1]).name for f in got] == ["0.jpg", "1.jpg", "2.jpg"]
    assert src.stats.read_errors == 1


def test_bad_sources_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such video"):
        open_source(str(tmp_path / "missing.mp4"))
    (tmp_path / "x.mp4").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="x.mp4"):
        open_source(str(tmp_path / "x.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "empty"))


# ---------------------------------------------------------------- heartbeat
def test_heartbeat_schema_is_versioned_and_documented() -> None:
    import edge_agent.heartbeat as hb_mod

    tw = TelemetryWindow("cam-1", "abc123", ["car", "bus"])
    tw._start -= 10.0
    tw.record_frame(
        latency_ms=20.0,
        inference_ms=15.0,
        class_counts={"car": 2, "bus": 0},
        confidences=[0.05, 0.95],
        brightness=100.0,
        sharpness=50.0,
        occupancy=0.1,
        density_state="normal",
    )
    tw.record_frame(
        latency_ms=30.0,
        inference_ms=16.0,
        class_counts={"car": 1, "bus": 1},
        confidences=[1.0, 0.55],
        brightness=120.0,
        sharpness=70.0,
        occupancy=0.2,
        density_state="warning",
        frame_size=(1280, 720),
    )
    tw.record_dropped(3)
    tw.record_error()  # not a frame (a rejected upload, say)
    tw.record_frame_error()  # the detector failed on a frame: counted among the frames
    hb = tw.build(outbox_depth=4, outbox_bytes=4000, outbox_evicted_total=1, device_id="d")
    data = json.loads(hb.to_json())
    assert data["schema_version"] == HEARTBEAT_SCHEMA_VERSION == 2
    assert data["frames_processed"] == 3 and data["fps"] == pytest.approx(0.3, rel=0.05)
    assert (data["errors"], data["other_errors"], data["errors_total"]) == (1, 1, 2)
    assert data["detections_per_frame"] == pytest.approx(2.0)  # over the 2 finished frames
    assert data["latency_p50_ms"] == pytest.approx(25.0)
    assert data["class_counts"] == {"car": 3, "bus": 1} and data["detections"] == 4
    assert data["confidence_histogram"]["bin_edges"] == list(CONFIDENCE_BIN_EDGES)
    assert data["confidence_histogram"]["counts"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert data["brightness_mean"] == pytest.approx(110.0) and data[
        "brightness_std"
    ] == pytest.approx(10.0)
    assert data["density_state"] == "warning" and data["dropped_frames"] == 3
    assert (data["outbox_depth"], data["outbox_evicted_total"]) == (4, 1)
    assert (data["frame_width"], data["frame_height"]) == (1280, 720)
    nxt = tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=1)  # a fresh window
    assert (nxt.frame_width, nxt.frame_height) == (1280, 720)  # the newest frame's, kept
    assert TelemetryWindow("c", "m", ["car"]).build(
        outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0).frame_width is None
    assert nxt.frames_processed == 0 and nxt.latency_p50_ms is None and nxt.errors_total == 2
    assert nxt.errors == nxt.other_errors == 0
    json.loads(nxt.to_json())  # no NaN in an empty window
    documented = set(re.findall(r"\b[a-z][a-z0-9_]*\b", hb_mod.__doc__))
    assert not [f.name for f in fields(Heartbeat) if f.name not in documented]
    assert confidence_histogram([0.0, 0.1, 0.999, 1.0]) == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]


def _frame(tw: TelemetryWindow, *, brightness: float, sharpness: float, boxes: int) -> None:
    tw.record_frame(
        latency_ms=10.0, inference_ms=8.0, class_counts={"car": boxes, "bus": 0},
        confidences=[0.9] * boxes, brightness=brightness, sharpness=sharpness, occupancy=0.0,
        density_state="normal",
    )


def test_heartbeat_histograms_bin_each_frame_with_fixed_edges() -> None:
    assert BRIGHTNESS_BIN_EDGES == tuple(range(0, 257, 16))
    assert SHARPNESS_BIN_EDGES[0] == 0.0 and SHARPNESS_BIN_EDGES[-1] == 5.0
    assert len(SHARPNESS_BIN_EDGES) == 21 and SHARPNESS_BIN_EDGES[1] == 0.25
    assert DETECTIONS_BIN_EDGES == (0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50,
                                    64, 80, 100)
    tw = TelemetryWindow("cam-1", "abc", ["car", "bus"])
    empty = json.loads(tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0).to_json())
    for key, edges in (("brightness_histogram", BRIGHTNESS_BIN_EDGES),
                       ("sharpness_histogram", SHARPNESS_BIN_EDGES),
                       ("detections_histogram", DETECTIONS_BIN_EDGES)):
        assert empty[key] == {"bin_edges": list(edges), "counts": [0] * (len(edges) - 1)}

    # (brightness, variance of the Laplacian, boxes): edges, the right end, beyond both ends.
    frames = [(0.0, 0.0, 0), (15.99, 9.0, 1), (16.0, 99.0, 7), (255.0, 1e9, 100),
              (256.0, 31.0, 250), (-3.0, float("nan"), 12)]
    for b, s, n in frames:
        _frame(tw, brightness=b, sharpness=s, boxes=n)
    tw.record_frame_error()  # a failed frame has no pixels measured: in no histogram
    data = json.loads(tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0).to_json())
    bright = data["brightness_histogram"]["counts"]
    assert bright[0] == 3 and bright[1] == 1 and bright[15] == 2 and sum(bright) == 6
    sharp = data["sharpness_histogram"]["counts"]
    # log10(1+v): 0 -> bin 0; 1.0 (v=9) -> bin 4; 2.0 -> bin 8; 9.0 -> clipped into bin 19;
    # log10(32) = 1.505 -> bin 6; NaN is not counted.
    assert sharp[0] == 1 and sharp[4] == 1 and sharp[8] == 1 and sharp[6] == 1
    assert sharp[19] == 1 and sum(sharp) == 5
    boxes = data["detections_histogram"]["counts"]
    assert len(boxes) == 18
    # 0 -> [0,1); 1 -> [1,2); 7 -> [6,8); 12 -> [10,13); 100 and 250 -> the last bin [80,100]
    assert boxes[0] == boxes[1] == boxes[6] == boxes[8] == 1 and boxes[17] == 2
    assert sum(boxes) == 6 == data["frames_processed"] - data["errors"]
    assert all(isinstance(c, int) for c in bright + sharp + boxes)
    assert histogram_bin(float("inf"), BRIGHTNESS_BIN_EDGES) is None
    assert histogram_bin(79.999, DETECTIONS_BIN_EDGES) == 16  # [64, 80)


def test_gateway_accepts_heartbeat_histograms_and_refuses_absurd_ones() -> None:
    """``HeartbeatIn`` keeps the payload: the new histograms pass its free-form JSON bounds,
    and one that could not be a histogram of a window (too many values, nested too deep,
    counts beyond the window's frames) is refused."""
    from pydantic import ValidationError

    from fleet.schemas import HeartbeatIn

    tw = TelemetryWindow("cam-1", "abc", ["car"])
    tw._start -= 10.0
    for i in range(5):
        _frame(tw, brightness=40.0 * i, sharpness=10.0**i, boxes=i)
    data = json.loads(tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0).to_json())
    parsed = HeartbeatIn.model_validate(data).model_dump(mode="json")
    assert parsed["detections_histogram"] == data["detections_histogram"]

    def refused(change: dict, match: str) -> None:
        with pytest.raises(ValidationError, match=match):
            HeartbeatIn.model_validate({**data, **change})

    refused({"brightness_histogram": {"bin_edges": [0, 1], "counts": [0] * 30_000}},
            "more than 20000 JSON values")
    deep: dict = {"counts": [1]}
    for _ in range(40):
        deep = {"x": deep}
    refused({"sharpness_histogram": deep}, "nested deeper")
    refused({"detections_histogram": {**data["detections_histogram"],
                                      "counts": [10**6] + [0] * 17}},
            "detections_histogram")
    refused({"brightness_histogram": {**data["brightness_histogram"],
                                      "counts": [-1] + [0] * 15}}, "brightness_histogram")
    refused({"sharpness_histogram": {"bin_edges": [0.0, 1.0], "counts": [1, 2]}},
            "sharpness_histogram")


# ---------------------------------------------------------------- import hygiene
def _run_in_fresh_interpreter(code: str) -> None:
    """Run ``code`` in a new Python process (a clean ``sys.modules``); it must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "module",
    [
        "edge_agent",
        "edge_agent.cli",
        "edge_agent.agent",
        "edge_agent.sources",
        "edge_agent.counting",
        "edge_agent.samplers",
        "edge_agent.outbox",
        "edge_agent.fsutil",
        "edge_agent.manifest",
        "edge_agent.heartbeat",
        "edge_agent.inference",
        "edge_agent.client",
        "edge_agent.http_deadline",
        "edge_agent.identity",
        "edge_agent.gateway_answers",
        "edge_agent.updater",
        "edge_agent.model_slot",
        "edge_agent.model_store",
        "edge_agent.rollback_guard",
        "edge_agent.shadow",
        "edge_agent.camera_config",
        "edge_agent.__main__",
    ],
)
def test_agent_modules_import_no_platform_packages(module: str) -> None:
    code = (
        f"import sys; sys.argv = ['x', '--help']\n"
        f"try:\n    import {module}\nexcept SystemExit:\n    pass\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'ultralytics', 'dagster', 'roadloop', 'pydantic', 'fleet'})\n"
        "assert not bad, bad\n"
    )
    _run_in_fresh_interpreter(code)


def test_manifest_contract_loads_no_agent_runtime() -> None:
    """The platform imports ``edge_agent.manifest`` (roadloop.release.signing, the gateway):
    that must not pull in ONNX Runtime, OpenCV or the agent runtime; ``edge_agent``'s names
    stay lazy."""
    code = (
        "import sys, edge_agent, edge_agent.manifest\n"
        "heavy = {'onnxruntime', 'cv2', 'httpx', 'numpy'}\n"
        "bad = sorted(heavy & {m.split('.')[0] for m in sys.modules})\n"
        "bad += sorted(m for m in sys.modules if m.startswith('edge_agent.') and m not in "
        "('edge_agent.manifest', 'edge_agent.errors'))\n"
        "assert not bad, bad\n"
        "from edge_agent import OnnxDetector, file_sha256, nms\n"
        "assert sorted(edge_agent.__all__) == sorted(edge_agent._EXPORTS)\n"
    )
    _run_in_fresh_interpreter(code)


def test_frame_metadata_carries_the_agents_own_quality() -> None:
    """The agent sends the brightness/sharpness it measured before JPEG encoding; the gateway's
    schema takes them as sent (it computes only the dhash)."""
    from edge_agent.agent import FrameResult, frame_metadata, frame_quality
    from edge_agent.counting import DensityState
    from edge_agent.samplers import SampleDecision
    from edge_agent.sources import Frame
    from fleet.schemas import FrameMetadata

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    brightness, sharpness = frame_quality(image)
    result = FrameResult(
        frame=Frame(image, 0, 1_700_000_000.0, "test:0"), detections=[], class_counts={},
        density=DensityState.NORMAL, density_changed=False, occupancy=0.0,
        brightness=brightness, sharpness=sharpness, edge_case=False,
        decision=SampleDecision(sampled=True, reasons=("periodic",), importance=0.5),
        timings_ms={},
    )
    meta = frame_metadata(result, frame_id="f-1", camera_id="cam-1", model_version="v1")
    assert meta["quality"] == {"brightness": round(brightness, 4), "sharpness": round(sharpness, 4)}
    parsed = FrameMetadata.model_validate(meta)
    assert parsed.quality is not None and parsed.quality.dhash is None
    assert parsed.quality.brightness == pytest.approx(brightness, abs=1e-3)

    result.sharpness = float("nan")  # a broken measurement is left to the gateway
    assert "quality" not in frame_metadata(result, frame_id="f-2", camera_id="cam-1",
                                           model_version="v1")


@pytest.mark.parametrize("shape", [(48, 64, 3), (720, 1280, 3), (33, 17)])
def test_frame_quality_is_the_float64_definition(shape: tuple[int, ...]) -> None:
    """The int16 Laplacian is exact for uint8 pixels (|value| <= 1020), so brightness and
    sharpness equal the float64 computation to rounding, also at the saturated extremes."""
    from edge_agent.agent import frame_quality

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[:8, :8] = 255  # a block of the largest Laplacian magnitudes
    image[8:16:2, :8] = 0
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_64F)
    brightness, sharpness = frame_quality(image)
    assert brightness == pytest.approx(float(grey.mean()), rel=1e-9)
    assert sharpness == pytest.approx(float(lap.var()), rel=1e-9)
