"""Shadow mode: run a candidate model beside the serving one and measure how much they agree.

The candidate sees a deterministic share of the frames (``sample_rate``: 0.2 → every fifth
frame) *after* the serving model has produced the detections the agent uses; its own
detections are compared and thrown away — they never reach counts, samplers or uploads.

Agreement is the matched-box F1 between the two models on the same frames: candidate boxes
(most confident first) are greedily matched to the unmatched serving box of the same class
with the highest IoU, a match needing IoU ≥ 0.5. Matches are true positives, unmatched
candidate boxes false positives, unmatched serving boxes false negatives, pooled over the
window: ``F1 = 2·TP / (2·TP + FP + FN)`` (1.0 when neither model found anything). Latency is
the candidate's detect time (letterbox + ONNX run + NMS), reported as the window's P95.

By default the candidate runs on a worker thread with a tiny queue, so the serving loop never
waits for it; a frame offered while the worker is busy is skipped and counted (``skipped``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge_agent.boxes import box_iou

logger = logging.getLogger(__name__)

MATCH_IOU = 0.5


class _Box(Protocol):
    class_id: int
    class_name: str
    confidence: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]: ...


def _label(d: _Box) -> str | int:
    return d.class_name or d.class_id


def match_boxes(
    reference: Sequence[_Box], candidate: Sequence[_Box], iou_threshold: float = MATCH_IOU
) -> tuple[int, int, int]:
    """Greedy same-class matching → ``(tp, fp, fn)`` of ``candidate`` against ``reference``."""
    used = [False] * len(reference)
    tp = 0
    for cand in sorted(candidate, key=lambda d: -d.confidence):
        best, best_iou = -1, iou_threshold
        for i, ref in enumerate(reference):
            if used[i] or _label(ref) != _label(cand):
                continue
            iou = box_iou(ref.xyxy, cand.xyxy)
            if iou >= best_iou:
                best, best_iou = i, iou
        if best >= 0:
            used[best] = True
            tp += 1
    return tp, len(candidate) - tp, len(reference) - tp


def f1_score(tp: int, fp: int, fn: int) -> float:
    """Matched-box F1; two models that both found nothing agree perfectly (1.0)."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


@dataclass
class _Window:
    frames: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    errors: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.latencies: list[float] = []
        self.serving_latencies: list[float] = []


class ShadowRunner:
    """Runs ``detector`` on sampled frames beside the serving model; ``take_window()`` reports.

    ``detector`` needs ``detect(image) -> list[Detection]``. ``model_version`` names it in the
    report (the SHA-256 of its file); ``label`` is the manifest's ``model_version``.
    ``background=False`` runs the candidate inline in ``offer`` (tests, single-threaded use).
    ``delay_s`` adds an artificial per-frame delay (the fault-injection knob of the updater).
    """

    def __init__(
        self,
        detector: Any,
        *,
        model_version: str,
        label: str | None = None,
        sample_rate: float = 0.2,
        iou_threshold: float = MATCH_IOU,
        background: bool = True,
        queue_size: int = 2,
        delay_s: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"shadow sample_rate must be in (0, 1], got {sample_rate}")
        self.detector = detector
        self.model_version = model_version
        self.label = label
        self.sample_rate = float(sample_rate)
        self.iou_threshold = float(iou_threshold)
        self.delay_s = float(delay_s)
        self._clock = clock
        self._acc = 1.0 - self.sample_rate  # the first frame offered is sampled
        self._lock = threading.Lock()
        self._window = _Window()
        self.frames_total = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        if background:
            self._queue = queue.Queue(maxsize=max(1, queue_size))
            self._thread = threading.Thread(target=self._worker, name="shadow", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ feeding
    def _sampled(self) -> bool:
        self._acc += self.sample_rate
        if self._acc >= 1.0 - 1e-9:
            self._acc -= 1.0
            return True
        return False

    def offer(
        self, image: np.ndarray, serving: Sequence[_Box], serving_latency_ms: float | None = None
    ) -> bool:
        """Hand over one frame the serving model just processed; True when it was sampled."""
        if self._stopped.is_set() or not self._sampled():
            return False
        item = (image, list(serving), serving_latency_ms)
        if self._queue is None:
            self._run(*item)
            return True
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._window.skipped += 1
            return False
        return True

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._run(*item)
            finally:
                self._queue.task_done()

    def _run(
        self, image: np.ndarray, serving: list[_Box], serving_latency_ms: float | None
    ) -> None:
        t0 = self._clock()
        try:
            cand = self.detector.detect(image)
            if self.delay_s:
                time.sleep(self.delay_s)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is a finding, not a crash
            with self._lock:  # a frame the candidate failed on: counted, and as an error
                self._window.frames += 1
                self._window.errors += 1
                self.frames_total += 1
            logger.warning("shadow model %s failed on a frame: %s", self.model_version[:12], exc)
            return
        latency_ms = (self._clock() - t0) * 1e3
        tp, fp, fn = match_boxes(serving, cand, self.iou_threshold)
        with self._lock:
            w = self._window
            w.frames += 1
            w.tp, w.fp, w.fn = w.tp + tp, w.fp + fp, w.fn + fn
            w.latencies.append(latency_ms)
            if serving_latency_ms is not None:
                w.serving_latencies.append(serving_latency_ms)
            self.frames_total += 1

    # ------------------------------------------------------------------ reporting
    def take_window(self) -> dict[str, Any]:
        """The heartbeat ``shadow`` block for the window that ends now (a new one starts)."""
        with self._lock:
            w, self._window = self._window, _Window()
        p95 = float(np.percentile(w.latencies, 95)) if w.latencies else None
        serving_p95 = float(np.percentile(w.serving_latencies, 95)) if w.serving_latencies else None
        return {
            "model_version": self.model_version,
            "manifest_model_version": self.label,
            "agreement_f1": round(f1_score(w.tp, w.fp, w.fn), 6) if w.frames > w.errors else None,
            "frames": w.frames,
            "frames_total": self.frames_total,
            "latency_p95_ms": None if p95 is None else round(p95, 3),
            "serving_latency_p95_ms": None if serving_p95 is None else round(serving_p95, 3),
            "tp": w.tp,
            "fp": w.fp,
            "fn": w.fn,
            "errors": w.errors,
            "skipped": w.skipped,
            "sample_rate": self.sample_rate,
        }

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued frame was processed (tests); True when it got there."""
        if self._queue is None:
            return True
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking frames and end the worker (what is queued is dropped)."""
        self._stopped.set()
        if self._queue is not None and self._thread is not None:
            while True:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    break
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # pragma: no cover - emptied just above
                pass
            self._thread.join(timeout_s)


__all__ = ["MATCH_IOU", "ShadowRunner", "box_iou", "f1_score", "match_boxes"]
