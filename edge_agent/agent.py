"""The edge agent runtime: source → detector → counts/density → samplers → outbox → gateway

Threads: the frame reader (``LatestFrameReader``), the inference loop (the caller's thread,
``EdgeAgent.run``; with ``inference_workers`` > 1 it hands each frame's network, NMS and
quality to that many ``FrameWorkers`` threads and finishes the frames in order), an
uploader that drains the durable outbox into the gateway (``edge_agent.uploader``:
``POST /v1/frames/batch`` when several frames are due, up to ``upload_batch_max``, else
``POST /v1/frames``), and a heartbeat sender (``POST /v1/heartbeats`` every
``heartbeat_interval_s``; heartbeats that fail are kept, at most 20, and resent first).

Edge cases (the ``edge_case`` sampler): a frame whose density state differs from the last
frame's, or whose image is unusually dark (mean grey < 40), bright (> 220) or blurred
(variance of the Laplacian below a third of the camera's running mean, after 10 frames).

Stopping: ``request_stop()`` (the CLI calls it on SIGTERM/SIGINT) ends reading; the agent
then gives the uploader up to ``drain_timeout_s`` to empty the outbox, sends a last
heartbeat and returns. Whatever is still queued stays in the outbox for the next start.
At the end of a file source (or ``max_frames``) it does the same.

Model updates (``edge_agent.updater``): with a pinned model public key (``model_public_key``
in the config, else the one enrollment handed out) a fifth thread polls ``GET /v1/manifest``
every ``update_interval_s`` and downloads, verifies and loads new models off the frame loop.
The frame loop reads the serving model from a ``ModelSlot`` once per frame, so a swap lands
between two frames; it feeds each frame's latency to the rollback guard and a sample of
frames to the shadow candidate. Heartbeats carry the updater's rollout fields.

Camera configuration (``edge_agent.camera_config``): after each heartbeat the heartbeat thread
asks the gateway for the camera's configuration document (a 304 when unchanged); a new one is
checked, kept in the state dir and put in force without a restart — the frame loop picks up
the sampling rates in force before each frame. Heartbeats report the version in force.

Fault injection for tests: ``EDGE_AGENT_FAULT_KILL_AFTER_ACKS=N`` makes the process
SIGKILL itself after the gateway acknowledged its N-th frame (a batch acknowledges several)
and *before* the outbox forgets that frame — the "killed mid-upload" case the restart must absorb (409).
``EDGE_AGENT_FAULT_MODEL_DELAY_MS`` slows chosen models down (see ``edge_agent.model_slot``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from edge_agent.agent_config import (
    AGENT_SESSION_CONFIG,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_NAMES,
    AgentConfig,
    AgentSummary,
    agent_version,
    find_default_model,
    make_detector,
)
from edge_agent.agent_status import AgentUploadEvents, StatusLine
from edge_agent.camera_config import CameraConfigChannel
from edge_agent.client import GatewayClient
from edge_agent.errors import AuthError, EnrollmentError, GatewayError, GatewayUnavailable
from edge_agent.frame_workers import FrameWorkers, Measured
from edge_agent.fsutil import StateDirLock
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.inference import OnnxDetector
from edge_agent.manifest import ManifestVerifier, PublicKeyError, load_public_key
from edge_agent.model_slot import ModelSlot
from edge_agent.outbox import BackoffPolicy, Outbox, bounded_retry_after
from edge_agent.pipeline import (
    DetectFailed,
    FrameMeasurement,
    FramePipeline,
    FrameResult,
    frame_quality,
)
from edge_agent.record_outbox import RecordOutbox
from edge_agent.redaction import RedactionUnavailable, Redactor, load_redactor
from edge_agent.rollback_guard import GuardLimits
from edge_agent.sources import Frame, LatestFrameReader, open_source
from edge_agent.traffic.stage import CHECKPOINT_FILE, TrafficStage
from edge_agent.updater import ModelUpdater
from edge_agent.uploader import FrameUploader, linger_wait

logger = logging.getLogger(__name__)

MAX_SUMMARY_IDS = 10_000  # AgentSummary keeps the ids of the most recent sampled frames
FAULT_KILL_ENV = "EDGE_AGENT_FAULT_KILL_AFTER_ACKS"


def frame_metadata(
    result: FrameResult, *, frame_id: str, camera_id: str, model_version: str
) -> dict[str, Any]:
    """The ``metadata`` JSON of ``POST /v1/frames`` (docs/fleet-api.md)."""
    h, w = result.frame.image.shape[:2]
    meta: dict[str, Any] = {
        "frame_id": frame_id,
        "camera_id": camera_id,
        "captured_at": result.frame.captured_at_iso,
        "reasons": list(result.decision.reasons),
        "importance": round(float(result.decision.importance), 6),
        "model_version": model_version,
        "detections": [
            {
                "class_id": d.class_id,
                "class_name": d.class_name,
                "confidence": round(min(max(d.confidence, 0.0), 1.0), 6),
                "xyxy": [round(v, 2) for v in d.xyxy],
            }
            for d in result.detections
        ],
        "width": int(w),
        "height": int(h),
        "source_ref": result.frame.source_ref[:500],
    }
    # Measured on the pixels the camera gave, before JPEG encoding: the gateway keeps these
    # and computes only what is missing (the dhash).
    quality = {"brightness": result.brightness, "sharpness": result.sharpness}
    if all(math.isfinite(v) for v in quality.values()):
        meta["quality"] = {k: round(float(v), 4) for k, v in quality.items()}
    return meta


# --------------------------------------------------------------------------- the agent
class EdgeAgent:
    """One camera's agent; ``run()`` blocks until the source ends, ``max_frames`` or a stop."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        detector: OnnxDetector | None = None,
        status_stream: TextIO | None = None,
        redactor: Redactor | Callable[[], Redactor] | None = None,
    ) -> None:
        self.config = config
        self._detector = detector
        # A Redactor, or a factory for one (called at start; RedactionUnavailable stops
        # sampling into the outbox). None: load_redactor with the config's detectors.
        self._redactor_source = redactor
        self.redactor: Redactor | None = None
        self.redaction_error: str | None = None
        self._logged_gaps: list[str] | None = None  # redaction gaps last logged
        self._stop = threading.Event()
        self._force = threading.Event()
        self._uploads_stop = threading.Event()
        self._hb_stop = threading.Event()
        self._wake_uploader = threading.Event()
        self._draining = threading.Event()  # the run is ending: no linger, send what is due
        self._status_stream = status_stream if status_stream is not None else sys.stderr
        self._is_tty = bool(getattr(self._status_stream, "isatty", lambda: False)())
        self._pending_heartbeats: collections.deque[str] = collections.deque(maxlen=20)
        self._hb_lock = threading.Lock()
        self._kill_after = int(os.environ.get(FAULT_KILL_ENV, "0") or 0)
        self._last_upload_at: float | None = None
        self.summary: AgentSummary | None = None
        self.updater: ModelUpdater | None = None
        self.camera_config: CameraConfigChannel | None = None

    # ------------------------------------------------------------------ control
    def request_stop(self, *, force: bool = False) -> None:
        """Stop reading frames; ``force`` also skips draining the outbox."""
        if force:
            self._force.set()
        self._stop.set()
        self._wake_uploader.set()

    # ------------------------------------------------------------------ set-up
    def _enroll(self, client: GatewayClient) -> None:
        cfg = self.config
        hardware = {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        }
        backoff = BackoffPolicy(cfg.retry_base_s, cfg.retry_max_s)
        attempt = 0
        while True:
            try:
                client.ensure_enrolled(cfg.camera_id, cfg.enroll_token, agent_version(), hardware)
                return
            except GatewayUnavailable as exc:
                # the gateway's Retry-After (a flood's 429; bounded by parse_retry_after) when
                # it asks for longer than our own backoff
                delay = max(backoff.delay(attempt), exc.retry_after or 0.0)
                attempt += 1
                logger.warning("%s; retrying in %.1fs", exc, delay)
                if self._stop.wait(delay):
                    raise

    def _make_updater(self, slot: ModelSlot) -> ModelUpdater | None:
        """The model updater, or None (logged) when updates are off or no key is pinned."""
        cfg = self.config
        if cfg.update_interval_s <= 0:
            logger.info("model updates disabled (update interval 0)")
            return None
        ident = self.client.identity
        key_text = cfg.model_public_key or (ident.model_public_key if ident else None)
        if not key_text:
            logger.warning(
                "model updates disabled: no model public key (pass --model-public-key, or "
                "enroll with a gateway that hands one out)"
            )
            return None
        try:
            verifier = ManifestVerifier(load_public_key(key_text))
        except PublicKeyError as exc:
            if cfg.model_public_key:
                raise
            logger.error(
                "model updates disabled: the key pinned at enrollment is unusable: %s", exc
            )
            return None
        logger.info(
            "model updates on: manifest every %gs, key_id %s (%s)",
            cfg.update_interval_s,
            verifier.key_id,
            "--model-public-key" if cfg.model_public_key else "pinned at enrollment",
        )
        limits = GuardLimits(
            latency_budget_ms=cfg.latency_budget_ms,
            max_error_rate=cfg.max_error_rate,
            bad_windows=cfg.rollback_after,
        )

        def factory(path: Path) -> OnnxDetector:
            return make_detector(cfg, path)

        updater = ModelUpdater(
            self.client,
            cfg.state_dir,
            slot,
            verifier,
            limits=limits,
            shadow_sample_rate=cfg.shadow_sample_rate,
            detector_factory=factory,
        )
        updater.restore()
        return updater

    # ------------------------------------------------------------------ run
    def run(self) -> AgentSummary:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        # Before any state is opened: a second agent on this state dir fails here, at once
        # (StateDirLocked), instead of reconciling away our spooled frames and rotating our
        # tokens. Held until run() returns; the kernel drops it if the process dies.
        with StateDirLock(cfg.state_dir):
            return self._run_locked()

    def _run_locked(self) -> AgentSummary:
        cfg = self.config
        self.outbox = Outbox(
            cfg.state_dir / "outbox",
            max_bytes=cfg.outbox_max_bytes,
            backoff=BackoffPolicy(cfg.retry_base_s, cfg.retry_max_s),
        )
        self.records = RecordOutbox(
            cfg.state_dir / "outbox",
            max_records=cfg.record_outbox_max,
            backoff=BackoffPolicy(cfg.retry_base_s, cfg.retry_max_s),
        )
        self.client = GatewayClient(cfg.gateway_url, cfg.state_dir, timeout_s=cfg.http_timeout_s)
        metrics = None
        if cfg.metrics_port is not None:
            from edge_agent.metrics import MetricsServer  # prometheus_client only when asked

            metrics = MetricsServer(self, cfg.metrics_port, cfg.metrics_host)
        try:
            return self._run()
        finally:
            if metrics is not None:
                metrics.close()
            self.client.close()
            self.outbox.close()
            self.records.close()

    def _run(self) -> AgentSummary:
        cfg = self.config
        detector = self._detector or make_detector(cfg, cfg.model_path)
        self.detector = detector
        if cfg.model_public_key:  # a bad explicit key is an input error: fail before anything
            load_public_key(cfg.model_public_key)
        source = open_source(cfg.source, realtime=cfg.realtime, loop=cfg.loop,
                             image_fps=cfg.image_fps)
        self._enroll(self.client)
        device_id = self.client.identity.device_id if self.client.identity else ""
        self.slot = ModelSlot(detector)
        self.updater = self._make_updater(self.slot)
        detector = self.slot.detector  # the updater may have restored the last run's model
        model_version = self.slot.sha256
        self.telemetry = TelemetryWindow(cfg.camera_id, model_version, detector.class_names)
        self.camera_config = CameraConfigChannel(
            cfg.camera_id, cfg.state_dir, base_rate=cfg.sampler.base_rate,
            hourly_budget=cfg.sampler.hourly_budget)
        self.camera_config.load()
        self._load_redactor()
        # Once before the first frame: a camera's geometry and rates are in force from its
        # first frame, not only after the first heartbeat (a failure keeps the kept file's).
        self._poll_camera_config()
        self.redaction_gaps()  # logs what sampled frames will show unredacted, if anything
        checkpoint = cfg.state_dir / CHECKPOINT_FILE
        self.traffic = (TrafficStage(cfg.camera_id, checkpoint_path=checkpoint)
                        if cfg.traffic else None)
        pipeline = FramePipeline(self.slot, capacity=cfg.capacity, sampler_config=cfg.sampler,
                                 sampling=self.camera_config.effective_sampling,
                                 traffic=self.traffic,
                                 geometry=self.camera_config.traffic_geometry)
        summary = AgentSummary(cfg.camera_id, device_id, model_version, stopped_by="end_of_source")
        self.summary = summary
        summary.redaction_error = self.redaction_error
        left = TrafficStage.recover_checkpoint(checkpoint)
        if left is not None:  # the last run crashed: keep its counts up to its checkpoint
            logger.warning("queueing the traffic counts a crashed run left (%s, %s s watched)",
                           left["record_id"], left.get("covered_s"))
            self._queue_records([left])
            checkpoint.unlink(missing_ok=True)
        logger.info(
            "camera %s: %s → %s with %s (sha256 %s…), state in %s",
            cfg.camera_id,
            source.describe(),
            cfg.gateway_url,
            detector.model_path.name,
            model_version[:12],
            cfg.state_dir,
        )

        reader = LatestFrameReader(source).start()
        uploader = threading.Thread(target=self._upload_loop, name="uploader", daemon=True)
        heartbeats = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        uploader.start()
        heartbeats.start()
        if self.updater is not None:
            self.updater.start(cfg.update_interval_s)
        self._status = StatusLine(self, cfg.status_interval_s or (1.0 if self._is_tty else 10.0))
        try:
            stopped_by = self._frame_loop(reader, pipeline, summary)
            if stopped_by is not None:
                summary.stopped_by = stopped_by
        finally:
            reader.stop()
            if self.updater is not None:
                self.updater.stop(cfg.http_timeout_s + 5)
            summary.frames_dropped = reader.dropped
            summary.source_read_errors = source.stats.read_errors
            if (summary.stopped_by == "end_of_source" and summary.frames_processed == 0
                    and source.stats.read_errors):  # nothing in it could be read
                summary.stopped_by = "source_error"
            if self.traffic is not None:  # the interval in progress, as a partial record
                self._queue_records(self.traffic.close())
                self.traffic.clear_checkpoint()
            self._drain()
            self._uploads_stop.set()
            self._wake_uploader.set()
            uploader.join(cfg.http_timeout_s + 5)
            self._hb_stop.set()
            heartbeats.join(cfg.http_timeout_s + 5)
            try:  # the last word to the fleet; a failure here must not make run() raise
                self._send_heartbeat(final=True)
            except Exception as exc:  # noqa: BLE001 - the agent is stopping anyway
                self.telemetry.record_error()
                logger.error("final heartbeat failed: %s: %s", type(exc).__name__, exc)
            self._status.finish()
        summary.outbox_depth = self.outbox.depth()
        summary.traffic_records_left = self.records.depth()
        if self.traffic is not None:
            summary.traffic_crossings = self.traffic.crossings_total
            summary.traffic_events = self.traffic.events_total
        summary.outbox_evicted_total = self.outbox.evicted_total
        summary.errors = self.telemetry.errors_total
        summary.final_model_version = self.slot.sha256
        summary.update_status = self.updater.status if self.updater is not None else "disabled"
        logger.info(
            "agent stopped (%s): %s",
            summary.stopped_by,
            {k: v for k, v in summary.to_dict().items() if k != "sampled_frame_ids"},
        )
        return summary

    def _frame_loop(self, reader: LatestFrameReader, pipeline: FramePipeline,
                    summary: AgentSummary) -> str | None:
        """Frames until a stop, the end of the source or ``max_frames``; returns why it
        stopped (None: the source ended cleanly).

        With ``inference_workers`` > 1 the loop keeps that many frames in flight on
        ``FrameWorkers`` and finishes them oldest first; it never waits for the reader while
        a measured frame is ready, and a stop still finishes the frames already measured.
        """
        cfg = self.config
        pool = (FrameWorkers(pipeline.measure, cfg.inference_workers)
                if cfg.inference_workers > 1 else None)
        seen_dropped = 0
        # A tenth of the period as slack: a 25 fps source capped at 5 keeps every 5th frame,
        # not every 6th, when frame times jitter around 0.2 s. A clock that goes back (a
        # looped file restarting) takes the frame and starts over.
        min_gap = 0.9 / cfg.max_fps if cfg.max_fps else 0.0
        last_taken: float | None = None
        try:
            while not self._stop.is_set():
                in_flight = len(pool) if pool is not None else 0
                if pool is not None and (pool.full or pool.oldest_done()):
                    self._finish(pipeline, pool.pop(), summary)
                    continue
                if cfg.max_frames is not None \
                        and summary.frames_processed + in_flight >= cfg.max_frames:
                    if in_flight:  # enough frames taken: finish those in flight
                        self._finish(pipeline, pool.pop(), summary)
                        continue
                    return "max_frames"
                frame = reader.get(timeout=0.0 if in_flight else 0.25)
                dropped = reader.dropped
                if dropped > seen_dropped:
                    self.telemetry.record_dropped(dropped - seen_dropped)
                    seen_dropped = dropped
                self._status.maybe_print()
                if frame is None:
                    if in_flight:  # nothing new yet: finish the oldest meanwhile
                        self._finish(pipeline, pool.pop(), summary)
                        continue
                    if reader.exhausted:
                        if reader.error is not None:
                            self.telemetry.record_error()
                            return "source_error"
                        return None
                    continue
                if min_gap > 0:
                    t = frame.stream_time
                    if last_taken is not None and last_taken <= t < last_taken + min_gap:
                        summary.frames_skipped += 1
                        continue
                    last_taken = t
                if pool is None:
                    self._process(pipeline, frame, summary)
                else:
                    pool.submit(frame)
            return "signal"
        finally:
            if pool is not None:
                while len(pool):  # measured frames are counted, not lost
                    self._finish(pipeline, pool.pop(), summary)
                pool.close()

    def _frame_failed(self, pipeline: FramePipeline, frame: Frame, exc: BaseException) -> None:
        if not isinstance(exc, DetectFailed):  # the frame or a later stage, not the model:
            # not charged to the serving model: neither its rollback guard nor the heartbeat's
            # ``errors`` (the model's error rate the gateway's rollout health reads)
            self.telemetry.record_error()
            logger.error("frame %s: processing failed: %s", frame.source_ref, exc)
            return
        self.telemetry.record_frame_error()
        if self.updater is not None:
            self.updater.observe_error(exc.model)
        logger.error("frame %s: detector failed: %s", frame.source_ref, exc)

    def _finish(self, pipeline: FramePipeline, measured: Measured[FrameMeasurement],
                summary: AgentSummary) -> None:
        if measured.error is not None:
            self._frame_failed(pipeline, measured.frame, measured.error)
            return
        try:
            result = pipeline.finish(measured.frame, measured.measurement)
        except Exception as exc:  # noqa: BLE001 - a bad frame must not stop the camera
            self._frame_failed(pipeline, measured.frame, exc)
            return
        self._handle_result(result, summary)

    def _process(self, pipeline: FramePipeline, frame: Frame, summary: AgentSummary) -> None:
        try:
            result = pipeline.process(frame)
        except Exception as exc:  # noqa: BLE001 - a bad frame must not stop the camera
            self._frame_failed(pipeline, frame, exc)
            return
        self._handle_result(result, summary)

    def _handle_result(self, result: FrameResult, summary: AgentSummary) -> None:
        """Telemetry, the updater's observations and (when sampled) the redacted upload."""
        frame = result.frame
        summary.frames_processed += 1
        self._queue_records(result.traffic_records)
        t = result.timings_ms
        model_version = result.model.sha256 if result.model else self.slot.sha256
        if self.updater is not None and result.model is not None:
            self.updater.observe_frame(result.model, t["detect_ms"], result.detections, frame.image)
        self.telemetry.record_frame(
            latency_ms=t["detect_ms"],
            inference_ms=t["inference_ms"],
            class_counts=result.class_counts,
            confidences=[d.confidence for d in result.detections],
            brightness=result.brightness,
            sharpness=result.sharpness,
            occupancy=result.occupancy,
            density_state=result.density.label,
            frame_size=(frame.image.shape[1], frame.image.shape[0]),
        )
        if not result.decision.sampled or result.frame_id is None:
            return
        frame_id = result.frame_id
        # Privacy: the pixels are redacted in memory; only the redacted frame is encoded.
        redacted = self._redact(result, summary)
        if redacted is None:
            return
        image, redaction_record = redacted
        ok, buf = cv2.imencode(
            ".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), self.config.jpeg_quality]
        )
        if not ok:
            self.telemetry.record_error()
            logger.error("frame %s: JPEG encoding failed", frame.source_ref)
            return
        meta = frame_metadata(
            result, frame_id=frame_id, camera_id=self.config.camera_id, model_version=model_version
        )
        meta["redaction"] = redaction_record
        try:
            put = self.outbox.put(frame_id, buf.tobytes(), meta, result.decision.importance)
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the camera
            self.telemetry.record_error()
            logger.error("frame %s: cannot queue it in the outbox: %s", frame_id, exc)
            return
        summary.frames_sampled += 1
        summary.sampled_frame_ids.append(frame_id)
        if len(summary.sampled_frame_ids) > MAX_SUMMARY_IDS:  # a 24/7 agent must not grow
            del summary.sampled_frame_ids[:-MAX_SUMMARY_IDS]
        self.telemetry.record_sampled()
        if put.queued:
            self._wake_uploader.set()

    def _load_redactor(self) -> None:
        """The redaction models; a failure is kept, and until they load no sampled frame is
        queued and no queued frame is uploaded (retried after each heartbeat)."""
        src = self._redactor_source
        was_failing = self.redaction_error is not None
        try:
            if isinstance(src, Redactor):
                self.redactor = src
            elif src is not None:
                self.redactor = src()
            else:
                self.redactor = load_redactor(self.config.redaction_faces,
                                              self.config.redaction_plates)
            self.redaction_error = None
        except Exception as exc:  # any failure fails closed and never escapes
            # RedactionUnavailable, OSError and ValueError are the expected ones; anything else
            # a factory raises (an ImportError, a broken model file) is reported alike, since
            # it would otherwise end the heartbeat thread that retries it.
            expected = isinstance(exc, (RedactionUnavailable, OSError, ValueError))
            why = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            self.redactor, self.redaction_error = None, f"redaction unavailable: {why}"
            if not was_failing:
                logger.error("%s; no frame is queued or uploaded until it loads (retried "
                             "after each heartbeat)", self.redaction_error,
                             exc_info=None if expected else exc)
        if was_failing and self.redactor is not None:
            logger.warning("redaction models loaded: frames are queued and uploaded again")
            self._wake_uploader.set()
        if self.summary is not None:
            self.summary.redaction_error = self.redaction_error

    def _privacy_mode(self) -> str:
        return (self.camera_config.privacy_mode() if self.camera_config is not None
                else "blur")

    def _serving_class_names(self) -> list[str] | None:
        """The serving model's class names (None when it cannot be told): what redaction
        can see of people depends on them, and a rollout may swap the model."""
        slot = getattr(self, "slot", None)
        names = getattr(getattr(slot, "detector", None), "class_names", None)
        return list(names) if names is not None else None

    def redaction_gaps(self) -> list[str] | None:
        """The kinds sampled frames are uploaded with unredacted (``Redactor.gaps`` for the
        serving model); [] with privacy mode off (nothing is meant to be redacted); None while
        no redactor is loaded (``redaction_error``) or the serving model is unknown. A change
        is logged as a WARNING, so a rollout that swaps in a model without a person class
        leaves a trace in the log as well as in the heartbeats."""
        names = self._serving_class_names()
        if self._privacy_mode() == "off":
            gaps: list[str] | None = []
        elif self.redactor is None or names is None:
            gaps = None
        else:
            gaps = self.redactor.gaps(names)
        if gaps and gaps != self._logged_gaps:
            logger.warning("redaction cannot remove %s (serving model classes %s): sampled "
                           "frames are uploaded with them unredacted (docs/privacy.md)",
                           ", ".join(gaps), names)
        if gaps is not None:
            self._logged_gaps = gaps
        return gaps

    def frames_blocked(self) -> bool:
        """True while a camera that must redact has no redactor: frames neither queued nor
        uploaded (the queue holds frames redacted before; they wait). Traffic records
        carry no pixels and still go."""
        return self.redactor is None and self._privacy_mode() != "off"

    def _redact(self, result: FrameResult, summary: AgentSummary
                ) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The frame's pixels as they may leave (and the record), or None: withheld."""
        mode = self._privacy_mode()
        if mode != "off" and self.redactor is None:
            summary.frames_withheld += 1
            summary.redaction_error = self.redaction_error
            return None
        try:
            if self.redactor is None:  # mode off, no models: nothing to run
                return result.frame.image, {"method": "off", "version": "", "counts": {},
                                            "area_share": 0.0}
            model = result.model.detector if result.model is not None else None
            names = getattr(model, "class_names", None)  # the model that served this frame
            if names is None:
                names = self._serving_class_names()
            done = self.redactor.redact(result.frame.image, result.detections, mode,
                                        class_names=names)
        except Exception as exc:  # noqa: BLE001 - never queue the unredacted frame
            summary.frames_withheld += 1
            self.telemetry.record_error()
            logger.error("frame %s: redaction failed, frame withheld: %s",
                         result.frame.source_ref, exc)
            return None
        return done.image, done.record

    def _queue_records(self, records: list[dict[str, Any]]) -> None:
        """Traffic interval records into the durable record outbox (before anything is sent)."""
        for record in records:
            try:
                if self.records.put(record["record_id"], record) and self.summary is not None:
                    self.summary.traffic_records_queued += 1
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the camera
                self.telemetry.record_error()
                logger.error("traffic record %s not queued: %s", record.get("record_id"), exc)
        if records:
            self._wake_uploader.set()

    # ------------------------------------------------------------------ uploads
    def _send_records(self) -> float | None:
        """Send the due traffic records (small, first); the pause to take when the gateway
        failed one, else None."""
        for item in self.records.due(limit=32):
            if self._uploads_stop.is_set():
                return None
            outcome = self.client.post_traffic_interval(item.body)
            if outcome.acknowledged:
                self.records.ack(item.record_id, duplicate=outcome.kind == "duplicate")
                if self.summary is not None:
                    self.summary.traffic_records_sent += 1
            elif outcome.kind == "retry":
                self.records.fail(item.record_id, outcome.detail,
                                  retry_after=outcome.retry_after)
                logger.warning("traffic record %s not delivered (%s %s); %d queued",
                               item.record_id, outcome.status_code or "network",
                               outcome.detail[:200], self.records.depth())
                return max(self.records.backoff.delay(item.attempts), outcome.retry_after or 0)
            else:
                self.records.reject(item.record_id, f"{outcome.status_code}: {outcome.detail}")
                self.telemetry.record_error()
        return None

    def _upload_loop(self) -> None:
        """The uploader thread: rounds of ``_upload_round`` until stopped. It must outlive any
        answer and any bug (as the heartbeat loop does): a round that raises is logged and
        retried after the outbox's backoff, growing while rounds keep failing."""
        self.frame_uploader = uploader = FrameUploader(
            self.client, self.outbox, batch_max=self.config.upload_batch_max,
            events=AgentUploadEvents(self), kill_after_acks=self._kill_after)
        # The pause is kept on the monotonic clock: a wall clock stepped back during it (NTP
        # after a boot with a wrong RTC) must not hold every upload for the step's length.
        pause_until = 0.0  # time.monotonic()
        failures = 0  # rounds in a row that raised
        while not self._uploads_stop.is_set():
            left = pause_until - time.monotonic()
            if left > 0:
                self._wake_uploader.wait(min(left, 0.5))
                self._wake_uploader.clear()
                continue
            try:
                pause = self._upload_round(uploader, time.time())
                failures = 0
            except Exception as exc:  # the uploader thread must never die
                pause = self.outbox.backoff.ceiling(failures)
                failures += 1
                with contextlib.suppress(Exception):
                    self.telemetry.record_error()
                logger.error("upload round failed (%s: %s); retrying in %.1fs",
                             type(exc).__name__, str(exc)[:300], pause, exc_info=failures == 1)
            if pause is not None:
                pause = bounded_retry_after(pause)  # never inf, never years
                pause_until = time.monotonic() + pause

    def _upload_round(self, uploader: FrameUploader, now: float) -> float | None:
        """One pass of the uploader: due traffic records, then due frames. Returns the pause
        to take before the next pass (a transient failure), or None (it waited itself)."""
        pause = self._send_records()
        if pause is not None:
            return pause
        limit = max(self.config.upload_batch_max, 16)
        items = [] if self.frames_blocked() else self.outbox.due(now, limit=limit)
        if not items:
            next_due = min((t for t in (self.outbox.next_due_at(),
                                        self.records.next_due_at()) if t is not None),
                           default=None)
            wait = 0.5 if next_due is None else min(max(next_due - now, 0.01), 0.5)
            self._wake_uploader.wait(wait)
            self._wake_uploader.clear()
            return None
        hold = 0.0 if self._draining.is_set() else linger_wait(
            items, self.config.upload_batch_max, self.config.upload_linger_s, now)
        if hold > 0:  # more frames may join this batch; the drain at exit sends at once
            self._wake_uploader.wait(min(hold, 0.5))
            self._wake_uploader.clear()
            return None
        return uploader.upload(items, stop=self._uploads_stop.is_set)

    def _drain(self) -> None:
        """Give the uploader ``drain_timeout_s`` to empty the outbox (skipped when forced)."""
        self._draining.set()
        if self._force.is_set():
            return
        deadline = time.monotonic() + self.config.drain_timeout_s

        def pending() -> int:  # frames cannot go while redaction is unavailable
            return (0 if self.frames_blocked() else self.outbox.depth()) + self.records.depth()

        depth = pending()
        if depth:
            logger.info(
                "draining %d queued frame(s) (up to %.0fs)", depth, self.config.drain_timeout_s
            )
        while depth and time.monotonic() < deadline and not self._force.is_set():
            self._wake_uploader.set()
            self._force.wait(0.1)
            self._status.maybe_print()
            depth = pending()
        if depth:
            logger.warning("%d frame(s) and %d traffic record(s) left in the outbox; they are "
                           "sent on the next start", self.outbox.depth(), self.records.depth())

    # ------------------------------------------------------------------ heartbeats
    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(self.config.heartbeat_interval_s):
            try:
                self._send_heartbeat()
            except Exception as exc:  # noqa: BLE001 - telemetry must never stop the agent
                logger.error("heartbeat failed: %s", exc)
            self._poll_camera_config()
            if self.frames_blocked():
                try:  # _load_redactor catches everything; this loop must outlive any bug
                    self._load_redactor()
                except Exception as exc:  # noqa: BLE001 - heartbeats must keep going
                    self.redactor = None
                    self.redaction_error = f"redaction unavailable: {type(exc).__name__}: {exc}"
                    logger.error("%s", self.redaction_error)

    def _poll_camera_config(self) -> None:
        """The camera's configuration, after each heartbeat (a 304 when unchanged)."""
        if self.camera_config is None:
            return
        try:
            self.camera_config.poll(self.client)
        except GatewayError as exc:
            logger.warning("camera configuration not polled: %s", exc)
        except Exception as exc:  # noqa: BLE001 - configuration must never stop the agent
            logger.error("camera configuration poll failed: %s", exc)

    def _send_heartbeat(self, final: bool = False) -> None:
        with self._hb_lock:
            ident = self.client.identity
            rollout = None
            if self.updater is not None:
                try:
                    rollout = self.updater.heartbeat_fields()  # may roll back a bad model
                except Exception as exc:  # noqa: BLE001 - telemetry must never stop the agent
                    logger.error("rollout status unavailable: %s", exc)
            records = getattr(self, "records", None)
            hb = self.telemetry.build(
                outbox_depth=self.outbox.depth(),
                outbox_bytes=self.outbox.total_bytes(),
                outbox_evicted_total=self.outbox.evicted_total,
                # traffic records dropped from the full record outbox: holes in the counts
                record_outbox_depth=records.depth() if records is not None else None,
                record_outbox_evicted_total=(records.counter("evicted")
                                             if records is not None else None),
                device_id=ident.device_id if ident else "",
                agent_version=agent_version(),
                model_version=self.slot.sha256,
                rollout=rollout,
                camera_config=(self.camera_config.heartbeat_fields()
                               if self.camera_config is not None else None),
            )
            payload = hb.to_dict()
            payload["redaction_error"] = self.redaction_error  # why nothing is uploaded
            try:  # what uploaded frames show unredacted (e.g. plates on OpenCV 5)
                payload["redaction_gaps"] = self.redaction_gaps()
            except Exception as exc:  # noqa: BLE001 - telemetry must never stop the agent
                logger.error("redaction coverage unavailable: %s", exc)
                payload["redaction_gaps"] = None
            payload["frames_withheld"] = self.summary.frames_withheld if self.summary else 0
            # the geometry in force does not fit the stream: counting is off (traffic.stage)
            payload["traffic_error"] = self.traffic.error if self.traffic is not None else None
            self._pending_heartbeats.append(json.dumps(payload, separators=(",", ":"),
                                                       allow_nan=False))
            while self._pending_heartbeats:
                outcome = self.client.post_heartbeat(self._pending_heartbeats[0])
                if outcome.acknowledged:
                    self._pending_heartbeats.popleft()
                    if self.summary is not None:
                        self.summary.heartbeats_sent += 1
                elif outcome.kind == "rejected":
                    logger.error("heartbeat rejected (%s): %s", outcome.status_code, outcome.detail)
                    self._pending_heartbeats.popleft()
                    self.telemetry.record_error()
                else:
                    logger.warning(
                        "heartbeat not delivered (%s); %d kept for later%s",
                        outcome.detail[:200],
                        len(self._pending_heartbeats),
                        " and lost at exit" if final else "",
                    )
                    break


__all__ = [
    "AGENT_SESSION_CONFIG",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_NAMES",
    "AgentConfig",
    "AgentSummary",
    "AuthError",
    "EdgeAgent",
    "EnrollmentError",
    "FramePipeline",
    "FrameResult",
    "GatewayError",
    "agent_version",
    "find_default_model",
    "frame_metadata",
    "frame_quality",
    "make_detector",
]
