"""Frames measured on several threads and finished in capture order (edge_agent.frame_workers),
and the agent's frame loop that drives them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import cv2
import numpy as np
import pytest

from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent
from edge_agent.frame_workers import MAX_WORKERS, FrameWorkers
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.inference import Detection, OnnxDetector
from edge_agent.model_slot import LoadedModel, ModelSlot
from edge_agent.pipeline import FramePipeline, FrameResult
from edge_agent.samplers import SamplerConfig
from edge_agent.sources import Frame, FrameSource, LatestFrameReader
from edge_agent.traffic.stage import TrafficStage

from .helpers import SHARED_DIR, require_shared

WAIT_S = 30.0  # a bound on waits that end as soon as the other thread acts, never a sleep


def _frame(i: int, size: tuple[int, int] = (24, 32)) -> Frame:
    return Frame(np.full((*size, 3), i % 256, np.uint8), i, 1_700_000_000.0 + i, f"t:{i}", i / 25)


# ---------------------------------------------------------------- FrameWorkers
def test_frames_come_back_in_order_however_they_finish() -> None:
    first_may_finish = threading.Event()
    finished: list[int] = []

    def measure(frame: Frame) -> int:
        if frame.index == 0:  # the first frame finishes only after the second one has
            assert first_may_finish.wait(WAIT_S)
        else:
            first_may_finish.set()
        finished.append(frame.index)
        return frame.index * 10

    pool = FrameWorkers(measure, 2)
    pool.submit(_frame(0))
    pool.submit(_frame(1))
    assert pool.full
    with pytest.raises(RuntimeError, match="busy"):
        pool.submit(_frame(2))
    out = [pool.pop(), pool.pop()]
    pool.close()
    assert finished == [1, 0]  # they did finish out of order
    assert [(m.frame.index, m.measurement, m.error) for m in out] == [(0, 0, None), (1, 10, None)]


def test_an_error_travels_with_its_frame() -> None:
    def measure(frame: Frame) -> int:
        if frame.index == 1:
            raise ValueError("bad frame")
        return frame.index

    pool = FrameWorkers(measure, 3)
    for i in range(3):
        pool.submit(_frame(i))
    got = [pool.pop() for _ in range(3)]
    pool.close()
    assert [m.frame.index for m in got] == [0, 1, 2]
    assert got[1].measurement is None and isinstance(got[1].error, ValueError)
    assert got[0].error is None and got[2].measurement == 2


@pytest.mark.parametrize("workers", [0, -3, MAX_WORKERS + 1, 10**9])
def test_a_worker_count_out_of_range_is_refused(workers: int) -> None:
    with pytest.raises(ValueError, match=f"at least 1 and at most {MAX_WORKERS}"):
        FrameWorkers(lambda f: f, workers)


@pytest.mark.parametrize(("value", "message"), [
    ("0", "must be >= 1"), ("-2", "must be >= 1"), ("two", "expected an integer"),
    ("1e3", "expected an integer"), (str(MAX_WORKERS + 1), f"at most {MAX_WORKERS}"),
    ("99999999999999999999", f"at most {MAX_WORKERS}"),
])
def test_the_cli_refuses_an_absurd_worker_count(capsys: pytest.CaptureFixture[str], value: str,
                                                message: str) -> None:
    from edge_agent.cli import build_parser

    base = ["run", "--gateway", "http://127.0.0.1:9", "--camera-id", "cam", "--source", "x.mp4"]
    parser = build_parser()
    assert parser.parse_args(base).workers == 1 == AgentConfig.inference_workers
    assert parser.parse_args([*base, "--workers", str(MAX_WORKERS)]).workers == MAX_WORKERS
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--workers", value])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- same results as one thread
VIDEO = SHARED_DIR / "videos" / "highway_overpass.mp4"
MODEL = SHARED_DIR / "models" / "atl_v2_yolo11n_gpu_320.onnx"


def _pipeline(traffic_geometry) -> FramePipeline:
    det = OnnxDetector(MODEL, intra_op_threads=1, providers=["CPUExecutionProvider"])
    return FramePipeline(det, sampler_config=SamplerConfig(base_rate=0.1, hourly_budget=None),
                         traffic=TrafficStage("cam"), geometry=lambda: (traffic_geometry, 1))


def _summary(r: FrameResult) -> tuple:
    dets = [(d.class_id, round(d.confidence, 5), *(round(v, 2) for v in d.xyxy))
            for d in r.detections]
    crossings = [(c.track_id, c.line, c.direction) for c in r.traffic.crossings]
    return (r.frame.index, dets, r.class_counts, r.density, r.edge_case,
            r.decision.sampled, r.decision.reasons, crossings, r.brightness, r.sharpness)


def test_two_workers_give_exactly_what_one_thread_gives() -> None:
    """Real frames and model: measured on 2 threads and finished in order, every frame's
    detections, counts, tracks' line crossings, quality and sampling equal the serial run's."""
    require_shared(VIDEO, MODEL)
    from benchmarks.agent_pipeline import bench_geometry

    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    for i in range(60):
        ok, image = cap.read()
        assert ok
        frames.append(Frame(image, i, 1_700_000_000.0 + i / 30, f"v:{i}", i / 30))
    cap.release()
    geometry = bench_geometry(frames[0].image.shape[1], frames[0].image.shape[0])

    one_thread = _pipeline(geometry)
    serial = [_summary(one_thread.process(f)) for f in frames]
    pipeline = _pipeline(geometry)
    pool = FrameWorkers(pipeline.measure, 2)
    parallel = []
    for f in frames:
        if pool.full:
            m = pool.pop()
            parallel.append(_summary(pipeline.finish(m.frame, m.measurement)))
        pool.submit(f)
    while len(pool):
        m = pool.pop()
        parallel.append(_summary(pipeline.finish(m.frame, m.measurement)))
    pool.close()
    assert parallel == serial
    assert sum(len(s[7]) for s in serial) > 0  # vehicles did cross the line
    assert sum(bool(s[1]) for s in serial) > 50


# ---------------------------------------------------------------- the agent's frame loop
class _ListSource(FrameSource):
    kind = "list"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for i in range(self.n):
            if stop.is_set():
                return
            yield _frame(i)


class _IndexDetector:
    """One 'car' whose confidence encodes the frame (its grey level); fails on ``fail_on``."""

    class_names: ClassVar[list[str]] = ["car"]
    last_timings = None
    model_sha256 = "0" * 64
    model_path = Path("index.onnx")

    def __init__(self, fail_on: set[int] = frozenset()) -> None:
        self.fail_on = set(fail_on)
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[Detection]:
        level = int(image[0, 0, 0])
        with self._lock:
            self.calls.append(level)
        if level in self.fail_on:
            raise RuntimeError(f"cannot read frame {level}")
        return [Detection(0, level / 255, 1.0, 1.0, 5.0, 5.0, class_name="car")]


def _agent(tmp_path: Path, workers: int, max_frames: int | None,
           detector: _IndexDetector, max_fps: float | None = None,
           ) -> tuple[EdgeAgent, FramePipeline, list[int]]:
    cfg = AgentConfig(gateway_url="http://127.0.0.1:9", camera_id="cam-1", source="x",
                      model_path=tmp_path / "m.onnx", state_dir=tmp_path,
                      max_frames=max_frames, inference_workers=workers, max_fps=max_fps)
    agent = EdgeAgent(cfg, status_stream=open("/dev/null", "w"))  # noqa: SIM115
    agent.telemetry = TelemetryWindow("cam-1", "v", ["car"])
    agent._status = SimpleNamespace(maybe_print=lambda: None)
    finished: list[int] = []

    def handle(result: FrameResult, summary: AgentSummary) -> None:
        summary.frames_processed += 1
        finished.append(result.frame.index)

    agent._handle_result = handle  # type: ignore[method-assign]
    slot = ModelSlot(LoadedModel(detector=detector, sha256="0" * 64, path=Path("m")))
    pipeline = FramePipeline(slot, sampler_config=SamplerConfig(hourly_budget=None))
    return agent, pipeline, finished


def _loop(agent: EdgeAgent, pipeline: FramePipeline, n: int) -> tuple[Any, AgentSummary]:
    summary = AgentSummary("cam-1", "d", "v", stopped_by="end_of_source")
    reader = LatestFrameReader(_ListSource(n), drop_stale=False).start()
    try:
        return agent._frame_loop(reader, pipeline, summary), summary
    finally:
        reader.stop()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_the_loop_stops_at_max_frames_with_frames_in_order(tmp_path: Path, workers: int) -> None:
    det = _IndexDetector()
    agent, pipeline, finished = _agent(tmp_path, workers, 7, det)
    stopped, summary = _loop(agent, pipeline, 20)
    assert stopped == "max_frames" and summary.frames_processed == 7
    assert finished == list(range(7))
    assert sorted(det.calls) == list(range(7))  # no frame measured beyond the limit


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_frame_is_an_error_and_the_loop_goes_on(tmp_path: Path, workers: int) -> None:
    det = _IndexDetector(fail_on={3})
    agent, pipeline, finished = _agent(tmp_path, workers, 6, det)
    stopped, summary = _loop(agent, pipeline, 20)
    assert stopped == "max_frames" and finished == [0, 1, 2, 4, 5, 6]
    assert summary.frames_processed == 6 and agent.telemetry.errors_total == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_max_fps_measures_every_nth_frame_by_the_source_clock(tmp_path: Path,
                                                               workers: int) -> None:
    """A 25 fps source capped at 5 fps: every 5th frame is measured, the rest skipped before
    the detector sees them."""
    det = _IndexDetector()
    agent, pipeline, finished = _agent(tmp_path, workers, None, det, max_fps=5.0)
    stopped, summary = _loop(agent, pipeline, 30)
    assert stopped is None and finished == [0, 5, 10, 15, 20, 25]
    assert sorted(det.calls) == finished and summary.frames_skipped == 24


def test_the_cli_refuses_an_absurd_max_fps(capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import build_parser

    base = ["run", "--gateway", "http://127.0.0.1:9", "--camera-id", "cam", "--source", "x.mp4"]
    parser = build_parser()
    assert parser.parse_args(base).max_fps is None
    assert parser.parse_args([*base, "--max-fps", "7.5"]).max_fps == 7.5
    for value in ("0", "-1", "nan", "inf", "1e9"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--max-fps", value])
        assert "--max-fps" in capsys.readouterr().err


def test_the_end_of_the_source_finishes_every_frame(tmp_path: Path) -> None:
    agent, pipeline, finished = _agent(tmp_path, 2, None, _IndexDetector())
    stopped, _ = _loop(agent, pipeline, 9)
    assert stopped is None and finished == list(range(9))


def test_a_stop_finishes_the_frames_already_measured(tmp_path: Path) -> None:
    det = _IndexDetector()
    agent, pipeline, finished = _agent(tmp_path, 3, None, det)
    handle = agent._handle_result

    def stop_after_three(result: FrameResult, summary: AgentSummary) -> None:
        handle(result, summary)
        if len(finished) == 3:
            agent.request_stop()

    agent._handle_result = stop_after_three  # type: ignore[method-assign]
    stopped, summary = _loop(agent, pipeline, 50)
    assert stopped == "signal"
    assert finished == list(range(len(finished))) and len(finished) >= 3
    assert sorted(det.calls) == finished  # every frame measured was finished, none lost
    assert summary.frames_processed == len(finished)
