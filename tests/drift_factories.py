"""Synthetic heartbeats (and frame embeddings) for the drift tests.

A :class:`Scene` is what a camera sees in a window — how bright and sharp its frames are, how
many boxes the model finds and how sure it is. :func:`heartbeat` draws one heartbeat's frames
from a scene and sums them into the fixed-bin histograms the drift features read
(``roadloop.monitoring.features``), with the other fields an agent sends
(``edge_agent.heartbeat``), so a payload passes the gateway's checks as well.
:class:`MemorySources` is a ``DriftSources`` (``roadloop.monitoring.monitor``) over such
heartbeats and per-frame embedding vectors held in memory.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from roadloop.monitoring.windows import heartbeat_time

BRIGHTNESS_EDGES = [float(x) for x in range(0, 257, 16)]
SHARPNESS_EDGES = [round(0.25 * i, 2) for i in range(21)]
DETECTIONS_EDGES = [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 64, 80, 100]
CONFIDENCE_EDGES = [round(0.1 * i, 1) for i in range(11)]
CLASSES = ("car", "truck", "bus", "motorcycle", "person")


@dataclass(frozen=True)
class Scene:
    """What a camera's frames look like in a window (per-frame distributions)."""

    brightness: float = 130.0
    brightness_sd: float = 18.0
    sharpness: float = 2.6
    sharpness_sd: float = 0.5
    detections: float = 5.0  # Poisson mean, boxes per frame
    confidence: tuple[float, float] = (8.0, 2.5)  # Beta(a, b) of box confidences (mean .76)
    classes: tuple[float, ...] = (0.7, 0.1, 0.05, 0.05, 0.1)  # shares of CLASSES
    embedding_shift: float = 0.0  # moves frame embeddings along one direction


DAY = Scene()
NIGHT = replace(DAY, brightness=32.0, brightness_sd=10.0, sharpness=1.2,
                confidence=(4.0, 3.0), embedding_shift=6.0)
DUSK = replace(DAY, brightness=92.0)  # brightness moved by ~0.15 of its range: minor drift


def _hist(values: np.ndarray, edges: Sequence[float]) -> dict[str, list]:
    e = np.asarray(edges, dtype=np.float64)
    counts, _ = np.histogram(np.clip(values, e[0], e[-1]), bins=e)
    return {"bin_edges": list(edges), "counts": [int(c) for c in counts]}


def _iso(ts: datetime) -> str:
    return ts.isoformat()


def heartbeat(camera_id: str, window_end: datetime, *, scene: Scene = DAY, frames: int = 80,
              model_version: str = "model-a", seed: int = 0, window_s: float = 30.0,
              latency_p95_ms: float = 45.0, errors: int = 0) -> dict[str, Any]:
    """One heartbeat payload covering ``window_s`` seconds up to ``window_end``."""
    rng = np.random.default_rng(seed)
    finished = frames - errors
    brightness = rng.normal(scene.brightness, scene.brightness_sd, finished)
    sharpness = rng.normal(scene.sharpness, scene.sharpness_sd, finished)
    boxes = rng.poisson(scene.detections, finished)
    n_boxes = int(boxes.sum())
    confidences = 0.25 + 0.75 * rng.beta(*scene.confidence, n_boxes)
    labels = rng.choice(len(CLASSES), n_boxes, p=np.asarray(scene.classes) / sum(scene.classes))
    class_counts = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
    start = window_end - timedelta(seconds=window_s)
    return {
        "schema_version": 2,
        "camera_id": camera_id,
        "device_id": f"dev-{camera_id}",
        "agent_version": "test",
        "model_version": model_version,
        "window_start": _iso(start),
        "window_end": _iso(window_end),
        "window_s": window_s,
        "sent_at": _iso(window_end + timedelta(seconds=1)),
        "frames_processed": frames,
        "fps": round(frames / window_s, 3),
        "latency_p50_ms": round(latency_p95_ms * 0.6, 2),
        "latency_p95_ms": latency_p95_ms,
        "inference_p50_ms": round(latency_p95_ms * 0.4, 2),
        "errors": errors,
        "other_errors": 0,
        "errors_total": errors,
        "dropped_frames": 0,
        "dropped_frames_total": 0,
        "detections": n_boxes,
        "class_counts": class_counts,
        "detections_per_frame": n_boxes / finished if finished else None,
        "confidence_histogram": _hist(confidences, CONFIDENCE_EDGES),
        "brightness_histogram": _hist(brightness, BRIGHTNESS_EDGES),
        "sharpness_histogram": _hist(sharpness, SHARPNESS_EDGES),
        "detections_histogram": _hist(boxes, DETECTIONS_EDGES),
        "brightness_mean": float(brightness.mean()) if finished else None,
        "brightness_std": float(brightness.std()) if finished else None,
        "sharpness_mean": float(sharpness.mean()) if finished else None,
        "sharpness_std": float(sharpness.std()) if finished else None,
        "density_state": "normal",
        "occupancy_mean": 0.2,
        "frames_sampled": 2,
        "uploads_ok": 2,
        "upload_failures": 0,
        "outbox_depth": 0,
        "outbox_bytes": 0,
        "outbox_evicted_total": 0,
        "last_upload_at": None,
    }


def window_heartbeats(camera_id: str, start: datetime, *, minutes: int = 15, count: int = 4,
                      seed: int = 0, versions: Sequence[str] = ("model-a",),
                      **kw: Any) -> list[dict[str, Any]]:
    """``count`` heartbeats spread over the window ``[start, start + minutes)``; the model
    versions cycle over ``versions`` in blocks (first half the first version, …)."""
    step = timedelta(minutes=minutes) / count
    out = []
    for i in range(count):
        version = versions[min(i * len(versions) // count, len(versions) - 1)]
        end = start + step * (i + 0.5)
        out.append(heartbeat(camera_id, end, model_version=version,
                             seed=_seed(camera_id, start, seed, i), **kw))
    return out


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def in_window(payloads: Sequence[dict[str, Any]], start: datetime,
              end: datetime) -> list[dict[str, Any]]:
    """The payloads whose heartbeat time lies in ``[start, end)`` (as the gateway pages them)."""
    return [p for p in payloads if (t := heartbeat_time(p)) is not None and start <= t < end]


# --------------------------------------------------------------------------- sources

EMBEDDING_DIM = 8


@dataclass
class MemorySources:
    """``DriftSources`` over heartbeats and frame embeddings kept in memory."""

    embedding_model: str | None = "embedder-1"
    training: tuple[np.ndarray, str] | None = None
    minutes: int = 15
    payloads: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    vectors: dict[Path, tuple[datetime, np.ndarray]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def add_window(self, camera_id: str, start: datetime, *, scene: Scene = DAY,
                   frames_per_window: int = 0, seed: int = 0, **kw: Any) -> list[dict[str, Any]]:
        """Heartbeats (and ``frames_per_window`` sampled frames) of one window; returns them."""
        hbs = window_heartbeats(camera_id, start, minutes=self.minutes, seed=seed, scene=scene,
                                **kw)
        self.payloads.setdefault(camera_id, []).extend(hbs)
        step = timedelta(minutes=self.minutes) / max(frames_per_window, 1)
        for i in range(frames_per_window):
            ts = start + step * i
            path = Path(f"/frames/{camera_id}/{ts:%Y%m%dT%H%M%S}-{seed}-{i}.jpg")
            self.vectors[path] = (ts, frame_vector(_seed(path, seed), scene))
        return hbs

    def replace_window(self, camera_id: str, start: datetime, **kw: Any) -> list[dict[str, Any]]:
        """Forget the window's heartbeats and frames, then add them anew."""
        end = start + timedelta(minutes=self.minutes)
        gone = in_window(self.payloads.get(camera_id, []), start, end)
        self.payloads[camera_id] = [p for p in self.payloads[camera_id] if p not in gone]
        prefix = f"/frames/{camera_id}/"
        for path, (ts, _) in list(self.vectors.items()):
            if str(path).startswith(prefix) and start <= ts < end:
                del self.vectors[path]
        return self.add_window(camera_id, start, **kw)

    # DriftSources
    def heartbeats(self, camera_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        self.calls["heartbeats"] += 1
        return in_window(self.payloads.get(camera_id, []), start, end)

    def frames(self, camera_id: str, start: datetime, end: datetime) -> list[Path]:
        self.calls["frames"] += 1
        prefix = f"/frames/{camera_id}/"
        found = [(ts, p) for p, (ts, _) in self.vectors.items()
                 if str(p).startswith(prefix) and start <= ts < end]
        return [p for _, p in sorted(found)]

    def embed(self, images: Sequence[Path]) -> np.ndarray:
        self.calls["embed"] += 1
        return np.stack([self.vectors[p][1] for p in images])

    def training_embeddings(self) -> tuple[np.ndarray, str] | None:
        self.calls["training_embeddings"] += 1
        return self.training


def frame_vector(seed: int, scene: Scene = DAY) -> np.ndarray:
    """One frame's L2-normalised embedding: a scene's mean direction plus noise."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0.0, 1.0, EMBEDDING_DIM)
    v[0] += 2.0 + scene.embedding_shift
    v[1] -= scene.embedding_shift
    return (v / np.linalg.norm(v)).astype(np.float32)


def training_set(n: int = 60, scene: Scene = DAY, seed: int = 7) -> np.ndarray:
    """Embeddings of ``n`` training frames of ``scene``."""
    return np.stack([frame_vector(_seed("train", seed, i), scene) for i in range(n)])
