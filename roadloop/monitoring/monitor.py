"""One camera window, end to end: find (or build) its reference, score it, store the events.

The monitor is framework-free; where the heartbeats, frames and embeddings come from is a
``DriftSources`` (the Dagster asset passes the gateway, the frame store and the production
model). References are kept per camera under ``<reference_dir>/<camera>/``, with an
``index.json`` naming the reference of each (serving model, embedding model) pair: a
rollout (new serving model) therefore starts a new reference, built from the first
``reference_windows`` healthy windows that model produced on that camera. Until those
exist, frame embeddings are compared with the training data's (``training_embeddings``)
and the heartbeat metrics say "no reference".
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from roadloop.fsutil import write_text_atomic
from roadloop.monitoring.drift import evaluate_window
from roadloop.monitoring.events import DriftEvent, DriftEventStore
from roadloop.monitoring.models import DriftConfig, DriftVerdict, Reference, WindowData
from roadloop.monitoring.operations import OperationalCheck, OperationsConfig, operational_checks
from roadloop.monitoring.reference import (
    build_reference,
    load_reference,
    reference_from_embeddings,
    save_reference,
)
from roadloop.monitoring.windows import group_by_window

logger = logging.getLogger(__name__)


class DriftSources(Protocol):
    """Where a window's data comes from."""

    embedding_model: str | None  # None: no model to embed frames with

    def heartbeats(self, camera_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Heartbeat payloads the camera sent for ``[start, end)``."""

    def frames(self, camera_id: str, start: datetime, end: datetime) -> list[Path]:
        """Images of the frames the camera sampled in ``[start, end)``, in time order."""

    def embed(self, images: Sequence[Path]) -> np.ndarray:
        """L2-normalised embeddings, one row per image."""

    def training_embeddings(self) -> tuple[np.ndarray, str] | None:
        """The training set's frame embeddings and a name for them, if any."""


class WindowReport(BaseModel):
    """Everything one evaluation produced (the asset's output)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    verdict: DriftVerdict
    operations: list[OperationalCheck]
    events: list[DriftEvent] = Field(default_factory=list)
    reference_status: str = ""
    html: list[Path] = Field(default_factory=list)
    heartbeats: int = 0
    frames_embedded: int = 0


def _dominant_version(heartbeats: Sequence[dict[str, Any]]) -> str | None:
    versions = Counter(str(hb.get("model_version")) for hb in heartbeats
                       if isinstance(hb.get("model_version"), str))
    return versions.most_common(1)[0][0] if versions else None


def _spread(items: Sequence[Path], n: int) -> list[Path]:
    """At most ``n`` items evenly spread over the sequence (keeps the window's time span)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


@dataclass
class CameraDriftMonitor:
    sources: DriftSources
    reference_dir: Path
    events: DriftEventStore
    window_minutes: int
    config: DriftConfig = field(default_factory=DriftConfig)
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    reference_windows: int = 4
    lookback_windows: int = 192
    max_frames_per_window: int = 64

    @property
    def length(self) -> timedelta:
        return timedelta(minutes=self.window_minutes)

    # ------------------------------------------------------------------ data
    def _embed(self, camera_id: str, start: datetime) -> np.ndarray | None:
        if self.sources.embedding_model is None:
            return None
        images = _spread(self.sources.frames(camera_id, start, start + self.length),
                         self.max_frames_per_window)
        return self.sources.embed(images) if images else None

    def window(self, camera_id: str, start: datetime) -> WindowData:
        hbs = self.sources.heartbeats(camera_id, start, start + self.length)
        return WindowData(camera_id=camera_id, window_start=start, window_end=start + self.length,
                          heartbeats=hbs, embeddings=self._embed(camera_id, start),
                          model_version=_dominant_version(hbs))

    # ------------------------------------------------------------------ references
    def _index_path(self, camera_id: str) -> Path:
        return self.reference_dir / camera_id / "index.json"

    def _index(self, camera_id: str) -> dict[str, str]:
        path = self._index_path(camera_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("reference index %s unreadable (%s): starting a new one", path, exc)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _key(self, model_version: str | None) -> str:
        return f"{model_version}|{self.sources.embedding_model}"

    def reference_for(self, window: WindowData) -> tuple[Reference | None, str]:
        """The camera's reference for the window's serving model, building it when its first
        healthy windows exist; else a training-data reference; else None. Also says which."""
        camera = window.camera_id
        index = self._index(camera)
        key = self._key(window.model_version)
        if key in index:
            path = self.reference_dir / camera / f"{index[key]}.json"
            try:
                return load_reference(path), f"reference {index[key]}"
            except FileNotFoundError:
                # gone (deleted by hand or a lost volume): say so now, rebuild next window
                gone = index.pop(key)
                write_text_atomic(self._index_path(camera), json.dumps(index, indent=1))
                return None, f"reference {gone} no longer exists ({path})"
        if window.model_version is not None:
            built = self._build(window)
            if built is not None:
                save_reference(built, self.reference_dir / camera)
                index[key] = built.reference_id
                write_text_atomic(self._index_path(camera), json.dumps(index, indent=1),
                                  parents=True)
                return built, f"built reference {built.reference_id} from {built.source}"
        training = self.sources.training_embeddings() if self.sources.embedding_model else None
        if training is not None and len(training[0]) >= 2 * self.config.min_embeddings:
            ref = reference_from_embeddings(camera, training[0], source=training[1],
                                            model_version=window.model_version, config=self.config)
            return ref, f"training data ({training[1]}): camera has no healthy windows yet"
        return None, "no reference: too few healthy windows under this model and no training data"

    def _build(self, window: WindowData) -> Reference | None:
        start = window.window_start - self.lookback_windows * self.length
        history = self.sources.heartbeats(window.camera_id, start, window.window_start)
        need = max(self.reference_windows, self.config.min_reference_windows)
        chosen: list[WindowData] = []
        for ws, hbs in group_by_window(history, self.window_minutes).items():
            if ws >= window.window_start:
                break
            versions = {hb.get("model_version") for hb in hbs}
            if versions != {window.model_version}:
                continue  # another model served in (part of) this window: rollout transition
            candidate = WindowData(camera_id=window.camera_id, window_start=ws,
                                   window_end=ws + self.length, heartbeats=hbs,
                                   model_version=window.model_version)
            feats = candidate.features()
            ops = operational_checks(hbs, config=self.operations)
            if feats.frames < self.config.min_frames or any(c.severity == "critical" for c in ops):
                continue  # not a healthy, full window
            chosen.append(candidate)
            if len(chosen) == need:
                break
        if len(chosen) < need:
            return None
        for w in chosen:
            w.embeddings = self._embed(w.camera_id, w.window_start)
        return build_reference(chosen, self.config,
                               source=f"{len(chosen)} healthy windows of {window.camera_id} "
                                      f"under model {str(window.model_version)[:12]}")

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, camera_id: str, start: datetime, *, now: datetime,
                 html_dir: Path | None = None) -> WindowReport:
        window = self.window(camera_id, start)
        reference, status = self.reference_for(window)
        if html_dir is not None and html_dir.is_dir():
            for old in html_dir.glob("*.html"):  # an earlier evaluation's: not this verdict's
                old.unlink(missing_ok=True)
        verdict = evaluate_window(window, reference, self.config, "both", html_dir=html_dir)
        if not window.heartbeats:  # silent: no model version to find its reference by
            verdict.verdict = "not_enough_data"
            verdict.reason = "no heartbeat in the window (camera silent?)"
            # Not enough data is never an alarm (docs/drift.md): what a metric measured on
            # the sampled frames alone stays readable, but it is no verdict, no event and
            # no score sent to the gateway.
            verdict.score = verdict.metric = verdict.threshold = None
            for m in verdict.metrics:
                if m.verdict in ("minor", "significant", "ok"):
                    m.verdict = "not_enough_data"
                    m.reason = (m.reason + "; " if m.reason else "") + "no heartbeat in the window"
        elif reference is None:
            verdict.reason = status
        ops = operational_checks(window.heartbeats,
                                 reference_fps=reference.fps_median if reference else None,
                                 config=self.operations)
        events = self.events.record(verdict, now)
        html = sorted(html_dir.glob("*.html")) if html_dir is not None and html_dir.is_dir() else []
        return WindowReport(verdict=verdict, operations=ops, events=events,
                            reference_status=status, html=html,
                            heartbeats=len(window.heartbeats),
                            frames_embedded=0 if window.embeddings is None
                            else len(window.embeddings))
