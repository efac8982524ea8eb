"""Broken or shifted camera streams (audit 4): a looped image folder with nothing readable,
one damaged timestamp in a video file, a file's records stamped beyond what the gateway
accepts, and a wall clock that steps back under the sampling budget."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.samplers import FrameSampler, SamplerConfig, TokenBucket
from edge_agent.sources import (
    ImageFolderSource,
    LatestFrameReader,
    SourceError,
    VideoFileSource,
)
from edge_agent.traffic import parse_traffic_section
from edge_agent.traffic.stage import TrafficStage

from .test_traffic_counter import Det

# The documented rules (docs/traffic.md): a step between two timestamps is believed up to
# 10 s (or 10 typical steps); a file's records are stamped at most 10 h ahead of the clock.
MAX_PTS_STEP_S = 10.0
MAX_MEDIA_AHEAD_S = 10 * 3600.0


def media_times(source: VideoFileSource) -> list[float]:
    return [f.media_time for f in source.frames(threading.Event())]


def write_mkv(path: Path, pts_ms: list[int], rate: Fraction | int = 25) -> None:
    """An MJPEG Matroska file whose frames carry the given presentation times (ms)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuvj420p"
        stream.time_base = Fraction(1, 1000)
        for i, t in enumerate(pts_ms):
            img = np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuvj420p")
            frame.pts = i
            for packet in stream.encode(frame):
                packet.pts, packet.dts, packet.time_base = t, i, Fraction(1, 1000)
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# --------------------------------------------------------------------------- 1. image folder
def test_a_looped_folder_with_nothing_readable_ends_with_a_source_error(
        tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), np.full((8, 8, 3), 80, np.uint8))
    source = ImageFolderSource(tmp_path, realtime=True, fps=5.0, loop=True)
    for path in source.paths:  # rotated away after the agent listed them
        path.write_bytes(b"")
    reader = LatestFrameReader(source).start()
    try:
        t0 = time.monotonic()
        while not reader.ended and time.monotonic() - t0 < 5.0:
            time.sleep(0.01)
        assert reader.get(timeout=0.1) is None
        assert reader.ended, "the source is still running"
    finally:
        reader.stop()
    assert isinstance(reader.error, SourceError) and "none of its 3 images" in str(reader.error)
    assert source.stats.read_errors == 3  # one pass, not ~90 000 a second


def test_an_unreadable_file_of_a_looped_folder_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), 60, np.uint8))
    (tmp_path / "1b.png").write_bytes(b"not a png")
    source = ImageFolderSource(tmp_path, realtime=False, loop=True)
    stop = threading.Event()
    for got, _ in enumerate(source.frames(stop), 1):
        if got == 20:  # ten passes
            stop.set()
    assert source.stats.read_errors >= 9  # every failure is counted ...
    assert caplog.text.count("not a readable image") == 1  # ... and logged once


def test_a_folder_read_once_with_nothing_readable_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"nope")
    with pytest.raises(SourceError, match="none of its 1 images"):
        list(ImageFolderSource(tmp_path, realtime=False).frames(threading.Event()))


# --------------------------------------------------------------------------- 2. timestamps
def test_one_damaged_timestamp_does_not_shift_the_rest_of_the_file(tmp_path: Path) -> None:
    # 0.40 s at 25 fps, one frame stamped two days ahead, then 0.40 s more
    pts = [i * 40 for i in range(10)] + [2 * 86400 * 1000] + [400 + i * 40 for i in range(10)]
    path = tmp_path / "outlier.mkv"
    write_mkv(path, pts)
    source = VideoFileSource(path, realtime=False)
    times = media_times(source)
    assert len(times) == 21
    assert times[:10] == pytest.approx([i * 0.04 for i in range(10)])
    # the outlier advances the clock by the bound only, and the rest follows its own stamps
    assert times[10] == pytest.approx(0.36 + MAX_PTS_STEP_S)
    assert np.diff(times[10:]) == pytest.approx([0.04] * 10)
    assert times[-1] < 0.8 + MAX_PTS_STEP_S + 0.1
    assert source.stats.read_errors >= 1  # the damaged stamp is counted


def test_a_pause_in_a_recording_advances_time_by_the_bound(tmp_path: Path) -> None:
    pts = [i * 40 for i in range(10)] + [3 * 3600 * 1000 + i * 40 for i in range(10)]
    path = tmp_path / "gap.mkv"
    write_mkv(path, pts)
    times = media_times(VideoFileSource(path, realtime=False))
    gaps = np.diff(times)
    assert gaps[9] == pytest.approx(MAX_PTS_STEP_S)  # a pause, bounded: tracks end
    assert np.delete(gaps, 9) == pytest.approx([0.04] * 18)


def test_a_time_lapse_keeps_its_own_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "timelapse.mkv"
    write_mkv(path, [i * 30_000 for i in range(20)], rate=Fraction(1, 30))
    source = VideoFileSource(path, realtime=False)
    assert media_times(source) == pytest.approx([i * 30.0 for i in range(20)])
    assert source.stats.read_errors == 0


# --------------------------------------------------------------------------- 3. wall time
@dataclass
class FileFrame:
    image: Any
    stream_time: float
    captured_at: float
    is_live: bool = False


def test_a_file_read_fast_is_never_stamped_beyond_what_the_gateway_accepts() -> None:
    from fleet.traffic_schemas import TrafficIntervalIn

    geometry = parse_traffic_section({"frame_size": [640, 360], "lines": [
        {"name": "n", "start": [0, 200], "end": [640, 200]}]})
    stage = TrafficStage("cam-1")
    image = np.zeros((360, 640, 3), np.uint8)
    records: list[dict[str, Any]] = []

    def feed(t: float, dets: list[Det]) -> None:
        frame = FileFrame(image, t, time.time())
        out = stage.process(dets, frame, geometry, 1, ["car"], "m")
        records.extend(stage.commit(out, frame, None))

    # 26 h of a camera file read in seconds: a frame every 30 s, and every 2 h one car that
    # crosses the line (4 s at 10 fps)
    for k in range(26 * 120):
        t = k * 30.0
        feed(t, [])
        if k % 240 == 1:
            for i in range(40):
                y = 120 + 4 * i
                feed(t + 1 + i / 10, [Det(0, "car", 0.9, (300, y - 40, 340, y))])
    records += stage.close()
    now = time.time()
    for r in records:
        TrafficIntervalIn.model_validate(r)  # none refused
    starts = [int(r["record_id"].split(".")[1]) for r in records]
    assert max(starts) <= now + MAX_MEDIA_AHEAD_S
    assert len({r["record_id"].split(".")[2] for r in records}) >= 2  # re-based: segments
    counted = sum(row["count"] for r in records for row in r["lines"])
    assert counted == stage.crossings_total == 13  # every car once, none lost


def test_a_file_read_in_real_time_keeps_its_origin() -> None:
    stage = TrafficStage("cam-1")
    t0 = time.time()
    assert stage.wall_time(FileFrame(None, 0.0, t0)) == t0
    assert stage.wall_time(FileFrame(None, 3600.0, t0 + 1.0)) == t0 + 3600.0  # 1 h ahead: ok
    late = FileFrame(None, MAX_MEDIA_AHEAD_S + 7200.0, t0 + 2.0)
    assert stage.wall_time(late) == t0 + 2.0  # re-based to its read time
    assert stage.wall_time(FileFrame(None, MAX_MEDIA_AHEAD_S + 7260.0, t0 + 3.0)) \
        == t0 + 62.0  # and on from there


# --------------------------------------------------------------------------- 4. clock steps
T = 1_764_241_200.0


@pytest.mark.parametrize("policy", ["stop", "importance"])
def test_sampling_resumes_after_the_wall_clock_steps_back(policy: str) -> None:
    sampler = FrameSampler(SamplerConfig(base_rate=1.0, hourly_budget=360,
                                         budget_policy=policy))
    ahead = T + 14 * 3600  # a clock 14 h fast, then corrected by NTP
    for i in range(1200):  # 2 min at 10 fps: the bucket is spent
        sampler.decide([], now=ahead + i / 10)
    level = sampler.bucket.tokens
    sampler.decide([], now=T)  # the step itself refills nothing
    assert sampler.bucket.tokens <= level + 1e-9
    taken = sum(sampler.decide([], now=T + i).sampled for i in range(1, 7201))
    assert 600 <= taken <= 730  # the budget's 720 in 2 h, not nothing for 14 h
    assert all(t <= T + 7200 for t, _ in sampler._taken)  # the hour re-based with the clock
    assert len(sampler._taken) <= 361


def test_a_bucket_refills_from_where_a_step_back_lands() -> None:
    bucket = TokenBucket(10, 1.0, now=100.0)
    bucket.tokens = 0.0
    assert bucket.refill(50.0) == 0.0  # back 50 s: nothing added
    assert bucket.refill(53.0) == pytest.approx(3.0)  # 3 s after the step: 3 tokens
    assert bucket.refill(1000.0) == 10.0  # capped
