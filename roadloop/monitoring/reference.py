"""A camera's reference: the windows (or training frames) drift is measured against, their
noise floors, and their storage (one JSON + NPZ per reference id, written atomically)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from roadloop.fsutil import atomic_path, write_text_atomic
from roadloop.monitoring.features import Histogram, WindowFeatures
from roadloop.monitoring.models import EMBEDDINGS, DriftConfig, Reference, WindowData
from roadloop.monitoring.operations import numeric_column
from roadloop.monitoring.reports import (
    embedding_drift_score,
    heartbeat_metric_names,
    heartbeat_values,
    subsample,
)


def _reference_id(payload: dict[str, Any], embeddings: np.ndarray | None) -> str:
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    if embeddings is not None and len(embeddings):
        h.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def build_reference(windows: Sequence[WindowData], config: DriftConfig | None = None, *,
                    source: str = "") -> Reference:
    """Pool a camera's healthy windows into a reference and measure its noise floors."""
    cfg = config or DriftConfig()
    if not windows:
        raise ValueError("a reference needs at least one window")
    cameras = {w.camera_id for w in windows}
    if len(cameras) != 1:
        raise ValueError(f"a reference is one camera's; got {sorted(cameras)}")
    windows = sorted(windows, key=lambda w: w.window_start)
    per_window = [w.features() for w in windows]
    pooled = WindowFeatures()
    for wf in per_window:
        pooled = pooled.merged(wf)
    emb = [w.embedding_rows() for w in windows]
    dims = {e.shape[1] for e in emb if len(e)}
    if len(dims) > 1:
        raise ValueError(f"windows hold embeddings of different sizes {sorted(dims)}")
    all_emb = np.concatenate([e for e in emb if len(e)]) if dims else None
    floors = _noise_floors(per_window, emb, cfg)
    fps = [v for w in windows for v in numeric_column(w.heartbeats, "fps", 0, 1000)
           if 0 < v < 1000]
    versions = {w.model_version for w in windows}
    starts = [w.window_start.isoformat() for w in windows]
    payload = {"camera": windows[0].camera_id, "windows": starts, "versions": sorted(map(str, versions)),
               "hist": {k: v.counts.tolist() for k, v in pooled.histograms.items()},
               "classes": dict(pooled.class_counts)}
    return Reference(
        reference_id=_reference_id(payload, all_emb), camera_id=windows[0].camera_id,
        model_version=windows[-1].model_version, kind="camera_windows", windows=starts,
        created_at=datetime.now(UTC), features=pooled,
        embeddings=None if all_emb is None else subsample(all_emb, cfg.max_reference_embeddings),
        noise_floor=floors, fps_median=float(np.median(fps)) if fps else None,
        source=source or f"{len(windows)} windows of {windows[0].camera_id}",
    )


def reference_from_embeddings(camera_id: str, embeddings: np.ndarray, *, source: str,
                              model_version: str | None = None,
                              config: DriftConfig | None = None) -> Reference:
    """A new camera's reference: a training set's frame embeddings (no heartbeat reference).
    The noise floor comes from disjoint chunks of the set scored against the rest."""
    cfg = config or DriftConfig()
    rows = embeddings[np.isfinite(embeddings).all(axis=1)] if embeddings.ndim == 2 else embeddings
    if rows.ndim != 2 or len(rows) < 2 * cfg.min_embeddings:
        raise ValueError(f"a training-data reference needs ≥ {2 * cfg.min_embeddings} embeddings")
    rows = subsample(rows, cfg.max_reference_embeddings)
    order = np.random.default_rng(1).permutation(len(rows))
    chunk = max(cfg.min_embeddings, min(50, len(rows) // 5))
    groups = [rows[order[i:i + chunk]] for i in range(0, len(rows) - chunk + 1, chunk)][:5]
    floor = _embedding_floor(groups, cfg) if len(groups) >= 2 else None
    return Reference(
        reference_id=_reference_id({"camera": camera_id, "source": source}, rows),
        camera_id=camera_id, model_version=model_version, kind="training_data",
        created_at=datetime.now(UTC), embeddings=rows,
        noise_floor={EMBEDDINGS: floor} if floor is not None else {}, source=source,
    )


def _noise_floors(per_window: list[WindowFeatures], emb: list[np.ndarray],
                  cfg: DriftConfig) -> dict[str, float]:
    floors: dict[str, float] = {}
    if len(per_window) >= 2:
        names = heartbeat_metric_names()
        for i, wf in enumerate(per_window):
            rest = WindowFeatures()
            for j, other in enumerate(per_window):
                if j != i:
                    rest = rest.merged(other)
            for name, value in heartbeat_values(rest, wf, names, cfg, {}).items():
                floors[name] = max(floors.get(name, 0.0), value)
    groups = [e for e in emb if len(e) >= cfg.min_embeddings]
    if len(groups) >= 2:
        floors[EMBEDDINGS] = _embedding_floor(groups, cfg)
    return {k: round(v, 6) for k, v in floors.items()}


def _embedding_floor(groups: list[np.ndarray], cfg: DriftConfig) -> float:
    worst = 0.0
    for i, g in enumerate(groups):
        rest = np.concatenate([x for j, x in enumerate(groups) if j != i])
        rest = subsample(rest, cfg.max_reference_embeddings)
        worst = max(worst, embedding_drift_score(rest, g))
    return worst




def save_reference(reference: Reference, folder: Path) -> Path:
    """``<folder>/<reference_id>.json`` (+ ``.npz`` with embeddings), each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    wf = reference.features
    doc = reference.model_dump(mode="json", exclude={"features", "embeddings"})
    if wf is not None:
        doc["features"] = {
            "histograms": {k: {"bin_edges": h.edges.tolist(), "counts": h.counts.tolist()}
                           for k, h in wf.histograms.items()},
            "class_counts": dict(wf.class_counts), "heartbeats": wf.heartbeats,
            "frames": wf.frames}
    if reference.embeddings is not None:
        with atomic_path(folder / f"{reference.reference_id}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, embeddings=reference.embeddings.astype(np.float32))
    path = folder / f"{reference.reference_id}.json"
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True))
    return path


def load_reference(path: Path) -> Reference:
    """Read a reference :func:`save_reference` wrote; ``FileNotFoundError`` if it is gone."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    feats = doc.pop("features", None)
    wf = None
    if feats is not None:
        wf = WindowFeatures(
            histograms={k: Histogram(np.asarray(h["bin_edges"], dtype=np.float64),
                                     np.asarray(h["counts"], dtype=np.int64))
                        for k, h in feats["histograms"].items()},
            class_counts=Counter(feats["class_counts"]), heartbeats=feats["heartbeats"],
            frames=feats["frames"])
    npz = Path(path).with_suffix(".npz")
    emb = np.load(npz)["embeddings"] if npz.exists() else None
    return Reference.model_validate({**doc, "features": wf, "embeddings": emb})
