"""One frame's work: detect → count → density → track → quality → sample.

The work splits in two (``FramePipeline``):

* ``measure`` — letterbox, network, NMS and the frame's brightness and sharpness. It reads
  nothing that the previous frame changed, so several frames may be measured at once on
  different threads (``edge_agent.frame_workers``).
* ``finish`` — counting, density, tracking, the blur reference and the samplers. Each step
  carries state from one frame to the next, so frames are finished one at a time, in order.

``process`` does both, on the caller's thread.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from edge_agent.camera_config import EffectiveSampling
from edge_agent.counting import DensityState, DensityTracker, count_per_class
from edge_agent.inference import Detection, OnnxDetector, StageTimings, _as_bgr
from edge_agent.model_slot import LoadedModel, ModelSlot
from edge_agent.quality import laplacian_variance
from edge_agent.samplers import FrameSampler, SampleDecision, SamplerConfig
from edge_agent.sources import Frame
from edge_agent.traffic.events import FrameTraffic
from edge_agent.traffic.geometry import TrafficConfig
from edge_agent.traffic.stage import REASON_TRAFFIC_EVENT, TrafficStage

logger = logging.getLogger(__name__)

DARK, BRIGHT, BLUR_RATIO, BLUR_WARMUP = 40.0, 220.0, 1 / 3, 10


@dataclass
class FrameResult:
    """Everything the agent computed for one frame."""

    frame: Frame
    detections: list[Detection]
    class_counts: dict[str, int]
    density: DensityState
    density_changed: bool
    occupancy: float
    brightness: float
    sharpness: float
    edge_case: bool
    decision: SampleDecision
    timings_ms: dict[str, float]
    model: LoadedModel | None = None  # the model that served this frame
    frame_id: str | None = None  # set when the frame is sampled for upload
    traffic: FrameTraffic | None = None  # tracks, crossings, zones, events (with a geometry)
    traffic_records: list[dict[str, Any]] = field(default_factory=list)  # intervals closed


@dataclass(frozen=True)
class FrameMeasurement:
    """What ``FramePipeline.measure`` found in one frame, before any per-camera state."""

    model: LoadedModel
    detections: list[Detection]
    stages: StageTimings | None  # the detector's preprocess / inference / postprocess
    detect_ms: float
    brightness: float
    sharpness: float
    quality_ms: float
    frame: Frame | None = None  # the frame as measured (``as_bgr_frame``); ``finish`` uses it


class InvalidModelOutput(RuntimeError):
    """The detector's output for a frame held invalid rows (``StageTimings.invalid_rows``)."""


class DetectFailed(Exception):
    """``measure`` failed on a frame; ``model`` is the one that was serving it."""

    def __init__(self, model: LoadedModel, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.model = model


def frame_quality(image: np.ndarray) -> tuple[float, float]:
    """(mean grey level, variance of the Laplacian) at native resolution
    (``edge_agent.quality.laplacian_variance``, the gateway's definition too). BGR, grey
    (HxW or HxWx1) or BGRA."""
    if image.ndim == 2:
        grey = image
    elif image.shape[2] == 1:
        grey = image[..., 0]
    else:
        grey = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[2] == 4
                            else cv2.COLOR_BGR2GRAY)
    mean, _ = cv2.meanStdDev(grey)
    return float(mean[0, 0]), laplacian_variance(grey)


def as_bgr_frame(frame: Frame) -> Frame:
    """``frame`` with its image as 3-channel BGR uint8 (``inference._as_bgr``: grey and BGRA
    converted, anything else a ``ValueError``/``TypeError``); the same object when it already
    is. The pipeline's entry: detection, quality, redaction and upload see this one format."""
    image = _as_bgr(frame.image)
    return frame if image is frame.image else replace(frame, image=image)


def _detect(detector: Any, image: np.ndarray) -> tuple[list[Detection], StageTimings | None]:
    timed = getattr(detector, "detect_timed", None)
    if timed is not None:  # OnnxDetector: this call's timings, safe across threads
        return timed(image)
    return detector.detect(image), getattr(detector, "last_timings", None)


class FramePipeline:
    """detect → count → density → quality → sample, with a per-stage time breakdown."""

    def __init__(
        self,
        detector: OnnxDetector | ModelSlot,
        *,
        capacity: float = 30.0,
        sampler_config: SamplerConfig | None = None,
        sampling: Callable[[], EffectiveSampling] | None = None,
        traffic: TrafficStage | None = None,
        geometry: Callable[[], tuple[TrafficConfig | None, int]] | None = None,
    ) -> None:
        self.slot = detector if isinstance(detector, ModelSlot) else ModelSlot(detector)
        # Tracking and counting (edge_agent.traffic) when the camera has a traffic geometry.
        self.traffic = traffic
        self._geometry = geometry
        self.last_model: LoadedModel | None = None
        self.density = DensityTracker(capacity)
        self.sampler = FrameSampler(sampler_config)
        # The rates in force (the camera's configuration): read once per frame, applied to
        # the sampler here, on the frame loop's thread.
        self._sampling = sampling
        self._rates: EffectiveSampling | None = None
        self._sharp_mean: float | None = None
        self._frames = 0

    @property
    def detector(self) -> OnnxDetector:
        """The model serving now (it may change between frames)."""
        return self.slot.detector

    def _is_edge_case(self, brightness: float, sharpness: float, density_changed: bool) -> bool:
        blurred = (
            self._frames > BLUR_WARMUP
            and self._sharp_mean is not None
            and sharpness < BLUR_RATIO * self._sharp_mean
        )
        self._sharp_mean = (
            sharpness if self._sharp_mean is None else 0.95 * self._sharp_mean + 0.05 * sharpness
        )
        density_changed = density_changed and self._frames > 1  # the first frame sets the state
        return density_changed or brightness < DARK or brightness > BRIGHT or blurred

    def _sync_rates(self, now: float) -> None:
        if self._sampling is None:
            return
        rates = self._sampling()
        if rates != self._rates:
            self._rates = rates  # tried once: a refusal is logged, not repeated every frame
            try:
                self.sampler.set_rates(rates.base_rate, rates.hourly_budget, now=now)
            except ValueError as exc:  # the frame is fine; keep sampling at the old rates
                logger.error("sampling rates %s not applied: %s", rates, exc)

    def measure(self, frame: Frame) -> FrameMeasurement:
        """The frame's detections and quality; touches no per-camera state, so any thread
        may call it. Raises ``DetectFailed`` (naming the model) when detection fails; a
        frame that is not an image (``as_bgr_frame``) raises before any model runs."""
        frame = as_bgr_frame(frame)
        model = self.slot.current  # taken once: a swap lands between frames, never inside one
        self.last_model = model
        t0 = time.perf_counter()
        try:
            dets, stages = _detect(model.detector, frame.image)
            if stages is not None and stages.invalid_rows:
                # A non-finite or empty box among its outputs: the model is broken on this
                # frame, and what it kept cannot be trusted to find every person to redact.
                # The frame fails (not counted, not uploaded) and is charged to the model.
                raise InvalidModelOutput(
                    f"{stages.invalid_rows} output row(s) with a non-finite box or score, or "
                    "a negative width or height")
        except Exception as exc:
            raise DetectFailed(model, exc) from exc
        if model.delay_s:  # fault injection (EDGE_AGENT_FAULT_MODEL_DELAY_MS)
            time.sleep(model.delay_s)
        t1 = time.perf_counter()
        brightness, sharpness = frame_quality(frame.image)
        t2 = time.perf_counter()
        return FrameMeasurement(model, dets, stages, (t1 - t0) * 1e3, brightness, sharpness,
                                (t2 - t1) * 1e3, frame)

    def finish(self, frame: Frame, m: FrameMeasurement) -> FrameResult:
        """Counting, tracking and sampling of a measured frame; frames in capture order.
        The result carries the frame as measured (3-channel BGR)."""
        frame = m.frame if m.frame is not None else as_bgr_frame(frame)
        self._frames += 1
        dets, model = m.detections, m.model
        t1 = time.perf_counter()
        counts = count_per_class(dets, model.detector.class_names)
        state, changed = self.density.update(len(dets))
        t2 = time.perf_counter()
        traffic = None
        if self.traffic is not None and self._geometry is not None:
            geometry, version = self._geometry()
            traffic = self.traffic.process(dets, frame, geometry, version,
                                           model.detector.class_names, model.sha256)
        t_track = time.perf_counter()
        edge = self._is_edge_case(m.brightness, m.sharpness, changed)
        t3 = time.perf_counter()
        self._sync_rates(frame.captured_at)
        decision = self.sampler.decide(dets, now=frame.captured_at, edge_case=edge)
        if traffic is not None and traffic.events:  # the operator sees what happened
            decision = SampleDecision(
                True, (*decision.reasons, REASON_TRAFFIC_EVENT),
                self.sampler.config.max_importance, over_budget=not decision.sampled)
        frame_id = uuid.uuid4().hex if decision.sampled else None
        records = self.traffic.commit(traffic, frame, frame_id) if self.traffic else []
        t4 = time.perf_counter()
        st = m.stages
        timings = {
            "preprocess_ms": st.preprocess_ms if st else 0.0,
            "inference_ms": st.inference_ms if st else m.detect_ms,
            "postprocess_ms": st.postprocess_ms if st else 0.0,
            "detect_ms": m.detect_ms,
            "count_ms": (t2 - t1) * 1e3,
            "track_ms": (t_track - t2) * 1e3,
            "quality_ms": m.quality_ms + (t3 - t_track) * 1e3,
            "sample_ms": (t4 - t3) * 1e3,
        }
        return FrameResult(
            frame,
            dets,
            counts,
            state,
            changed,
            self.density.occupancy,
            m.brightness,
            m.sharpness,
            edge,
            decision,
            timings,
            model,
            frame_id,
            traffic,
            records,
        )

    def process(self, frame: Frame) -> FrameResult:
        """``measure`` then ``finish``, on this thread."""
        return self.finish(frame, self.measure(frame))
