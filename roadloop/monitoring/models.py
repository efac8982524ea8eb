"""The drift monitor's boundary types: its settings, a window, a reference, a verdict."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from roadloop.monitoring.features import FEATURE_KINDS, WindowFeatures, window_features

Verdict = Literal["ok", "minor", "significant", "not_enough_data", "no_reference"]
FeatureSet = Literal["heartbeats", "embeddings", "both"]
SEVERITY = {"ok": 0, "minor": 1, "significant": 2}
EMBEDDINGS = "embeddings"
SCORE_NAMES: tuple[str, ...] = (*FEATURE_KINDS, EMBEDDINGS)
"""Every drift metric a verdict can score: a fixed set (the gateway exports them as labels)."""


class DriftConfig(BaseModel):
    """Thresholds and sample minimums (``ROADLOOP_DRIFT_*`` via ``roadloop.settings``)."""

    model_config = ConfigDict(frozen=True)

    minor: float = Field(default=0.1, gt=0, le=1, description="Design notes: minor drift.")
    significant: float = Field(default=0.2, gt=0, le=1, description="Design notes: significant.")
    floor_margin: float = Field(default=2.0, ge=1, description="Minor line ≥ margin × noise floor.")
    min_frames: int = Field(
        default=100, ge=1,
        description="Frames a window needs for a frame feature: with fewer, sampling noise of a "
        "range-scaled Wasserstein distance approaches the 0.1 line.",
    )
    min_boxes: int = Field(default=200, ge=1, description="Boxes for confidence / class mix.")
    min_embeddings: int = Field(
        default=20, ge=2,
        description="Sampled frames a window needs for embedding drift: the domain classifier "
        "tests on half, and with under ~10 window frames there its AUC moves by more than the "
        "0.1 line on no drift at all.",
    )
    embedding_null_draws: int = Field(
        default=20, ge=0, le=200,
        description="Random reference subsets of the window's size scored for the embedding "
        "noise floor (~0.01 CPU-s each).",
    )
    min_reference_windows: int = Field(default=3, ge=2, description="Windows a reference needs.")
    max_samples: int = Field(default=5000, ge=100, description="Cap per feature per side.")
    max_reference_embeddings: int = Field(default=1000, ge=20)


class WindowData(BaseModel):
    """One camera's window: its heartbeats' payloads and its sampled frames' embeddings."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    camera_id: str
    window_start: datetime
    window_end: datetime
    heartbeats: list[Any] = Field(default_factory=list)
    embeddings: np.ndarray | None = None
    model_version: str | None = None

    def features(self) -> WindowFeatures:
        return window_features(self.heartbeats)

    def embedding_rows(self) -> np.ndarray:
        e = self.embeddings
        if e is None or e.ndim != 2 or len(e) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return e[np.isfinite(e).all(axis=1)]


class Reference(BaseModel):
    """What a camera's windows are compared with; stored with every verdict."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    reference_id: str
    camera_id: str
    model_version: str | None
    kind: Literal["camera_windows", "training_data"]
    windows: list[str] = Field(default_factory=list, description="Window starts (ISO).")
    created_at: datetime
    features: WindowFeatures | None = None
    embeddings: np.ndarray | None = None
    noise_floor: dict[str, float] = Field(default_factory=dict)
    fps_median: float | None = Field(default=None, description="Median heartbeat fps.")
    source: str = ""

    def describe(self) -> dict[str, Any]:
        """The JSON-able summary a verdict and a drift event record."""
        return {"reference_id": self.reference_id, "kind": self.kind,
                "model_version": self.model_version, "windows": len(self.windows),
                "first_window": self.windows[0] if self.windows else None,
                "last_window": self.windows[-1] if self.windows else None,
                "embeddings": 0 if self.embeddings is None else len(self.embeddings),
                "noise_floor": self.noise_floor, "fps_median": self.fps_median,
                "source": self.source}


class MetricResult(BaseModel):
    name: str
    family: Literal["heartbeats", "embeddings"]
    kind: str
    test: str
    verdict: Verdict
    value: float | None = None
    threshold: float | None = Field(default=None, description="Effective minor line.")
    threshold_significant: float | None = None
    noise_floor: float | None = None
    n_current: int = 0
    n_reference: int = 0
    reason: str = ""


class DriftVerdict(BaseModel):
    camera_id: str
    window_start: datetime
    window_end: datetime
    features: FeatureSet
    verdict: Verdict
    score: float | None = None
    metric: str | None = Field(default=None, description="The metric that decided the verdict.")
    threshold: float | None = None
    drift_share: float | None = Field(default=None, description="evidently: drifted share.")
    metrics: list[MetricResult] = Field(default_factory=list)
    reference: dict[str, Any] | None = None
    model_version: str | None = None
    reason: str = ""
    skipped_inputs: list[str] = Field(default_factory=list)
    cpu_s: float = 0.0

    @property
    def alarm(self) -> bool:
        return self.verdict in ("minor", "significant")


def gateway_report(verdict: DriftVerdict) -> dict[str, Any]:
    """The body of ``PUT /v1/cameras/{camera_id}/drift`` (``fleet.drift``) for a verdict: the
    window, the verdict, whether it drifted and the finite scores of the metrics it judged."""
    scores = {m.name: float(m.value) for m in verdict.metrics
              if m.name in SCORE_NAMES and m.value is not None and np.isfinite(m.value)
              and m.verdict in ("ok", "minor", "significant")}
    return {"window_start": verdict.window_start.isoformat(),
            "window_end": verdict.window_end.isoformat(), "verdict": verdict.verdict,
            "drifted": verdict.alarm, "scores": scores, "model_version": verdict.model_version}
