"""``roadloop.monitoring``: window features from heartbeat histograms, drift verdicts against a
camera's reference (evidently 0.6), noise-floor calibration, references on disk.

Heartbeats are synthetic payloads in the agent's schema (``edge_agent.heartbeat``) with the
drift histograms the agent is gaining (brightness, sharpness, detections per frame); a
window is a few heartbeats of a few hundred frames, so every evidently report stays small.
One module-scoped reference (three stable windows) serves most tests.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import wasserstein_distance
from threadpoolctl import threadpool_limits

from roadloop.monitoring.drift import (
    build_reference,
    evaluate_window,
    load_reference,
    reference_from_embeddings,
    save_reference,
)
from roadloop.monitoring.features import (
    NUMERIC_FEATURES,
    Histogram,
    expand,
    expand_classes,
    window_features,
)
from roadloop.monitoring.models import (
    EMBEDDINGS,
    DriftConfig,
    DriftVerdict,
    Reference,
    WindowData,
)

BRIGHTNESS_EDGES = [float(x) for x in range(0, 257, 16)]
SHARPNESS_EDGES = [i * 0.25 for i in range(21)]
DETECTIONS_EDGES = [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 64, 80, 100]
CONFIDENCE_EDGES = [round(i / 10, 1) for i in range(11)]  # edge_agent.heartbeat's bins
CLASSES = ("car", "truck", "bus", "person")
MIX = (0.6, 0.2, 0.1, 0.1)
FEATURE = {f.name: f for f in NUMERIC_FEATURES}
HEARTBEAT_METRICS = ("brightness", "sharpness", "detections_per_frame", "confidence",
                     "class_mix", "low_confidence_share")
ALL_METRICS = (*HEARTBEAT_METRICS, "embeddings")
DIM = 8
T0 = datetime(2025, 3, 1, tzinfo=UTC)


def hist(values: np.ndarray, edges: list[float]) -> dict[str, list]:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return {"bin_edges": list(edges), "counts": [int(c) for c in counts]}


def heartbeat(rng: np.random.Generator, *, frames: int = 150, bright: float = 120.0,
              sharp: float = 2.5, det: float = 5.0, conf: tuple[float, float] = (6, 2),
              mix: tuple[float, ...] = MIX) -> dict[str, Any]:
    """One heartbeat payload: per-frame brightness/sharpness/boxes, per-box confidence/class."""
    b = rng.normal(bright, 25, frames)
    s = rng.normal(sharp, 0.4, frames)
    d = np.minimum(rng.poisson(det, frames), 99)
    boxes = int(d.sum())
    c = np.clip(rng.beta(*conf, boxes), 0.25, 1.0)  # the agent drops boxes under 0.25
    return {
        "schema_version": 3, "camera_id": "cam1", "model_version": "v1",
        "frames_processed": frames, "fps": frames / 30, "latency_p95_ms": 60.0, "errors": 0,
        "class_counts": dict(zip(CLASSES, (int(n) for n in rng.multinomial(boxes, mix)),
                                 strict=True)),
        "confidence_histogram": hist(c, CONFIDENCE_EDGES),
        "brightness_histogram": hist(b, BRIGHTNESS_EDGES),
        "sharpness_histogram": hist(s, SHARPNESS_EDGES),
        "detections_histogram": hist(d, DETECTIONS_EDGES),
    }


def embeddings(rng: np.random.Generator, n: int, direction: int = 0) -> np.ndarray:
    """Unit vectors scattered around one axis."""
    e = np.eye(DIM)[direction] + 0.5 * rng.normal(size=(n, DIM))
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def window(seed: int, k: int = 10, *, n_heartbeats: int = 4, n_emb: int = 200,
           emb_direction: int = 0, camera: str = "cam1", extra: list[Any] | None = None,
           **kw: Any) -> WindowData:
    rng = np.random.default_rng(seed)
    start = T0 + timedelta(minutes=15 * k)
    hbs: list[Any] = [heartbeat(rng, **kw) for _ in range(n_heartbeats)]
    return WindowData(camera_id=camera, window_start=start,
                      window_end=start + timedelta(minutes=15), heartbeats=hbs + (extra or []),
                      embeddings=embeddings(rng, n_emb, emb_direction) if n_emb else None,
                      model_version="v1")


def by_name(v: DriftVerdict) -> dict[str, Any]:
    return {m.name: m for m in v.metrics}


def alarms(v: DriftVerdict) -> set[str]:
    return {m.name for m in v.metrics if m.verdict in ("minor", "significant")}


@pytest.fixture(scope="module")
def reference() -> Reference:
    return build_reference([window(i, i) for i in range(3)], source="test: 3 stable windows")


@pytest.fixture(scope="module")
def training_reference() -> Reference:
    return reference_from_embeddings("cam1", embeddings(np.random.default_rng(99), 200),
                                     source="training set v3", model_version="v1")


# --------------------------------------------------------------------------- features


def test_histograms_are_summed_across_a_windows_heartbeats() -> None:
    rng = np.random.default_rng(0)
    a, b = heartbeat(rng, frames=120), heartbeat(rng, frames=80, bright=40)
    wf = window_features([a, b])
    assert (wf.heartbeats, wf.frames, wf.skipped) == (2, 200, [])
    for f in NUMERIC_FEATURES:
        got = wf.histograms[f.name]
        want = np.add(a[f.field]["counts"], b[f.field]["counts"])
        assert got.counts.tolist() == want.tolist()
        assert got.edges.tolist() == pytest.approx(a[f.field]["bin_edges"])
    assert wf.histograms["brightness"].total == 200
    assert wf.class_counts == Counter(a["class_counts"]) + Counter(b["class_counts"])
    assert wf.samples("class_mix") == wf.histograms["confidence"].total  # one class per box
    assert wf.samples("low_confidence_share") == wf.histograms["confidence"].total


def test_expand_caps_proportionally_and_keeps_the_shape() -> None:
    feat = FEATURE["brightness"]
    edges = np.asarray(BRIGHTNESS_EDGES)
    counts = np.zeros(16, dtype=np.int64)
    counts[[0, 3, 7, 15]] = [7000, 2000, 997, 3]
    out = expand(Histogram(edges, counts), feat, 1000)
    assert len(out) == 1000
    values = feat.unit_values(edges)
    per_bin = np.array([(out == v).sum() for v in values])
    assert per_bin.sum() == 1000
    assert np.all(np.abs(per_bin - counts * 1000 / counts.sum()) < 1)  # floor or floor + 1
    assert per_bin[[0, 3, 7]].tolist() == [700, 200, 100]  # 99.7 rounds up, 0.3 down
    # under the cap every count is kept as it is
    small = np.array([3, 0, 5] + [0] * 13, dtype=np.int64)
    kept = expand(Histogram(edges, small), feat, 1000)
    assert sorted(kept.tolist()) == [values[0]] * 3 + [values[2]] * 5
    # equal remainders: the total is still exactly the cap
    ones = expand(Histogram(np.arange(4.0), np.array([1, 1, 1])), feat, 2)
    assert len(ones) == 2
    # class labels are capped the same way
    labels = expand_classes({"car": 900, "bus": 60, "truck": 40}, 100)
    assert Counter(labels) == {"car": 90, "bus": 6, "truck": 4}
    assert expand_classes({}, 100) == []


def test_unit_values_are_scaled_to_the_histograms_range() -> None:
    b = FEATURE["brightness"].unit_values(np.asarray(BRIGHTNESS_EDGES))
    assert b.tolist() == pytest.approx([(8 + 16 * i) / 256 for i in range(16)])
    s = FEATURE["sharpness"].unit_values(np.asarray(SHARPNESS_EDGES))
    assert s.tolist() == pytest.approx([(0.125 + 0.25 * i) / 5 for i in range(20)])
    c = FEATURE["confidence"].unit_values(np.asarray(CONFIDENCE_EDGES, dtype=float))
    assert c.tolist() == pytest.approx([0.05 + 0.1 * i for i in range(10)])
    d = FEATURE["detections_per_frame"].unit_values(np.asarray(DETECTIONS_EDGES, dtype=float))
    top = math.log1p(100)
    # width-1 bins hold their integer box count; wider bins their centre; log1p scale
    assert d[:6].tolist() == pytest.approx([math.log1p(k) / top for k in range(6)])
    assert d[6] == pytest.approx(math.log1p(7) / top)  # [6, 8)
    assert d[-1] == pytest.approx(math.log1p(90) / top)  # [80, 100]
    for v in (b, s, c, d):
        assert np.all((v >= 0) & (v <= 1)) and np.all(np.diff(v) > 0)
    # the log scale: 2 -> 4 boxes moves a frame about as far as 20 -> 40 ([20, 25) -> [40, 50))
    assert 0.5 < (d[4] - d[2]) / (d[14] - d[11]) < 1.5


def test_low_confidence_share() -> None:
    counts = [0, 0, 4, 6, 10, 30, 20, 20, 5, 5]  # 20 of 100 boxes in bins ending <= 0.5
    wf = window_features([{"frames_processed": 10, "confidence_histogram": {
        "bin_edges": CONFIDENCE_EDGES, "counts": counts}}])
    assert wf.low_confidence_share() == pytest.approx(0.20)
    assert window_features([{"frames_processed": 10}]).low_confidence_share() is None
    zero = {"bin_edges": CONFIDENCE_EDGES, "counts": [0] * 10}
    assert window_features([{"confidence_histogram": zero}]).low_confidence_share() is None


# --------------------------------------------------------------------------- bad input

NIGHT = [0, 100_000] + [0] * 14  # if any of these got in, brightness would alarm


def _brightness(counts: list[Any], edges: list[Any] = BRIGHTNESS_EDGES) -> dict[str, Any]:
    return {"bin_edges": list(edges), "counts": counts}


def _bad(**fields: Any) -> dict[str, Any]:
    hb = heartbeat(np.random.default_rng(1234))
    hb.update(fields)
    return hb


BAD_HEARTBEATS: dict[str, tuple[Any, str]] = {
    "not a dict": ("garbage", "#4: not an object"),
    "null heartbeat": (None, "#4: not an object"),
    "list heartbeat": ([1, 2, 3], "#4: not an object"),
    "more frames than processed": (
        _bad(frames_processed=150, brightness_histogram=_brightness(NIGHT)),
        "100000 frames counted but 150 processed"),
    "frames_processed missing": (
        {k: v for k, v in _bad(brightness_histogram=_brightness(NIGHT)).items()
         if k != "frames_processed"}, "frames_processed missing or absurd"),
    "frames_processed absurd": (_bad(frames_processed=10**12,
                                     brightness_histogram=_brightness(NIGHT)),
                                "frames_processed missing or absurd"),
    "frames_processed negative": (_bad(frames_processed=-1,
                                       brightness_histogram=_brightness(NIGHT)),
                                  "frames_processed missing or absurd"),
    "frames_processed NaN": (_bad(frames_processed=float("nan"),
                                  brightness_histogram=_brightness(NIGHT)),
                             "frames_processed missing or absurd"),
    "frames_processed bool": (_bad(frames_processed=True,
                                   brightness_histogram=_brightness(NIGHT)),
                              "frames_processed missing or absurd"),
    "frames_processed string": (_bad(frames_processed="150",
                                     brightness_histogram=_brightness(NIGHT)),
                                "frames_processed missing or absurd"),
    "NaN count": (_bad(brightness_histogram=_brightness([float("nan"), 140] + [0] * 14)),
                  "brightness_histogram: counts must be non-negative integers"),
    "inf count": (_bad(brightness_histogram=_brightness([float("inf"), 140] + [0] * 14)),
                  "brightness_histogram: counts must be non-negative integers"),
    "negative count": (_bad(brightness_histogram=_brightness([-5, 140] + [0] * 14)),
                       "brightness_histogram: counts must be non-negative integers"),
    "bool count": (_bad(brightness_histogram=_brightness([True, 140] + [0] * 14)),
                   "brightness_histogram: counts must be non-negative integers"),
    "float count": (_bad(brightness_histogram=_brightness([0, 140.0] + [0] * 14)),
                    "brightness_histogram: counts must be non-negative integers"),
    "huge count": (_bad(frames_processed=None, confidence_histogram={
        "bin_edges": CONFIDENCE_EDGES, "counts": [0, 0, 10**10] + [0] * 7}),
        "confidence_histogram: counts must be non-negative integers"),
    "wrong length": (_bad(brightness_histogram=_brightness([0, 140] + [0] * 13)),
                     "brightness_histogram: 15 counts for 17 edges"),
    "decreasing edges": (_bad(brightness_histogram=_brightness(
        [0] * 14 + [140, 0], BRIGHTNESS_EDGES[::-1])), "brightness_histogram: edges not increasing"),
    "repeated edge": (_bad(sharpness_histogram={
        "bin_edges": [0.0, 0.0] + SHARPNESS_EDGES[2:], "counts": [140] + [0] * 19}),
        "sharpness_histogram: edges not increasing"),
    "non-numeric edge": (_bad(brightness_histogram=_brightness(
        [0, 140] + [0] * 14, ["0", *BRIGHTNESS_EDGES[1:]])), "non-numeric edge"),
    "NaN edge": (_bad(brightness_histogram=_brightness(
        [0, 140] + [0] * 14, [float("nan"), *BRIGHTNESS_EDGES[1:]])), "non-numeric edge"),
    "histogram not an object": (_bad(brightness_histogram=[0, 140]),
                                "brightness_histogram: not an object"),
    "counts not a list": (_bad(brightness_histogram={"bin_edges": BRIGHTNESS_EDGES,
                                                     "counts": "140"}), "are not lists"),
    "bins differ within the window": (
        _bad(brightness_histogram=_brightness([0, 140] + [0] * 14,
                                              [x / 256 for x in BRIGHTNESS_EDGES])),
        "brightness_histogram: bins differ from the window's others"),
    "detections bins differ": (
        _bad(detections_histogram={"bin_edges": list(range(19)),
                                   "counts": [140] + [0] * 17}),
        "detections_histogram: bins differ from the window's others"),
    "low-confidence flood with float counts": (_bad(confidence_histogram={
        "bin_edges": CONFIDENCE_EDGES, "counts": [0, 0, 1e5] + [0] * 7}),
        "confidence_histogram: counts must be non-negative integers"),
    "bad class counts": (_bad(class_counts={"bicycle": 10**5 * 1.0, "truck": True,
                                            "bus": -3, "car": float("nan")}),
                         "class_counts: non-integer or negative counts dropped"),
    "class counts not an object": (_bad(class_counts=[["bicycle", 100000]]),
                                   "class_counts: not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEARTBEATS))
def test_a_bad_heartbeat_is_skipped_with_a_reason_and_never_alarms(
        case: str, reference: Reference) -> None:
    bad, reason = BAD_HEARTBEATS[case]
    w = window(50, extra=[bad])
    v = evaluate_window(w, reference, features="heartbeats")
    assert any(reason in s for s in v.skipped_inputs), v.skipped_inputs
    assert v.verdict == "ok", (v.metric, v.score, [(m.name, m.value) for m in v.metrics])
    assert all(m.verdict == "ok" for m in v.metrics)
    clean = window_features(window(50).heartbeats)
    got = w.features()
    assert got.histograms["brightness"].total <= clean.histograms["brightness"].total + 150
    assert sum(got.class_counts.values()) >= sum(clean.class_counts.values())
    assert set(got.class_counts) == set(CLASSES)  # no bicycles smuggled in


def test_a_window_of_nothing_but_garbage_is_not_enough_data(reference: Reference) -> None:
    junk: list[Any] = [
        "x", None, 3, {}, {"frames_processed": "a"},
        {"frames_processed": 100, "brightness_histogram": {"bin_edges": None, "counts": None}},
        {"frames_processed": 100, "brightness_histogram": {"bin_edges": [0], "counts": []}},
        {"frames_processed": 100, "sharpness_histogram": {"bin_edges": list(range(300)),
                                                          "counts": [0] * 299}},
        {"frames_processed": 100, "class_counts": {"car": "many"}},
    ]
    w = WindowData(camera_id="cam1", window_start=T0, window_end=T0 + timedelta(minutes=15),
                   heartbeats=junk, embeddings=np.full((20, DIM), np.nan))
    v = evaluate_window(w, reference)
    assert v.verdict == "not_enough_data" and not v.alarm
    assert {m.verdict for m in v.metrics} == {"not_enough_data"}
    assert len(v.skipped_inputs) >= 7
    assert "window has 0 samples" in v.reason


def test_an_empty_window_is_not_enough_data(reference: Reference) -> None:
    w = WindowData(camera_id="cam1", window_start=T0, window_end=T0 + timedelta(minutes=15))
    v = evaluate_window(w, reference)
    assert v.verdict == "not_enough_data"
    assert v.score is None and v.metric is None and v.drift_share is None
    assert [m.name for m in v.metrics] == list(ALL_METRICS)
    for m in v.metrics:
        assert m.verdict == "not_enough_data" and m.reason and m.n_current == 0
    assert v.reference is not None and v.reference["reference_id"] == reference.reference_id


def test_a_small_window_is_not_enough_data_however_shifted(reference: Reference) -> None:
    """50 frames, ~100 boxes, 5 embeddings: under every minimum, so even a night-time,
    blurred, unsure, other-class, other-scene window says nothing."""
    w = window(7, n_heartbeats=1, frames=50, det=2.0, n_emb=5, emb_direction=3, bright=30,
               sharp=0.8, conf=(2, 3), mix=(0.1, 0.1, 0.1, 0.7))
    assert w.features().frames == 50 and w.features().samples("class_mix") < 200
    v = evaluate_window(w, reference)
    assert v.verdict == "not_enough_data"
    m = by_name(v)
    assert m["brightness"].reason == "window has 50 samples (< 100)"
    assert "(< 200)" in m["confidence"].reason and "(< 200)" in m["class_mix"].reason
    assert m["embeddings"].reason.startswith("window has 5 sampled frames")


def test_embeddings_of_another_size_are_not_compared(reference: Reference) -> None:
    w = window(8, n_heartbeats=0, n_emb=0)
    w.embeddings = np.random.default_rng(8).normal(size=(50, DIM * 2))
    v = evaluate_window(w, reference, features="embeddings")
    assert v.verdict == "not_enough_data"
    (m,) = v.metrics
    assert m.reason == f"embedding size {DIM * 2} differs from the reference's {DIM}"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embedding_rows_are_dropped(bad: float, reference: Reference) -> None:
    w = window(9, n_heartbeats=0, emb_direction=2)  # would be a clear shift
    assert w.embeddings is not None
    w.embeddings[5:, 0] = bad  # 5 rows left
    v = evaluate_window(w, reference, features="embeddings")
    assert v.verdict == "not_enough_data"
    assert v.metrics[0].n_current == 5
    # a few bad rows among many good ones are dropped and the rest is judged
    w2 = window(10, n_heartbeats=0, n_emb=60)
    assert w2.embeddings is not None
    w2.embeddings[:10, 3] = bad
    v2 = evaluate_window(w2, reference, features="embeddings")
    assert v2.metrics[0].n_current == 50 and v2.verdict == "ok"


@pytest.mark.parametrize("emb", [np.zeros(DIM), np.zeros((3, 4, DIM)), np.zeros((0, DIM))])
def test_embeddings_of_the_wrong_shape_are_not_enough_data(emb: np.ndarray,
                                                           reference: Reference) -> None:
    w = window(11, n_heartbeats=0, n_emb=0)
    w.embeddings = emb
    v = evaluate_window(w, reference, features="embeddings")
    assert v.verdict == "not_enough_data" and v.metrics[0].n_current == 0


# --------------------------------------------------------------------------- references


def test_no_reference(reference: Reference) -> None:
    v = evaluate_window(window(12), None)
    assert v.verdict == "no_reference" and not v.alarm
    assert v.reason and v.reference is None and v.metrics == []


def test_a_training_data_reference_judges_embeddings_only(training_reference: Reference) -> None:
    assert training_reference.kind == "training_data" and training_reference.features is None
    assert "embeddings" in training_reference.noise_floor
    stable = evaluate_window(window(13), training_reference)
    m = by_name(stable)
    for name in HEARTBEAT_METRICS:
        assert m[name].verdict == "no_reference"
        assert training_reference.reference_id in m[name].reason
    assert m["embeddings"].verdict == "ok" and m["embeddings"].value is not None
    assert stable.verdict == "ok" and stable.metric == "embeddings"
    hb_only = evaluate_window(window(13), training_reference, features="heartbeats")
    assert hb_only.verdict == "no_reference" and "holds no heartbeats" in hb_only.reason
    shifted = evaluate_window(window(14, emb_direction=1), training_reference)
    assert shifted.verdict == "significant" and shifted.metric == "embeddings"
    assert shifted.reference is not None
    assert shifted.reference["reference_id"] == training_reference.reference_id
    assert shifted.reference["kind"] == "training_data"


def test_a_training_reference_at_its_minimum_size_works() -> None:
    """2 × min_embeddings rows, scored against a min_embeddings-row window: too few rows for
    the t-SNE evidently's EmbeddingsDriftMetric plots, which used to raise here."""
    rng = np.random.default_rng(15)
    cfg = DriftConfig(min_embeddings=10)
    ref = reference_from_embeddings("cam9", embeddings(rng, 20), source="tiny", config=cfg)
    assert "embeddings" in ref.noise_floor
    w = WindowData(camera_id="cam9", window_start=T0, window_end=T0,
                   embeddings=embeddings(rng, 10, direction=4))
    v = evaluate_window(w, ref, cfg, features="embeddings")
    assert v.verdict in ("ok", "minor", "significant") and v.score is not None
    with pytest.raises(ValueError):
        reference_from_embeddings("cam9", embeddings(rng, 19), source="too small", config=cfg)


def test_build_reference_rejects_an_empty_list_and_mixed_cameras() -> None:
    with pytest.raises(ValueError):
        build_reference([])
    with pytest.raises(ValueError, match="one camera"):
        build_reference([window(1, 1, n_emb=0), window(2, 2, n_emb=0, camera="cam2")])


def test_the_reference_records_its_windows_and_floors(reference: Reference) -> None:
    assert reference.kind == "camera_windows" and reference.camera_id == "cam1"
    assert reference.windows == [(T0 + timedelta(minutes=15 * i)).isoformat() for i in range(3)]
    assert set(reference.noise_floor) == set(ALL_METRICS)
    assert reference.features is not None and reference.features.heartbeats == 12
    assert reference.embeddings is not None and reference.embeddings.shape == (600, DIM)
    # built again from the same windows (in another order): the same id
    again = build_reference([window(i, i) for i in (2, 0, 1)])
    assert again.reference_id == reference.reference_id


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("seed", [20, 21])
def test_stable_windows_are_ok_on_every_metric(seed: int, reference: Reference) -> None:
    v = evaluate_window(window(seed), reference)
    assert [m.name for m in v.metrics] == list(ALL_METRICS)
    assert {m.name: m.verdict for m in v.metrics} == dict.fromkeys(ALL_METRICS, "ok")
    assert all(m.value is not None and m.value < m.threshold for m in v.metrics)
    assert v.verdict == "ok" and not v.alarm and v.drift_share == 0.0
    assert v.skipped_inputs == []


SHIFTS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "night": ({"bright": 40.0}, {"brightness"}),
    "blur": ({"sharp": 1.0}, {"sharpness"}),
    "unsure model": ({"conf": (2, 2)}, {"confidence", "low_confidence_share"}),
    "class mix": ({"mix": (0.2, 0.2, 0.1, 0.5)}, {"class_mix"}),
    "new scene": ({"emb_direction": 1}, {"embeddings"}),
    "traffic jam": ({"det": 20.0}, {"detections_per_frame"}),
}


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_a_clear_shift_fires_the_right_metric(shift: str, reference: Reference) -> None:
    kw, expected = SHIFTS[shift]
    v = evaluate_window(window(30, **kw), reference)
    assert alarms(v) == expected, [(m.name, m.verdict, m.value) for m in v.metrics]
    assert v.alarm and v.metric in expected
    m = by_name(v)[v.metric]
    assert v.verdict == m.verdict and v.score == m.value and v.threshold == m.threshold
    assert m.value >= m.threshold
    assert v.reference is not None and v.reference["reference_id"] == reference.reference_id
    assert v.reference["windows"] == 3 and v.reference["noise_floor"] == reference.noise_floor


def test_low_confidence_share_is_the_increase_of_the_share(reference: Reference) -> None:
    w = window(31, conf=(2, 2))
    v = evaluate_window(w, reference, features="heartbeats")
    assert reference.features is not None
    want = w.features().low_confidence_share() - reference.features.low_confidence_share()
    assert by_name(v)["low_confidence_share"].value == pytest.approx(want, abs=1e-6)
    assert want > 0.3
    # more confident than the reference is not drift on this metric
    sure = evaluate_window(window(32, conf=(12, 1)), reference, features="heartbeats")
    assert by_name(sure)["low_confidence_share"].value == 0.0


@pytest.mark.parametrize("max_samples", [100, 1000, 5000])
def test_evidently_scores_equal_scipys_wasserstein_on_the_histograms(
        max_samples: int, reference: Reference) -> None:
    """The score evidently reports is the Wasserstein distance of the two histograms (as
    weights on their unit-scaled bin values): padding the shorter columns with NaN and
    capping the samples (the reference's 1800 frames at 100 or 1000) do not change it."""
    ref = reference.features
    assert ref is not None and ref.histograms["brightness"].total == 1800
    w = window(33, bright=90.0, sharp=2.0, det=7.0, conf=(4, 2))
    cur = w.features()
    v = evaluate_window(w, reference, DriftConfig(max_samples=max_samples),
                        features="heartbeats")
    m = by_name(v)
    capped = 0
    for name, feat in FEATURE.items():
        r, c = ref.histograms[name], cur.histograms[name]
        values = feat.unit_values(r.edges)
        want = wasserstein_distance(values, values, r.counts, c.counts)
        # uncapped: equal to the stored 6 decimals; capped: within one sample's mass
        tol = 1 / max_samples if max(r.total, c.total) > max_samples else 2e-6
        capped += max(r.total, c.total) > max_samples
        assert m[name].value == pytest.approx(want, abs=tol), name
        assert m[name].n_current == c.total and m[name].n_reference == r.total
    assert capped == (1 if max_samples == 5000 else 4)  # the boxes are always capped
    assert m["brightness"].value > 0.1  # a real difference is being compared


# --------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def varying_reference() -> Reference:
    """Three windows whose brightness moves a lot (cloud, sun, dusk); all else stable."""
    return build_reference([window(40 + i, i, bright=b, n_emb=0)
                            for i, b in enumerate((95.0, 125.0, 155.0))])


def test_the_noise_floor_is_the_worst_leave_one_out_score(varying_reference: Reference) -> None:
    windows = [window(40 + i, i, bright=b, n_emb=0).features()
               for i, b in enumerate((95.0, 125.0, 155.0))]
    feat = FEATURE["brightness"]
    worst = 0.0
    for i, wf in enumerate(windows):
        rest = sum((o.histograms["brightness"].counts for j, o in enumerate(windows) if j != i),
                   np.zeros(16, dtype=np.int64))
        values = feat.unit_values(wf.histograms["brightness"].edges)
        worst = max(worst, wasserstein_distance(values, values, rest,
                                                wf.histograms["brightness"].counts))
    floor = varying_reference.noise_floor["brightness"]
    assert floor == pytest.approx(worst, abs=1e-5)
    assert floor > 0.1
    assert varying_reference.noise_floor["sharpness"] < 0.02


def test_a_noisy_reference_raises_the_threshold(varying_reference: Reference) -> None:
    floor = varying_reference.noise_floor["brightness"]
    w = window(50, bright=90.0, n_emb=0)
    v = evaluate_window(w, varying_reference, features="heartbeats")
    b = by_name(v)["brightness"]
    assert b.noise_floor == floor
    assert b.threshold == pytest.approx(max(0.1, 2 * floor))
    assert b.threshold_significant == pytest.approx(b.threshold + 0.1)
    # past the design line of 0.1, but within the camera's own variation: ok
    assert 0.1 < b.value < b.threshold
    assert v.verdict == "ok"
    # a quiet feature keeps the design lines
    s = by_name(v)["sharpness"]
    assert (s.threshold, s.threshold_significant) == (0.1, 0.2)
    # a shift well past the camera's own variation still alarms
    night = evaluate_window(window(51, bright=10.0, n_emb=0), varying_reference,
                            features="heartbeats")
    assert night.metric == "brightness" and night.alarm
    assert night.threshold == pytest.approx(b.threshold)


def test_a_quiet_reference_flags_what_a_noisy_one_tolerates(reference: Reference) -> None:
    v = evaluate_window(window(50, bright=90.0, n_emb=0), reference, features="heartbeats")
    assert v.metric == "brightness" and v.verdict in ("minor", "significant")
    assert v.threshold == 0.1


# --------------------------------------------------------------------------- storage, HTML


def test_save_and_load_round_trip(tmp_path: Path, reference: Reference) -> None:
    path = save_reference(reference, tmp_path / "refs")
    assert path == tmp_path / "refs" / f"{reference.reference_id}.json"
    assert path.with_suffix(".npz").exists()
    assert not [p for p in (tmp_path / "refs").iterdir() if ".tmp-" in p.name]
    loaded = load_reference(path)
    assert loaded.reference_id == reference.reference_id
    assert loaded.noise_floor == reference.noise_floor
    assert loaded.windows == reference.windows and loaded.kind == reference.kind
    assert loaded.embeddings is not None and reference.embeddings is not None
    np.testing.assert_allclose(loaded.embeddings, reference.embeddings, atol=1e-6)
    for w in (window(60), window(61, bright=50.0, emb_direction=1)):
        a, b = evaluate_window(w, reference), evaluate_window(w, loaded)
        assert (a.verdict, a.metric, a.score) == (b.verdict, b.metric, b.score)
        assert [(m.name, m.value, m.threshold) for m in a.metrics] == \
               [(m.name, m.value, m.threshold) for m in b.metrics]
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "refs" / "0123456789abcdef.json")


def test_a_training_reference_round_trips(tmp_path: Path, training_reference: Reference) -> None:
    loaded = load_reference(save_reference(training_reference, tmp_path))
    assert loaded.features is None and loaded.kind == "training_data"
    assert loaded.reference_id == training_reference.reference_id
    w = window(62, emb_direction=1)
    assert evaluate_window(w, loaded).score == evaluate_window(w, training_reference).score


def test_html_reports_are_written_when_asked(tmp_path: Path) -> None:
    # few embeddings: evidently's embeddings report plots a t-SNE of both sets; one OpenMP
    # thread, as its spinning threads cost 10x the CPU on a busy two-core machine
    reference = build_reference([window(i, i, n_emb=20) for i in range(3)])
    out = tmp_path / "html"
    with threadpool_limits(limits=1):
        v = evaluate_window(window(70, bright=60.0, n_emb=20), reference, html_dir=out)
    assert v.alarm and by_name(v)["embeddings"].value is not None
    names = sorted(p.name for p in out.iterdir())
    assert names == ["embedding_drift.html", "heartbeat_drift.html"]
    for name in names:
        text = (out / name).read_text(encoding="utf-8")
        assert len(text) > 1000 and "<html" in text.lower()
    # without html_dir nothing is written anywhere near
    evaluate_window(window(70, n_emb=20), reference)
    assert sorted(p.name for p in out.iterdir()) == names


def test_html_with_too_few_embeddings_for_a_plot_still_gives_a_verdict(tmp_path: Path) -> None:
    rng = np.random.default_rng(71)
    cfg = DriftConfig(min_embeddings=10)
    ref = reference_from_embeddings("cam9", embeddings(rng, 20), source="tiny", config=cfg)
    w = WindowData(camera_id="cam9", window_start=T0, window_end=T0,
                   embeddings=embeddings(rng, 10))
    v = evaluate_window(w, ref, cfg, html_dir=tmp_path)
    assert v.metrics[-1].value is not None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- small windows
@pytest.fixture(scope="module")
def small_emb_reference() -> Reference:
    return build_reference([window(50 + i, i, n_emb=20) for i in range(4)],
                           source="test: 4 stable windows, 20 embeddings each")


def test_stable_small_embedding_windows_do_not_alarm(small_emb_reference: Reference) -> None:
    """With 20 embeddings a window, the domain classifier is noisy; the window-size null
    (random reference subsets of that size) keeps stable windows quiet."""
    fired = []
    for seed in range(12):
        v = evaluate_window(window(200 + seed, 10 + seed, n_emb=20), small_emb_reference,
                            features="embeddings")
        emb = by_name(v)[EMBEDDINGS]
        assert emb.noise_floor is not None and emb.threshold >= 0.1
        if v.alarm:
            fired.append((seed, emb.value, emb.threshold))
    assert not fired


def test_a_new_scene_is_still_found_in_a_small_embedding_window(
    small_emb_reference: Reference,
) -> None:
    v = evaluate_window(window(300, 20, n_emb=20, emb_direction=5), small_emb_reference,
                        features="embeddings")
    assert v.verdict == "significant", by_name(v)[EMBEDDINGS]


def test_more_boxes_than_the_agent_can_report_are_refused() -> None:
    rng = np.random.default_rng(7)
    hb = heartbeat(rng, frames=10)
    hb["confidence_histogram"]["counts"][2] = 10 * 300 + 1  # > max_det boxes in 10 frames
    hb["class_counts"] = {"car": 10 * 300 + 1}
    wf = window_features([hb])
    assert "confidence" not in wf.histograms and not wf.class_counts
    assert any("confidence_histogram" in s for s in wf.skipped)
    assert any("class_counts" in s for s in wf.skipped)
