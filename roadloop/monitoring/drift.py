"""Is this camera's window still like its reference? evidently's drift tests, calibrated.

**Metrics.** For every heartbeat feature (``roadloop.monitoring.features``) evidently's
``DataDriftTable`` runs the test chosen by the feature's type — numeric: Wasserstein
distance on the feature scaled to its full range (``unit_wasserstein``, registered below),
categorical: Jensen–Shannon distance — when the window holds enough samples of it
(``min_frames`` / ``min_boxes``); below that the feature says "not enough data". For frame
embeddings the domain classifier of evidently's ``EmbeddingsDriftMetric`` (its ``model`` drift
method, run directly: the metric's t-SNE plot is built only for HTML) is trained on reference vs
window; the score is ``2·AUC − 1`` (0: indistinguishable, 1: fully separable), so evidently's
own default (AUC 0.55) sits at 0.1. ``low_confidence_share`` is the increase of the share of
boxes under 0.5 confidence. Every score is on one scale where the design notes apply:
**≥ 0.1 minor, ≥ 0.2 significant**.

**Calibration (why a stable camera stays quiet).** Frames in a window are not independent
draws (the same cars, the same minute of light), so a test's score on an unchanged camera
is not zero. Each reference measures it: every reference window is scored against the rest
of the reference (leave one window out); the largest of those is the reference's *noise
floor* for that metric. A window must beat ``max(design threshold, 2 × floor)`` for minor
and that line + 0.1 for significant. Doubling the floor is the margin: the maximum of a
few reference windows estimates a high quantile of the no-drift score only roughly, and a
real shift (night, a new scene, fog) moves scores far past twice the camera's own
window-to-window variation. Floors are stored with the reference, so every verdict names
the reference and the thresholds it used.

**References.** ``build_reference`` pools a camera's windows under one model version (the
windows it produced once healthy), or — for a camera with no history — a training set's
frame embeddings (``reference_from_embeddings``; heartbeat metrics then say "no reference").
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from roadloop.fsutil import atomic_path
from roadloop.monitoring.features import (
    CLASS_MIX,
    FEATURE_KINDS,
    LOW_CONFIDENCE_SHARE,
    Histogram,
    WindowFeatures,
)
from roadloop.monitoring.models import (
    EMBEDDINGS,
    SEVERITY,
    DriftConfig,
    DriftVerdict,
    FeatureSet,
    MetricResult,
    Reference,
    Verdict,
    WindowData,
)
from roadloop.monitoring.reference import (
    build_reference,
    load_reference,
    reference_from_embeddings,
    save_reference,
)
from roadloop.monitoring.reports import (
    embedding_drift_score,
    embedding_null_scores,
    embedding_report,
    heartbeat_metric_names,
    heartbeat_values,
)

__all__ = [
    "DriftConfig", "DriftVerdict", "FeatureSet", "MetricResult", "Reference", "WindowData",
    "build_reference", "evaluate_window", "load_reference", "reference_from_embeddings",
    "save_reference", "summarize",
]

def _thresholds(floor: float | None, cfg: DriftConfig) -> tuple[float, float]:
    """The minor and significant lines over a noise floor. Scores are capped at 1 (fully
    separable), so where doubling a large floor would pass halfway from the floor to 1, the
    line sits halfway instead: still well clear of the noise, still reachable by a real shift."""
    f = floor or 0.0
    minor = max(cfg.minor, min(cfg.floor_margin * f, f + (1.0 - f) / 2))
    significant = max(cfg.significant, min(minor + (cfg.significant - cfg.minor), 1.0))
    return minor, max(significant, minor)


def _judge(value: float, minor: float, significant: float) -> Verdict:
    return "significant" if value >= significant else "minor" if value >= minor else "ok"


def evaluate_window(window: WindowData, reference: Reference | None,
                    config: DriftConfig | None = None, features: FeatureSet = "both",
                    *, html_dir: Path | None = None) -> DriftVerdict:
    """Score one window against its reference. Never raises on bad data: a window without
    enough samples says ``not_enough_data``; one without a reference ``no_reference``."""
    cfg = config or DriftConfig()
    t0 = time.process_time()
    verdict = DriftVerdict(camera_id=window.camera_id, window_start=window.window_start,
                           window_end=window.window_end, features=features,
                           verdict="no_reference", model_version=window.model_version)
    if reference is None:
        verdict.reason = "no reference for this camera and model version yet"
        return verdict
    verdict.reference = reference.describe()
    results: list[MetricResult] = []
    reports: list[tuple[str, Callable[[], Any]]] = []  # built when html_dir asks for them
    cur = window.features()
    verdict.skipped_inputs = cur.skipped[:50]
    if features in ("heartbeats", "both"):
        results += _heartbeat_results(cur, reference, cfg, reports)
    if features in ("embeddings", "both"):
        results.append(_embedding_result(window, reference, cfg, reports))
    verdict.metrics = results
    judged = [m for m in results if m.verdict in SEVERITY]
    if not judged:
        if all(m.verdict == "no_reference" for m in results):
            verdict.verdict = "no_reference"
            verdict.reason = "; ".join(sorted({m.reason for m in results}))
        else:
            verdict.verdict = "not_enough_data"
            verdict.reason = "; ".join(f"{m.name}: {m.reason}" for m in results)
    else:
        worst = max(judged, key=lambda m: (SEVERITY[m.verdict], (m.value or 0) / (m.threshold or 1)))
        verdict.verdict = worst.verdict
        verdict.score, verdict.metric, verdict.threshold = worst.value, worst.name, worst.threshold
        drifted = [m for m in judged if m.family == "heartbeats" and m.verdict != "ok"]
        hb = [m for m in judged if m.family == "heartbeats"]
        verdict.drift_share = len(drifted) / len(hb) if hb else None
    if html_dir is not None and reports:
        html_dir.mkdir(parents=True, exist_ok=True)
        for name, make in reports:
            report = make()
            if report is None:
                continue
            with atomic_path(html_dir / f"{name}.html") as tmp:
                report.save_html(str(tmp))
    verdict.cpu_s = time.process_time() - t0
    return verdict


def _heartbeat_results(cur: WindowFeatures, reference: Reference, cfg: DriftConfig,
                       reports: list[tuple[str, Callable[[], Any]]]) -> list[MetricResult]:
    ref = reference.features
    names = heartbeat_metric_names()
    if ref is None or ref.heartbeats == 0:
        return [MetricResult(name=n, family="heartbeats", kind=FEATURE_KINDS[n], test="-",
                             verdict="no_reference",
                             reason=f"reference {reference.reference_id} ({reference.kind}) "
                                    "holds no heartbeats") for n in names]
    lines = {n: _thresholds(reference.noise_floor.get(n), cfg) for n in names}
    collected: list[Any] = []
    values = heartbeat_values(ref, cur, names, cfg, {n: lines[n][0] for n in names}, collected)
    reports += [("heartbeat_drift", lambda r=r: r) for r in collected]
    out = []
    for n in names:
        test = ("jensenshannon" if n == CLASS_MIX else "share increase"
                if n == LOW_CONFIDENCE_SHARE else "unit_wasserstein")
        minor, sig = lines[n]
        m = MetricResult(name=n, family="heartbeats", kind=FEATURE_KINDS[n], test=test,
                         verdict="not_enough_data", threshold=minor, threshold_significant=sig,
                         noise_floor=reference.noise_floor.get(n), n_current=cur.samples(n),
                         n_reference=ref.samples(n))
        if n in values:
            m.value = round(values[n], 6)
            m.verdict = _judge(values[n], minor, sig)
        else:
            m.reason = _why_not(cur, ref, n, cfg)
        out.append(m)
    return out


def _why_not(cur: WindowFeatures, ref: WindowFeatures, name: str, cfg: DriftConfig) -> str:
    need = cfg.min_boxes if name in (CLASS_MIX, "confidence", LOW_CONFIDENCE_SHARE) else cfg.min_frames
    if cur.samples(name) < need:
        return f"window has {cur.samples(name)} samples (< {need})"
    if ref.samples(name) < need:
        return f"reference has {ref.samples(name)} samples (< {need})"
    return "window and reference histograms use different bins"


def _embedding_result(window: WindowData, reference: Reference, cfg: DriftConfig,
                      reports: list[tuple[str, Callable[[], Any]]]) -> MetricResult:
    minor, sig = _thresholds(reference.noise_floor.get(EMBEDDINGS), cfg)
    m = MetricResult(name=EMBEDDINGS, family="embeddings", kind="input",
                     test="domain classifier (2·AUC − 1)", verdict="not_enough_data",
                     threshold=minor, threshold_significant=sig,
                     noise_floor=reference.noise_floor.get(EMBEDDINGS))
    ref = reference.embeddings
    cur = window.embedding_rows()
    m.n_current = len(cur)
    m.n_reference = 0 if ref is None else len(ref)
    if ref is None or len(ref) < 2 * cfg.min_embeddings:
        m.verdict = "no_reference"
        m.reason = f"reference {reference.reference_id} holds {m.n_reference} embeddings"
    elif len(cur) < cfg.min_embeddings:
        m.reason = f"window has {len(cur)} sampled frames with embeddings (< {cfg.min_embeddings})"
    elif cur.shape[1] != ref.shape[1]:
        m.reason = f"embedding size {cur.shape[1]} differs from the reference's {ref.shape[1]}"
    else:
        # The classifier's own noise at this window size: the reference's windows scored
        # against the rest set the floor only from a handful of draws, so random subsets of
        # the reference of this window's size add more (the larger of the two counts).
        # A window larger than half the reference cannot be drawn from it with a rest to
        # score against: the null then uses subsets of half the reference (smaller subsets
        # score noisier, so the floor errs high), never no null at all (it once fell back to
        # the leave-one-out floor alone, and stable boosted windows alarmed 7 times in 60).
        null = embedding_null_scores(ref, min(len(cur), len(ref) // 2),
                                     cfg.embedding_null_draws)
        floor = max(reference.noise_floor.get(EMBEDDINGS) or 0.0, max(null, default=0.0))
        minor, sig = _thresholds(floor, cfg)
        m.threshold, m.threshold_significant, m.noise_floor = minor, sig, round(floor, 6)
        value = embedding_drift_score(ref, cur)
        reports.append(("embedding_drift", lambda: embedding_report(ref, cur)))
        m.value = round(value, 6)
        m.verdict = _judge(value, minor, sig)
    return m


def summarize(verdicts: Sequence[DriftVerdict]) -> Counter[str]:
    """How many windows got each verdict."""
    return Counter(v.verdict for v in verdicts)


def histogram_of(values: Sequence[float], edges: Sequence[float]) -> Histogram:
    """Helper for tests and tools: a :class:`Histogram` of raw values over ``edges``."""
    e = np.asarray(edges, dtype=np.float64)
    counts, _ = np.histogram(np.clip(values, e[0], e[-1]), bins=e)
    return Histogram(e, counts.astype(np.int64))
