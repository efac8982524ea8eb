"""Agent heartbeats: the versioned telemetry record every camera posts to the gateway.

A heartbeat summarises one *window* (``heartbeat_interval_s``, 30 s by default) of the
agent's work. These fields are the drift features the platform monitors, so the schema is
versioned: a change that renames, removes or re-means a field bumps
``HEARTBEAT_SCHEMA_VERSION``; adding a field does not (readers ignore unknown fields).

Schema version 2 (``Heartbeat.to_json()``; times are ISO 8601 UTC strings). Version 2
narrowed ``errors`` to frames the detector failed on, counted among ``frames_processed`` (the
gateway refuses ``errors > frames_processed``); the other failures moved to ``other_errors``.

================================  ===========================================================
field                             meaning
================================  ===========================================================
schema_version                    ``2``.
device_id, camera_id              who sent it (``device_id`` from enrollment).
agent_version                     edge agent package version.
model_version                     SHA-256 of the ONNX file that produced the detections.
sent_at                           when the heartbeat was built (the gateway de-duplicates
                                  re-sends of one heartbeat on it).
window_start, window_end          the window the statistics cover; ``window_s`` its length.
window_s                          window length, seconds.
frames_processed                  frames run through the detector in the window, including
                                  those it failed on (``errors``).
fps                               ``frames_processed / window_s``.
latency_p50_ms, latency_p95_ms    detector latency per frame (letterbox + ONNX run + NMS),
                                  ms; ``null`` when no frame was processed.
inference_p50_ms                  the ONNX run alone, median, ms (``null`` when no frame).
errors                            frames the detector failed on in the window
                                  (``<= frames_processed``).
other_errors                      other failures in the window: an unreadable source, JPEG
                                  encoding or outbox failures, rejected uploads or heartbeats,
                                  a frame that failed outside the detector.
errors_total                      ``errors + other_errors`` since the agent started.
dropped_frames                    frames the reader replaced before inference took them (the
                                  detector fell behind a live or realtime source).
dropped_frames_total              the same since the agent started.
detections                        boxes detected in the window (all classes).
class_counts                      ``{class_name: boxes}`` in the window, every model class.
detections_per_frame              mean boxes per frame the detector finished (``null`` when
                                  none).
confidence_histogram              ``{"bin_edges": [0.0, 0.1, …, 1.0], "counts": [10 ints]}``:
                                  box confidences in the window; fixed bins, the last one
                                  includes 1.0.
brightness_mean, brightness_std   mean / std over the window's frames of each frame's mean
                                  grey level (0–255).
sharpness_mean, sharpness_std     mean / std of each frame's variance of the Laplacian (grey,
                                  native resolution: compare within one camera).
brightness_histogram              ``{"bin_edges": [0, 16, …, 256], "counts": [16 ints]}``:
                                  each finished frame's mean grey level (the value
                                  ``brightness_mean`` averages).
sharpness_histogram               ``{"bin_edges": [0.0, 0.25, …, 5.0], "counts": [20 ints]}``:
                                  each finished frame's ``log10(1 + variance of the
                                  Laplacian)`` (``sharpness_mean``'s value, log-scaled: it
                                  spans decades).
detections_histogram              ``{"bin_edges": [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25,
                                  32, 40, 50, 64, 80, 100], "counts": [18 ints]}``: boxes per
                                  finished frame; bin i holds ``[edge_i, edge_i+1)``.
density_state                     ``normal | warning | heavy | jam`` at the end of the window.
occupancy_mean                    mean of detections / capacity over the window's frames.
frames_sampled                    frames the samplers queued for upload in the window.
uploads_ok                        frames the gateway acknowledged (201 or 409) in the window.
upload_failures                   failed upload attempts in the window (retried later).
outbox_depth, outbox_bytes        frames (and their bytes) waiting in the outbox now.
outbox_evicted_total              frames evicted from the full outbox since it was created.
record_outbox_depth               traffic interval records waiting in the record outbox now
                                  (``null`` without one; added without a version change).
record_outbox_evicted_total       traffic records dropped (oldest first) from the full record
                                  outbox since it was created: counts lost for good.
last_upload_at                    time of the last acknowledged upload (``null`` if none).
frame_width, frame_height         pixel size of the newest frame the detector took (``null``
                                  before the first one; added without a version change): the
                                  gateway picks the model input shape that fits the camera.
traffic_error                     ``{version, reason}`` while the traffic geometry in force
                                  was drawn for a view of another shape than the stream
                                  (``edge_agent.traffic.stage.geometry_misfit``): counting is
                                  off; ``null`` otherwise (added by the agent loop, no
                                  version change).
redaction_gaps                    kinds of ``edge_agent.redaction.REDACTION_KINDS`` (``person``,
                                  ``face``, ``plate``) the camera's redaction cannot remove:
                                  sampled frames are uploaded with them unredacted (e.g.
                                  ``["person", "plate"]``: a serving model without a person
                                  class, no plate detector on OpenCV 5); ``[]`` when all are
                                  covered or the privacy mode is ``off``; ``null`` while no
                                  redactor is loaded (``redaction_error`` says why). Added by
                                  the agent loop, no version change.
================================  ===========================================================

The three frame-level histograms (drift monitoring compares distributions, not just window
means) have fixed bins (module constants ``*_BIN_EDGES``): the last bin includes its right
edge, a value beyond it counts in the last bin and one below the first edge in the first; a
non-finite value is not counted. Their counts sum to the frames the detector finished
(``frames_processed - errors``) and are all zero in a window without one. Adding them did not
change the schema version (readers ignore unknown fields).

Optional rollout fields (schema 1 and 2: absent or ``null`` on agents without model updates;
``edge_agent.updater`` documents the states). ``model_version`` above stays the SHA-256 of the
model serving at the end of the window — a rollout's manifest carries the same ``sha256``.

================================  ===========================================================
update_status                     ``idle | downloading | retrying | shadow | serving |
                                  rolled_back | rejected``: the updater's state
                                  (``retrying``: a refusal tried again on the next poll;
                                  ``rejected``/``rolled_back`` are final).
update_reason                     why it is ``retrying`` / ``rejected`` / ``rolled_back`` (or
                                  why it went back to the previous model), else ``null``.
rollout_id                        the rollout ``update_status`` refers to.
serving_model_version             the manifest's ``model_version`` label of the serving model
                                  (``null`` for the model the agent was started with).
shadow                            while a candidate runs in shadow mode, its window:
                                  ``{model_version (candidate sha256), manifest_model_version,
                                  agreement_f1 (matched-box F1 vs the serving model, IoU ≥ 0.5,
                                  same class; null without a finished frame), frames,
                                  frames_total, latency_p95_ms, serving_latency_p95_ms, tp,
                                  fp, fn, errors (frames the candidate failed on, counted in
                                  frames), skipped, sample_rate}``; else ``null``.
================================  ===========================================================

Camera configuration fields (schema 2, added without a version change; the gateway's
``/v1/cameras/{camera_id}/config`` document as this agent applied it,
``edge_agent.camera_config``):

================================  ===========================================================
config_version                    version of the configuration document in force (``0``:
                                  none applied).
config_error                      ``{version, reason}`` of the last document the agent
                                  rejected (the one before it stays in force); ``null`` once a
                                  later document applies, or when none was rejected.
sampling_base_rate                the base rate in force now (the document's, else the
                                  agent's own; times a boost's factor while it lasts, at
                                  most 1).
sampling_hourly_budget            the hourly budget in force now (likewise; ``null``: none).
sampling_boost_until              end of the boost in force (ISO 8601 UTC), ``null`` when no
                                  boost is in force (none set, or it ended).
privacy_mode                      the redaction method in force: ``blur`` (the default),
                                  ``mask`` or ``off`` (``null`` from agents before it).
================================  ===========================================================
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

HEARTBEAT_SCHEMA_VERSION = 2
_ROLLOUT_FIELDS = frozenset(
    {"update_status", "update_reason", "rollout_id", "serving_model_version", "shadow"}
)
_CONFIG_FIELDS = frozenset({"config_version", "config_error", "sampling_base_rate",
                            "sampling_hourly_budget", "sampling_boost_until", "privacy_mode"})
CONFIDENCE_BIN_EDGES: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
# Per-frame distributions (see the module docstring): mean grey level, log10(1 + variance of
# the Laplacian), boxes per frame (finer where most frames are, coarser in the crowded tail).
BRIGHTNESS_BIN_EDGES: tuple[int, ...] = tuple(range(0, 257, 16))
SHARPNESS_BIN_EDGES: tuple[float, ...] = tuple(i / 4 for i in range(21))
DETECTIONS_BIN_EDGES: tuple[int, ...] = (
    0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 64, 80, 100,
)


def utc_iso(ts: float | None) -> str | None:
    """Unix time → ISO 8601 UTC string (``None`` stays ``None``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass
class Heartbeat:
    """One heartbeat (schema version 1); see the module docstring for every field."""

    camera_id: str
    model_version: str
    window_start: str
    window_end: str
    window_s: float
    frames_processed: int
    fps: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    inference_p50_ms: float | None
    errors: int
    errors_total: int
    dropped_frames: int
    dropped_frames_total: int
    detections: int
    class_counts: dict[str, int]
    detections_per_frame: float | None
    confidence_histogram: dict[str, list]
    brightness_histogram: dict[str, list]
    sharpness_histogram: dict[str, list]
    detections_histogram: dict[str, list]
    brightness_mean: float | None
    brightness_std: float | None
    sharpness_mean: float | None
    sharpness_std: float | None
    density_state: str
    occupancy_mean: float | None
    frames_sampled: int
    uploads_ok: int
    upload_failures: int
    outbox_depth: int
    outbox_bytes: int
    outbox_evicted_total: int
    last_upload_at: str | None
    other_errors: int = 0
    device_id: str = ""
    agent_version: str = ""
    sent_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    schema_version: int = HEARTBEAT_SCHEMA_VERSION
    # optional rollout fields (schema 1; see the module docstring)
    update_status: str | None = None
    update_reason: str | None = None
    rollout_id: str | None = None
    serving_model_version: str | None = None
    shadow: dict[str, Any] | None = None
    # camera configuration fields (see the module docstring)
    config_version: int = 0
    config_error: dict[str, Any] | None = None
    sampling_base_rate: float | None = None
    sampling_hourly_budget: float | None = None
    sampling_boost_until: str | None = None
    privacy_mode: str | None = None  # blur | mask | off (edge_agent.camera_config)
    # the camera's frame size (see the module docstring)
    frame_width: int | None = None
    frame_height: int | None = None
    # the traffic record outbox (see the module docstring)
    record_outbox_depth: int | None = None
    record_outbox_evicted_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Over the finite values only: one broken measurement must not make the heartbeat
    unsendable (JSON has no NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return None, None
    return float(arr.mean()), float(arr.std())


def confidence_histogram(confidences: list[float] | np.ndarray) -> list[int]:
    """Counts of ``confidences`` in the fixed bins ``CONFIDENCE_BIN_EDGES`` (1.0 in the last)."""
    counts, _ = np.histogram(np.asarray(confidences, dtype=np.float64), bins=CONFIDENCE_BIN_EDGES)
    return [int(c) for c in counts]


def histogram_bin(value: float, edges: tuple[float, ...]) -> int | None:
    """The bin of ``value`` among fixed ``edges``: ``[edge_i, edge_i+1)``, the last bin closed;
    values outside are clipped into the first or last bin; ``None`` for a non-finite value."""
    if not math.isfinite(value):
        return None
    return min(max(bisect.bisect_right(edges, value) - 1, 0), len(edges) - 2)


def log_sharpness(laplacian_variance: float) -> float:
    """``log10(1 + variance of the Laplacian)``: the scale ``sharpness_histogram`` bins on."""
    return math.log10(1.0 + max(laplacian_variance, 0.0))


def _histogram_out(edges: tuple[float, ...], counts: list[int]) -> dict[str, list]:
    return {"bin_edges": list(edges), "counts": [int(c) for c in counts]}


# Upper bounds (ms) of the cumulative detector-latency histogram the agent exports
# (edge_agent.metrics); they bracket the alert thresholds (120 ms warn, 200 ms critical).
INFERENCE_BUCKETS_MS = (5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0, 160.0, 200.0, 300.0,
                        500.0, 1000.0)


class TelemetryWindow:
    """Accumulates per-frame statistics between heartbeats (thread-safe).

    The inference loop calls ``record_frame``/``record_frame_error``/``record_error``/…; the
    heartbeat thread calls ``build`` which returns a ``Heartbeat`` and starts the next window.
    """

    def __init__(self, camera_id: str, model_version: str, class_names: list[str]) -> None:
        self.camera_id = camera_id
        self.model_version = model_version
        self.class_names = list(class_names)
        self._lock = threading.Lock()
        self.errors_total = 0
        self.dropped_total = 0
        # Totals since start, for the agent's Prometheus endpoint (edge_agent.metrics).
        self.frames_total = 0
        self.uploads_ok_total = 0
        self.upload_failures_total = 0
        self.inference_buckets = [0] * (len(INFERENCE_BUCKETS_MS) + 1)  # last: +Inf
        self.inference_sum_ms = 0.0
        self.last_upload_at: float | None = None
        self.density_state = "normal"
        self.frame_size: tuple[int, int] | None = None  # (width, height) of the newest frame
        self._reset(time.time())

    def _reset(self, now: float) -> None:
        self._start = now
        self._latency: list[float] = []
        self._inference: list[float] = []
        self._brightness: list[float] = []
        self._sharpness: list[float] = []
        self._occupancy: list[float] = []
        self._hist = np.zeros(len(CONFIDENCE_BIN_EDGES) - 1, dtype=np.int64)
        self._brightness_hist = [0] * (len(BRIGHTNESS_BIN_EDGES) - 1)
        self._sharpness_hist = [0] * (len(SHARPNESS_BIN_EDGES) - 1)
        self._detections_hist = [0] * (len(DETECTIONS_BIN_EDGES) - 1)
        self._class_counts: dict[str, int] = {n: 0 for n in self.class_names}
        self._frames = 0
        self._detections = 0
        self._errors = 0
        self._other_errors = 0
        self._dropped = 0
        self._sampled = 0
        self._uploads_ok = 0
        self._upload_failures = 0

    # ---- recorders
    def record_frame(
        self,
        *,
        latency_ms: float,
        inference_ms: float,
        class_counts: dict[str, int],
        confidences: list[float],
        brightness: float,
        sharpness: float,
        occupancy: float,
        density_state: str,
        frame_size: tuple[int, int] | None = None,
    ) -> None:
        with self._lock:
            if frame_size is not None:
                self.frame_size = (int(frame_size[0]), int(frame_size[1]))
            self._frames += 1
            self.frames_total += 1
            self.inference_buckets[bisect.bisect_left(INFERENCE_BUCKETS_MS, inference_ms)] += 1
            self.inference_sum_ms += inference_ms
            self._latency.append(latency_ms)
            self._inference.append(inference_ms)
            self._brightness.append(brightness)
            self._sharpness.append(sharpness)
            self._occupancy.append(occupancy)
            boxes = 0
            for name, n in class_counts.items():
                self._class_counts[name] = self._class_counts.get(name, 0) + n
                boxes += n
            self._detections += boxes
            for hist, value, edges in (
                (self._brightness_hist, brightness, BRIGHTNESS_BIN_EDGES),
                (self._sharpness_hist, log_sharpness(sharpness), SHARPNESS_BIN_EDGES),
                (self._detections_hist, boxes, DETECTIONS_BIN_EDGES),
            ):
                i = histogram_bin(value, edges)
                if i is not None:
                    hist[i] += 1
            if confidences:
                self._hist += np.asarray(confidence_histogram(confidences), dtype=np.int64)
            self.density_state = density_state

    def record_frame_error(self) -> None:
        """The detector failed on a frame: it counts in ``frames_processed`` and ``errors``."""
        with self._lock:
            self._frames += 1
            self.frames_total += 1
            self._errors += 1
            self.errors_total += 1

    def record_error(self, n: int = 1) -> None:
        """A failure that is not a frame the detector ran on (``other_errors``)."""
        with self._lock:
            self._other_errors += n
            self.errors_total += n

    def record_dropped(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self._dropped += n
            self.dropped_total += n

    def record_sampled(self) -> None:
        with self._lock:
            self._sampled += 1

    def record_upload(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._uploads_ok += 1
                self.uploads_ok_total += 1
                self.last_upload_at = time.time()
            else:
                self._upload_failures += 1
                self.upload_failures_total += 1

    def window_fps(self, now: float | None = None) -> float:
        """Frames/s since the current window began (the heartbeat's fps, so far)."""
        with self._lock:
            elapsed = (time.time() if now is None else now) - self._start
            return self._frames / elapsed if elapsed > 0 else 0.0

    # ---- heartbeat
    def build(
        self,
        *,
        outbox_depth: int,
        outbox_bytes: int,
        outbox_evicted_total: int,
        record_outbox_depth: int | None = None,
        record_outbox_evicted_total: int | None = None,
        device_id: str = "",
        agent_version: str = "",
        now: float | None = None,
        model_version: str | None = None,
        rollout: dict[str, Any] | None = None,
        camera_config: dict[str, Any] | None = None,
    ) -> Heartbeat:
        """The heartbeat of the window that ends now; a new window starts.

        ``model_version`` replaces the one given at construction (the model changed);
        ``rollout`` supplies the optional rollout fields (``ModelUpdater.heartbeat_fields``),
        ``camera_config`` the configuration fields (``CameraConfigChannel.heartbeat_fields``).
        """
        now = time.time() if now is None else now
        with self._lock:
            if model_version is not None:
                self.model_version = model_version
            window_s = max(now - self._start, 1e-9)
            finished = self._frames - self._errors
            b_mean, b_std = _mean_std(self._brightness)
            s_mean, s_std = _mean_std(self._sharpness)
            hb = Heartbeat(
                camera_id=self.camera_id,
                model_version=self.model_version,
                window_start=utc_iso(self._start) or "",
                window_end=utc_iso(now) or "",
                window_s=round(window_s, 3),
                frames_processed=self._frames,
                fps=round(self._frames / window_s, 3),
                latency_p50_ms=_percentile(self._latency, 50),
                latency_p95_ms=_percentile(self._latency, 95),
                inference_p50_ms=_percentile(self._inference, 50),
                errors=self._errors,
                other_errors=self._other_errors,
                errors_total=self.errors_total,
                dropped_frames=self._dropped,
                dropped_frames_total=self.dropped_total,
                detections=self._detections,
                class_counts=dict(self._class_counts),
                detections_per_frame=(self._detections / finished) if finished else None,
                confidence_histogram={
                    "bin_edges": list(CONFIDENCE_BIN_EDGES),
                    "counts": [int(c) for c in self._hist],
                },
                brightness_histogram=_histogram_out(BRIGHTNESS_BIN_EDGES, self._brightness_hist),
                sharpness_histogram=_histogram_out(SHARPNESS_BIN_EDGES, self._sharpness_hist),
                detections_histogram=_histogram_out(DETECTIONS_BIN_EDGES, self._detections_hist),
                brightness_mean=b_mean,
                brightness_std=b_std,
                sharpness_mean=s_mean,
                sharpness_std=s_std,
                density_state=self.density_state,
                occupancy_mean=_mean_std(self._occupancy)[0],
                frames_sampled=self._sampled,
                uploads_ok=self._uploads_ok,
                upload_failures=self._upload_failures,
                outbox_depth=int(outbox_depth),
                outbox_bytes=int(outbox_bytes),
                outbox_evicted_total=int(outbox_evicted_total),
                last_upload_at=utc_iso(self.last_upload_at),
                device_id=device_id,
                agent_version=agent_version,
                sent_at=utc_iso(now) or "",
                frame_width=self.frame_size[0] if self.frame_size else None,
                frame_height=self.frame_size[1] if self.frame_size else None,
                record_outbox_depth=(None if record_outbox_depth is None
                                     else int(record_outbox_depth)),
                record_outbox_evicted_total=(None if record_outbox_evicted_total is None
                                             else int(record_outbox_evicted_total)),
            )
            self._reset(now)
        for key, value in (rollout or {}).items():
            if key in _ROLLOUT_FIELDS:
                setattr(hb, key, value)
        for key, value in (camera_config or {}).items():
            if key in _CONFIG_FIELDS:
                setattr(hb, key, value)
        for key in ("latency_p50_ms", "latency_p95_ms", "inference_p50_ms"):
            value = getattr(hb, key)
            if value is not None and not math.isfinite(value):
                setattr(hb, key, None)
        return hb
