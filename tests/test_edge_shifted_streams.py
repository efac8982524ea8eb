"""Streams unlike the shared videos (found by a black-box audit of the agent): a variable
frame rate, a header fps no camera writes, a file cut short, an image folder at its own
rate, an empty source, a damaged kept configuration and a geometry drawn for another view."""

from __future__ import annotations

import itertools
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent import sources
from edge_agent.cli import build_parser
from edge_agent.sources import (
    DEFAULT_FILE_FPS,
    SourceError,
    VideoFileSource,
    open_source,
)
from edge_agent.traffic import parse_traffic_section
from edge_agent.traffic.stage import TrafficStage, geometry_misfit

GEOMETRY = {"frame_size": [1280, 720],
            "lines": [{"name": "n", "start": [100, 500], "end": [1000, 500]}]}


def frames_of(source: Any) -> list[Any]:
    return list(source.frames(threading.Event()))


def textured(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def write_vfr(path: Path, pts_ms: list[int]) -> None:
    """An H.264 mp4 whose frames carry the given presentation times (ms)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        for i, t in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(textured(i), format="bgr24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_mjpg(path: Path, n: int, fps: float = 30.0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(n):
        writer.write(textured(i))
    writer.release()


def test_a_variable_frame_rate_file_is_timed_by_its_timestamps(tmp_path: Path) -> None:
    # 30 fps for 10 frames, then one frame every 100 ms: an average fps would time the
    # second part 3x too fast
    pts = [round(i * 1000 / 30) for i in range(10)] + [400 + 100 * k for k in range(10)]
    path = tmp_path / "vfr.mp4"
    write_vfr(path, pts)
    got = frames_of(VideoFileSource(path, realtime=False))
    assert len(got) == len(pts)
    times = [f.media_time for f in got]
    assert times == pytest.approx([(t - pts[0]) / 1000 for t in pts], abs=0.002)


def test_a_constant_rate_file_keeps_index_over_fps(tmp_path: Path) -> None:
    path = tmp_path / "cfr.avi"
    write_mjpg(path, 12, fps=25.0)
    got = frames_of(VideoFileSource(path, realtime=False))
    assert [f.media_time for f in got] == pytest.approx([i / 25 for i in range(12)])


def test_looping_keeps_media_time_increasing(tmp_path: Path) -> None:
    path = tmp_path / "loop.avi"
    write_mjpg(path, 5, fps=10.0)
    source = VideoFileSource(path, realtime=False, loop=True)
    stop = threading.Event()
    times = []
    for frame in source.frames(stop):
        times.append(frame.media_time)
        if len(times) == 12:
            stop.set()
    assert all(b > a for a, b in itertools.pairwise(times)), times
    assert times[5] == pytest.approx(0.5)  # the second pass starts one frame after the first


def test_a_header_fps_no_camera_writes_is_not_believed(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "slow.avi"
    write_mjpg(path, 3)
    real = cv2.VideoCapture

    class BrokenTimeScale:
        """A capture whose header says 0.0025 frames/s (an mp4 with a zero time scale)."""

        def __init__(self, *a: Any) -> None:
            self._cap = real(*a)

        def get(self, prop: int) -> float:
            return 0.0025 if prop == cv2.CAP_PROP_FPS else self._cap.get(prop)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cap, name)

    monkeypatch.setattr(sources.cv2, "VideoCapture", BrokenTimeScale)
    source = VideoFileSource(path, realtime=True)
    assert source.fps == DEFAULT_FILE_FPS  # the pacer would have slept 400 s a frame
    assert "0.0025" in caplog.text


def test_a_file_cut_short_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = tmp_path / "whole.avi"
    write_mjpg(whole, 120)
    source = VideoFileSource(whole, realtime=False)
    assert len(frames_of(source)) == 120 and source.stats.read_errors == 0
    cut = tmp_path / "cut.avi"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    short = VideoFileSource(cut, realtime=False)
    if short.frame_count <= 0:
        pytest.skip("this OpenCV build reads no frame count from a cut AVI")
    n = len(frames_of(short))
    assert n < 0.9 * short.frame_count
    assert short.stats.read_errors == 1 and "cut short or damaged" in caplog.text


def test_an_image_folder_runs_at_the_rate_it_was_taken(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), textured(i))
    got = frames_of(open_source(str(tmp_path), realtime=False, image_fps=30.0))
    assert [f.media_time for f in got] == pytest.approx([0, 1 / 30, 2 / 30])
    args = build_parser().parse_args(["run", "--gateway", "http://x", "--camera-id", "c",
                                      "--source", str(tmp_path), "--image-fps", "30"])
    assert args.image_fps == 30.0


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_source_is_refused(spec: str) -> None:
    with pytest.raises(SourceError, match="empty"):
        open_source(spec)


def test_an_integer_beyond_any_float_is_a_value_error() -> None:
    huge = int("9" * 400)
    with pytest.raises(ValueError, match="between"):
        parse_traffic_section({**GEOMETRY, "lines": [{"name": "n", "start": [huge, 500],
                                                      "end": [1000, 500]}]})


class _Frame:
    def __init__(self, w: int, h: int, t: float) -> None:
        self.image = np.zeros((h, w, 3), np.uint8)
        self.captured_at = 1_764_241_200.0 + t
        self.stream_time = t


@pytest.mark.parametrize(("size", "fits"), [
    ((1280, 720), True), ((1920, 1080), True), ((1920, 1088), True), ((640, 352), True),
    ((960, 720), False), ((1280, 320), False), ((720, 1280), False)])
def test_a_geometry_for_another_view_turns_counting_off(size: tuple[int, int],
                                                        fits: bool) -> None:
    geometry = parse_traffic_section(GEOMETRY)
    misfit = geometry_misfit(geometry, 3, *size)
    assert (misfit is None) == fits
    stage = TrafficStage("cam-1")
    out = stage.process([], _Frame(*size, 0.0), geometry, 3, ["car"], "m")
    if fits:
        assert out is not None and stage.error is None
    else:
        assert out is None and stage.error == misfit and misfit["version"] == 3
        assert f"{size[0]}x{size[1]}" in misfit["reason"] and "1280x720" in misfit["reason"]
    # the next geometry that fits turns it back on
    w, h = size
    fitting = parse_traffic_section({"frame_size": [w, h], "lines": [
        {"name": "n", "start": [0.1 * w, 0.7 * h], "end": [0.9 * w, 0.7 * h]}]})
    assert stage.process([], _Frame(*size, 0.1), fitting, 4, ["car"], "m") is not None
    assert stage.error is None


@pytest.mark.parametrize(("polygon", "words"), [
    ([[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]], ["repeats a corner", "closes itself"]),
    ([[0, 0], [100, 0], [100, 0], [0, 100]], ["repeats a corner", "points 1 and 2"]),
    ([[0, 0], [50, 0], [100, 0]], ["on one line"]),
    ([[0, 0], [100, 100], [100, 0], [0, 100]], ["self-intersecting"])])
def test_a_zone_is_refused_for_what_is_wrong_with_it(polygon: list[list[int]],
                                                     words: list[str]) -> None:
    with pytest.raises(ValueError) as refused:
        parse_traffic_section({"frame_size": [1280, 720],
                               "zones": [{"name": "z", "polygon": polygon}]})
    for word in words:
        assert word in str(refused.value)
