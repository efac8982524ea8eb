"""Odd detector outputs and odd frames at the edge (audit 15).

* D1: the detector drops output rows with a non-finite box or score, or no width/height
  (counted, logged at most once per interval), and bounds scores to [0, 1]; redaction orders
  a box's corners, counts only what it covered, and a non-finite box withholds the frame.
* D2: a dynamic-size model's ``imgsz`` (metadata or argument) must be positive multiples of
  the stride and at most ``MAX_INPUT_SIDE``, else ``InvalidModelError`` at load.
* D3: grey (HxW, HxWx1) and BGRA frames are made 3-channel BGR once, at the pipeline's entry,
  so quality, redaction and upload work on them; only detector failures charge the model.

Tiny constant-output ONNX graphs (``tests.test_edge_inference``); no sleeps.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest

from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent, FrameResult
from edge_agent.camera_config import CameraConfigChannel
from edge_agent.counting import DensityState
from edge_agent.errors import InvalidModelError
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.inference import Detection, OnnxDetector
from edge_agent.outbox import Outbox
from edge_agent.pipeline import FramePipeline, frame_quality
from edge_agent.redaction import Redactor, apply_regions
from edge_agent.samplers import SampleDecision, SamplerConfig
from edge_agent.sources import Frame

from .test_edge_inference import _constant_output_model, _raw

NAMES = {0: "bike", 1: "car"}  # bike: a rider's two-wheeler, redacted


class _NoFaces:
    kind, name = "face", "test-none"

    def detect(self, image: np.ndarray) -> list:
        return []


def _textured(h: int = 64, w: int = 64) -> np.ndarray:
    y, x = np.indices((h, w))
    return (128 + 90 * np.sin(x / 2.5) * np.cos(y / 2.5)).astype(np.uint8)


def _bgr(h: int = 64, w: int = 64) -> np.ndarray:
    return np.repeat(_textured(h, w)[..., None], 3, axis=2)


def _variants() -> dict[str, np.ndarray]:
    g = _textured()
    return {"grey2d": g, "grey1": g[..., None], "bgra": np.dstack([g, g, g, np.full_like(g, 255)])}


def _model(tmp_path: Path, rows: list, name: str = "m.onnx", **kw) -> Path:
    return _constant_output_model(tmp_path / name, _raw(rows, nc=2), names=NAMES,
                                  input_shape=kw.pop("input_shape", [1, 3, 64, 64]), **kw)


def _agent(tmp_path: Path, mode: str = "mask") -> tuple[EdgeAgent, AgentSummary, list]:
    cfg = AgentConfig(gateway_url="http://127.0.0.1:9", camera_id="cam-1", source="x",
                      model_path=tmp_path / "m.onnx", state_dir=tmp_path)
    agent = EdgeAgent(cfg, redactor=Redactor(_NoFaces(), None),
                      status_stream=open("/dev/null", "w"))  # noqa: SIM115
    agent.outbox = Outbox(tmp_path / "outbox")
    agent.telemetry = TelemetryWindow("cam-1", "v", ["bike", "car"])
    agent.camera_config = CameraConfigChannel("cam-1", tmp_path, base_rate=1.0,
                                              hourly_budget=None)
    assert agent.camera_config.apply({"version": 1, "config": {"privacy": {"mode": mode}}})
    agent.slot = SimpleNamespace(sha256="v")
    charged: list = []  # the models the rollback guard was told failed
    agent.updater = SimpleNamespace(observe_frame=lambda *a: None, observe_error=charged.append)
    agent._load_redactor()
    return agent, AgentSummary("cam-1", "d", "v", stopped_by="test"), charged


def _queued(agent: EdgeAgent) -> list[tuple[np.ndarray, dict]]:
    out = []
    for item in agent.outbox.due(1e12, limit=5):
        data = np.frombuffer(Path(item.path).read_bytes(), np.uint8)
        out.append((cv2.imdecode(data, cv2.IMREAD_COLOR), item.metadata))
    return out


# ---------------------------------------------------------------- D1: detector output rows
def test_dense_output_drops_non_finite_and_empty_rows_and_bounds_scores(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    rows = [(nan, 32, 10, 10, 0, 0.9),   # NaN centre
            (40, 40, -10, -10, 0, 0.7),  # reversed corners (negative size)
            (20, 20, 0, 8, 1, 0.8),      # no width
            (30, 30, 8, 8, 1, inf),      # infinite score
            (10, 50, 8, 8, 1, nan),      # NaN score
            (50, 14, 10, 10, 0, 1.5),    # finite but > 1: kept, clamped
            (14, 50, 8, 8, 1, 0.6)]      # an ordinary car
    det = OnnxDetector(_model(tmp_path, rows))
    found = det.detect(np.zeros((64, 64, 3), np.uint8))
    for d in found:
        assert all(math.isfinite(v) for v in d.xyxy), d
        assert d.x2 > d.x1 and d.y2 > d.y1, d
        assert 0.0 <= d.confidence <= 1.0, d
    found = sorted(found, key=lambda d: d.class_name)
    assert [d.class_name for d in found] == ["bike", "car"]
    assert [d.confidence for d in found] == pytest.approx([1.0, 0.6])
    assert det.invalid_rows_dropped == 4  # the zero-size row is dropped, not invalid


def test_end2end_output_drops_non_finite_and_reversed_rows(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    rows = np.array([[nan, 4, 20, 20, 0.9, 0],     # NaN corner
                     [40, 40, 20, 20, 0.9, 0],     # reversed corners
                     [4, 4, 20, 4, 0.9, 1],        # no height
                     [4, 4, 20, 20, inf, 1],       # infinite score
                     [4, 4, 20, 20, 0.9, nan],     # NaN class
                     [10, 10, 30, 30, 1.25, 0]],   # good, score clamped
                    np.float32)
    path = _constant_output_model(tmp_path / "e2e.onnx", rows, input_shape=[1, 3, 64, 64],
                                  names=NAMES)
    det = OnnxDetector(path)
    assert det.end2end
    [d] = det.detect(np.zeros((64, 64, 3), np.uint8))
    assert (d.class_name, d.confidence, d.xyxy) == ("bike", 1.0, (10.0, 10.0, 30.0, 30.0))
    assert det.invalid_rows_dropped == 4  # the zero-size row is dropped, not invalid


def test_invalid_rows_are_logged_once_per_interval_not_per_frame(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    det = OnnxDetector(_model(tmp_path, [(32, 32, -8, -8, 0, 0.9), (float("nan"), 9, 9, 9, 1, 0.9)]))
    frame = np.zeros((64, 64, 3), np.uint8)
    with caplog.at_level(logging.WARNING, logger="edge_agent.inference"):
        for _ in range(6):
            assert det.detect(frame) == []
    logged = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(logged) == 1 and det.model_path.name in logged[0].getMessage()
    assert det.invalid_rows_dropped == 12


# ---------------------------------------------------------------- D1: redaction
def test_redaction_orders_corners_and_counts_only_what_it_covers() -> None:
    image = _bgr()
    reversed_rider = Detection(0, 0.9, 44.0, 44.0, 20.0, 20.0, class_name="bike")
    off_frame = Detection(0, 0.9, 64.0, 10.0, 64.0, 30.0, class_name="bike")  # clipped away
    done = Redactor(_NoFaces(), None).redact(image, [reversed_rider, off_frame], "mask",
                                             class_names=["bike", "car"])
    assert done.image[22:42, 22:42].max() == 0  # the rider is masked
    assert done.record["counts"] == {"person": 1, "face": 0}  # the off-frame box is not counted
    assert done.boxes["person"] == [(20.0, 20.0, 44.0, 44.0)]
    out, share = apply_regions(image, [(44, 44, 20, 20)], "blur")
    assert share > 0 and not np.array_equal(out[22:42, 22:42], image[22:42, 22:42])


def test_non_finite_box_fails_the_redaction_and_the_frame_is_withheld(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        apply_regions(_bgr(), [(float("nan"), 1, 20, 20)], "mask")
    agent, summary, _ = _agent(tmp_path)
    rider = Detection(0, 0.9, float("nan"), 10.0, 40.0, 40.0, class_name="bike")
    frame = Frame(_bgr(), 0, 1_700_000_000.0, "image:t")
    result = FrameResult(frame, [rider], {"bike": 1}, DensityState.NORMAL, False, 0.0, 120.0,
                         50.0, False, SampleDecision(True, ("base",), 1.0),
                         {"detect_ms": 1.0, "inference_ms": 1.0}, None, "f" * 32)
    agent._process(SimpleNamespace(process=lambda f: result, last_model=None), frame, summary)
    assert summary.frames_withheld == 1 and _queued(agent) == []


# ---------------------------------------------------------------- D2: imgsz
@pytest.mark.parametrize("imgsz", ["0", "-64", "True", "[64, -64]", "6", "[64, 48]",
                                   "[100000, 100000]", "8192", "[64.0, 64]", "'x'", "nonsense"])
def test_malformed_imgsz_metadata_is_refused_at_load(tmp_path: Path, imgsz: str) -> None:
    path = _model(tmp_path, [(8, 8, 4, 4, 0, 0.9)], "dyn.onnx", input_shape=["b", 3, "h", "w"])
    m = onnx.load(str(path))
    m.metadata_props.append(onnx.StringStringEntryProto(key="imgsz", value=imgsz))
    onnx.save(m, str(path))
    with pytest.raises(InvalidModelError, match="imgsz") as err:
        OnnxDetector(path)
    assert err.value.path == path and "dyn.onnx" in str(err.value)


@pytest.mark.parametrize("imgsz", [0, -32, True, 48, 8192])
def test_malformed_imgsz_argument_is_refused_at_load(tmp_path: Path, imgsz: int) -> None:
    path = _model(tmp_path, [(8, 8, 4, 4, 0, 0.9)], "dyn.onnx", input_shape=["b", 3, "h", "w"],
                  imgsz=[64, 64])
    with pytest.raises(InvalidModelError, match="imgsz") as err:
        OnnxDetector(path, imgsz=imgsz)
    assert err.value.path == path


def test_usable_imgsz_still_loads(tmp_path: Path) -> None:
    path = _model(tmp_path, [(8, 8, 4, 4, 0, 0.9)], "dyn.onnx", input_shape=["b", 3, "h", "w"],
                  imgsz=[64, 96])
    assert OnnxDetector(path).input_hw == (64, 96)
    assert OnnxDetector(path, imgsz=4096).input_hw == (4096, 4096)  # the bound is inclusive


# ---------------------------------------------------------------- D3: frame formats
@pytest.mark.parametrize("kind", ["grey2d", "grey1", "bgra"])
def test_quality_and_redaction_accept_grey_and_bgra(kind: str) -> None:
    img = _variants()[kind]
    assert frame_quality(img) == pytest.approx(frame_quality(_bgr()))
    for mode in ("mask", "blur"):
        out, share = apply_regions(img, [(10, 10, 50, 50)], mode)
        assert out.shape == img.shape and share > 0
        assert not np.array_equal(out[15:45, 15:45], img[15:45, 15:45])


@pytest.mark.parametrize("kind", ["grey2d", "grey1", "bgra"])
def test_pipeline_makes_frames_bgr_once_at_its_entry(tmp_path: Path, kind: str) -> None:
    pipe = FramePipeline(OnnxDetector(_model(tmp_path, [(32, 32, 24, 24, 0, 0.9)])),
                         sampler_config=SamplerConfig(base_rate=1.0))
    frame = Frame(_variants()[kind], 0, 1_700_000_000.0, "image:t")
    m = pipe.measure(frame)  # the frame-worker path: measure, then finish with the original
    result = pipe.finish(frame, m)
    assert result.frame.image.shape == (64, 64, 3) and result.frame.image.dtype == np.uint8
    assert result.frame is m.frame and result.frame.source_ref == "image:t"
    assert [d.class_name for d in result.detections] == ["bike"]
    bgr = Frame(_bgr(), 1, 1_700_000_001.0, "image:u")
    assert pipe.process(bgr).frame is bgr  # already BGR: no copy


def test_grey_frame_is_redacted_queued_and_not_charged_to_the_model(tmp_path: Path) -> None:
    agent, summary, charged = _agent(tmp_path, "mask")
    pipe = FramePipeline(OnnxDetector(_model(tmp_path, [(32, 32, 24, 24, 0, 0.9)])),
                         sampler_config=SamplerConfig(base_rate=1.0))
    agent._process(pipe, Frame(_textured()[..., None], 0, 1_700_000_000.0, "image:t"), summary)
    [(image, meta)] = _queued(agent)
    assert charged == [] and summary.frames_processed == 1
    assert image[22:42, 22:42].max() < 40  # the rider's box masked
    assert meta["redaction"]["counts"] == {"person": 1, "face": 0}


def test_only_detector_failures_are_charged_to_the_model(tmp_path: Path) -> None:
    agent, summary, charged = _agent(tmp_path)
    pipe = FramePipeline(OnnxDetector(_model(tmp_path, [(32, 32, 24, 24, 0, 0.9)])),
                         sampler_config=SamplerConfig(base_rate=1.0))
    bad_frame = Frame(np.zeros((64, 64, 3), np.float32), 0, 1_700_000_000.0, "image:bad")
    agent._process(pipe, bad_frame, summary)  # not an image the pipeline takes: the frame's fault
    assert charged == []

    def fail(image: np.ndarray) -> list:
        raise RuntimeError("the network broke")

    broken = SimpleNamespace(model_sha256="b" * 64, model_path=tmp_path / "b.onnx",
                             class_names=["bike", "car"], detect=fail)
    failing = FramePipeline(broken, sampler_config=SamplerConfig(base_rate=1.0))
    agent._process(failing, Frame(_bgr(), 1, 1_700_000_001.0, "image:ok"), summary)
    assert [m.sha256 for m in charged] == ["b" * 64]


def test_a_frame_with_invalid_output_rows_fails_and_is_charged_to_the_model(
        tmp_path: Path) -> None:
    """The model put out a rider box with reversed corners next to a good car: the row is not
    a detection, but nor can the rest be trusted to find every person to redact. The frame
    fails like a detector failure: nothing of it is queued (no unmasked rider leaves), and the
    serving model is charged (its rollback guard), while the detector itself (the platform's
    evaluation) just drops the row."""
    agent, summary, charged = _agent(tmp_path, "mask")
    model = _model(tmp_path, [(32, 32, -24, -24, 0, 0.9), (14, 50, 8, 8, 1, 0.6)])
    pipe = FramePipeline(OnnxDetector(model), sampler_config=SamplerConfig(base_rate=1.0))
    agent._process(pipe, Frame(_bgr(), 0, 1_700_000_000.0, "image:t"), summary)
    assert _queued(agent) == [] and summary.frames_processed == 0
    assert len(charged) == 1 and charged[0].detector.model_path == model
    assert [d.class_name for d in OnnxDetector(model).detect(_bgr())] == ["car"]


def test_a_frame_failing_outside_the_detector_is_not_in_the_models_error_rate(
        tmp_path: Path) -> None:
    """The heartbeat's ``errors`` is the serving model's error rate (the gateway's rollout
    health reads it): a frame the pipeline cannot take is an ``other_errors`` failure."""
    agent, summary, _ = _agent(tmp_path)
    pipe = FramePipeline(OnnxDetector(_model(tmp_path, [(32, 32, 24, 24, 0, 0.9)])),
                         sampler_config=SamplerConfig(base_rate=1.0))
    agent._process(pipe, Frame(np.zeros((64, 64, 3), np.float32), 0, 1.7e9, "image:bad"),
                   summary)
    beat = agent.telemetry.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0)
    assert (beat.errors, beat.other_errors) == (0, 1)
