"""``CameraDriftMonitor`` over in-memory sources: when a camera's reference is built, kept,
replaced and reported missing; how a shifted window alarms and what it leaves in the
``DriftEventStore``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from roadloop.monitoring.events import DriftEventStore
from roadloop.monitoring.models import DriftConfig
from roadloop.monitoring.monitor import CameraDriftMonitor
from roadloop.monitoring.reference import load_reference

from .drift_factories import DUSK, NIGHT, MemorySources, training_set

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
LENGTH = timedelta(minutes=15)
NOW = datetime(2026, 11, 21, tzinfo=UTC)
CAM = "cam-a"


def w(i: int) -> datetime:
    return T0 + i * LENGTH


def make_monitor(tmp_path: Path, sources: MemorySources, **kw) -> CameraDriftMonitor:
    kw.setdefault("reference_windows", 3)
    return CameraDriftMonitor(sources=sources, reference_dir=tmp_path / "refs",
                              events=DriftEventStore(tmp_path / "drift" / "events.db"),
                              window_minutes=15, **kw)


def index(tmp_path: Path, camera: str = CAM) -> dict[str, str]:
    path = tmp_path / "refs" / camera / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def iso(*idx: int) -> list[str]:
    return [w(i).isoformat() for i in idx]


def test_reference_waits_for_healthy_windows_then_is_built_stored_and_reused(
        tmp_path: Path) -> None:
    src = MemorySources(embedding_model=None)
    for i in range(5):
        src.add_window(CAM, w(i), seed=i)
    mon = make_monitor(tmp_path, src)

    for i in range(3):  # windows 0, 1, 2 have 0, 1, 2 windows of history
        r = mon.evaluate(CAM, w(i), now=NOW)
        assert r.verdict.verdict == "no_reference"
        assert "too few healthy windows" in r.verdict.reason
        assert r.verdict.reference is None and r.events == []
        assert r.heartbeats == 4
        assert index(tmp_path) == {}

    built = mon.evaluate(CAM, w(3), now=NOW)
    assert built.reference_status.startswith("built reference")
    ref_id = built.verdict.reference["reference_id"]
    assert index(tmp_path) == {"model-a|None": ref_id}
    stored = load_reference(tmp_path / "refs" / CAM / f"{ref_id}.json")
    assert stored.reference_id == ref_id and stored.kind == "camera_windows"
    assert stored.windows == iso(0, 1, 2)  # the windows before the evaluated one
    assert stored.model_version == "model-a"
    assert stored.features is not None and stored.features.frames == 3 * 4 * 80
    assert stored.fps_median == pytest.approx(80 / 30, rel=1e-3)
    assert built.verdict.verdict == "ok"
    assert {m.name: m.verdict for m in built.verdict.metrics if m.family == "heartbeats"} == {
        "brightness": "ok", "sharpness": "ok", "detections_per_frame": "ok", "confidence": "ok",
        "class_mix": "ok", "low_confidence_share": "ok"}
    # no embedding model: the embedding metric says so instead of guessing
    emb = [m for m in built.verdict.metrics if m.family == "embeddings"]
    assert [m.verdict for m in emb] == ["no_reference"]
    assert src.calls["frames"] == 0 and src.calls["embed"] == 0

    later = mon.evaluate(CAM, w(4), now=NOW)
    assert later.reference_status == f"reference {ref_id}"
    assert later.verdict.reference["reference_id"] == ref_id
    assert later.verdict.verdict == "ok"
    assert sorted(p.name for p in (tmp_path / "refs" / CAM).iterdir()) == sorted(
        ["index.json", f"{ref_id}.json"])
    assert mon.events.verdict(CAM, w(4)).reference["reference_id"] == ref_id


def test_rollout_starts_a_new_reference_without_the_mixed_window(tmp_path: Path) -> None:
    src = MemorySources(embedding_model=None)
    for i in range(4):
        src.add_window(CAM, w(i), seed=i, versions=("model-a",))
    # window 4: the rollout lands mid-window (2 heartbeats of model-a, 4 of model-b)
    src.add_window(CAM, w(4), seed=4, count=6, versions=("model-a", "model-b", "model-b"))
    for i in range(5, 9):
        src.add_window(CAM, w(i), seed=i, versions=("model-b",))
    mon = make_monitor(tmp_path, src)

    first = mon.evaluate(CAM, w(3), now=NOW)
    ref_a = first.verdict.reference["reference_id"]

    mixed = mon.evaluate(CAM, w(4), now=NOW)
    assert mixed.verdict.model_version == "model-b"  # the model serving most of the window
    assert mixed.verdict.verdict == "no_reference"  # model-a's reference does not judge it

    for i in (5, 6, 7):  # 0, 1, 2 pure model-b windows before each: counting the mixed
        r = mon.evaluate(CAM, w(i), now=NOW)  # window would have built one at window 7
        assert r.verdict.verdict == "no_reference", (i, r.reference_status)

    new = mon.evaluate(CAM, w(8), now=NOW)
    ref_b = new.verdict.reference["reference_id"]
    assert new.reference_status.startswith("built reference") and ref_b != ref_a
    stored = load_reference(tmp_path / "refs" / CAM / f"{ref_b}.json")
    assert stored.windows == iso(5, 6, 7) and stored.model_version == "model-b"
    assert index(tmp_path) == {"model-a|None": ref_a, "model-b|None": ref_b}

    # model-a's windows keep being judged against model-a's reference
    again = mon.evaluate(CAM, w(3), now=NOW)
    assert again.reference_status == f"reference {ref_a}"


def test_unhealthy_windows_are_left_out_of_the_reference(tmp_path: Path) -> None:
    src = MemorySources(embedding_model=None)
    src.add_window(CAM, w(0), seed=0)
    src.add_window(CAM, w(1), seed=1, frames=10)  # 40 frames: under min_frames (100)
    src.add_window(CAM, w(2), seed=2, latency_p95_ms=350.0)  # P95 over 200 ms: critical
    src.add_window(CAM, w(3), seed=3, errors=10)  # 12.5 % of frames failed: critical
    for i in range(4, 7):
        src.add_window(CAM, w(i), seed=i)
    mon = make_monitor(tmp_path, src)

    early = mon.evaluate(CAM, w(5), now=NOW)  # healthy before it: windows 0 and 4
    assert early.verdict.verdict == "no_reference"
    r = mon.evaluate(CAM, w(6), now=NOW)
    assert r.reference_status.startswith("built reference")
    assert r.verdict.reference["windows"] == 3
    assert r.verdict.reference["first_window"] == w(0).isoformat()
    ref = load_reference(tmp_path / "refs" / CAM / f"{r.verdict.reference['reference_id']}.json")
    assert ref.windows == iso(0, 4, 5)

    # the unhealthy windows themselves are still judged, and their checks say why
    slow = mon.evaluate(CAM, w(2), now=NOW)
    assert {c.name: c.severity for c in slow.operations}["p95_latency"] == "critical"
    failing = mon.evaluate(CAM, w(3), now=NOW)
    assert {c.name: c.severity for c in failing.operations}["error_rate"] == "critical"
    few = mon.evaluate(CAM, w(1), now=NOW)  # frame features unjudged; its 200 boxes are
    brightness = next(m for m in few.verdict.metrics if m.name == "brightness")
    assert brightness.verdict == "not_enough_data"
    assert brightness.reason == "window has 40 samples (< 100)"


def test_reference_windows_under_the_config_minimum_still_build(tmp_path: Path) -> None:
    """ROADLOOP_DRIFT_REFERENCE_WINDOWS=2 (allowed) with the config's minimum of 3 windows:
    the reference takes 3 windows rather than never being built."""
    src = MemorySources(embedding_model=None)
    for i in range(5):
        src.add_window(CAM, w(i), seed=i)
    mon = make_monitor(tmp_path, src, reference_windows=2,
                       config=DriftConfig(min_reference_windows=3))
    assert mon.evaluate(CAM, w(2), now=NOW).verdict.verdict == "no_reference"
    r = mon.evaluate(CAM, w(3), now=NOW)
    assert r.reference_status.startswith("built reference"), r.reference_status
    assert r.verdict.reference["windows"] == 3


def test_reference_deleted_by_hand_is_named_then_rebuilt(tmp_path: Path) -> None:
    src = MemorySources(embedding_model=None)
    for i in range(6):
        src.add_window(CAM, w(i), seed=i)
    mon = make_monitor(tmp_path, src)
    html = tmp_path / "html" / "w4"
    ref_id = mon.evaluate(CAM, w(3), now=NOW).verdict.reference["reference_id"]
    judged = mon.evaluate(CAM, w(4), now=NOW, html_dir=html)
    assert [p.name for p in judged.html] == ["heartbeat_drift.html"]

    path = tmp_path / "refs" / CAM / f"{ref_id}.json"
    path.unlink()
    gone = mon.evaluate(CAM, w(4), now=NOW, html_dir=html)
    assert gone.verdict.verdict == "no_reference"
    assert ref_id in gone.verdict.reason and "no longer exists" in gone.verdict.reason
    assert str(path) in gone.verdict.reason
    assert gone.html == []  # the previous evaluation's report is not this verdict's
    assert mon.events.verdict(CAM, w(4)).verdict == "no_reference"
    assert index(tmp_path) == {}

    rebuilt = mon.evaluate(CAM, w(5), now=NOW)
    assert rebuilt.reference_status.startswith("built reference")
    assert rebuilt.verdict.verdict == "ok"
    assert path.is_file()  # the same windows make the same reference again
    assert index(tmp_path) == {"model-a|None": rebuilt.verdict.reference["reference_id"]}


def test_night_window_alarms_and_its_events_are_replaced_then_cleared(tmp_path: Path) -> None:
    src = MemorySources(embedding_model=None)
    for i in range(3):
        src.add_window(CAM, w(i), seed=i)
    src.add_window(CAM, w(3), seed=3, scene=NIGHT)
    src.add_window(CAM, w(4), seed=4, scene=DUSK)
    mon = make_monitor(tmp_path, src)
    store = mon.events

    night = mon.evaluate(CAM, w(3), now=NOW)
    v = night.verdict
    ref_id = v.reference["reference_id"]
    assert v.verdict == "significant" and v.alarm
    assert v.metric == "brightness" and v.score >= 0.2 and v.threshold == pytest.approx(0.1)
    by_metric = {e.metric: e.severity for e in night.events}
    assert by_metric["brightness"] == "significant"
    assert by_metric["sharpness"] == "significant"
    assert set(by_metric) <= {"brightness", "sharpness", "confidence", "low_confidence_share",
                              "detections_per_frame", "class_mix"}
    stored = store.events(CAM)
    assert {(e.metric, e.severity) for e in stored} == set(by_metric.items())
    for e in stored:
        assert e.window_start == w(3) and e.reference_id == ref_id
        assert e.model_version == "model-a" and e.value >= e.threshold
        assert e.created_at == NOW

    dusk = mon.evaluate(CAM, w(4), now=NOW)
    assert dusk.verdict.verdict == "minor" and dusk.verdict.metric == "brightness"
    assert [(e.metric, e.severity) for e in dusk.events] == [("brightness", "minor")]

    # evaluated again: the window's events are replaced, not added
    later = NOW + timedelta(hours=1)
    again = mon.evaluate(CAM, w(3), now=later)
    assert len(again.events) == len(night.events)
    w3 = [e for e in store.events(CAM) if e.window_start == w(3)]
    assert len(w3) == len(night.events) and {e.created_at for e in w3} == {later}

    # the window's data corrected (day after all): judged ok, its events are gone
    src.replace_window(CAM, w(3), seed=3)
    ok = mon.evaluate(CAM, w(3), now=later)
    assert ok.verdict.verdict == "ok" and ok.events == []
    assert store.verdict(CAM, w(3)).verdict == "ok"
    left = store.events(CAM)
    assert [(e.window_start, e.metric) for e in left] == [(w(4), "brightness")]
    assert store.events("another-camera") == []


def test_camera_windows_reference_judges_frame_embeddings(tmp_path: Path) -> None:
    src = MemorySources(embedding_model="embedder-1")
    for i in range(3):
        src.add_window(CAM, w(i), seed=i, frames_per_window=30)
    src.add_window(CAM, w(3), seed=3, scene=NIGHT, frames_per_window=30)
    mon = make_monitor(tmp_path, src, max_frames_per_window=24)

    r = mon.evaluate(CAM, w(3), now=NOW)
    ref_id = r.verdict.reference["reference_id"]
    assert index(tmp_path) == {"model-a|embedder-1": ref_id}
    assert (tmp_path / "refs" / CAM / f"{ref_id}.npz").is_file()
    assert r.verdict.reference["embeddings"] == 3 * 24  # each window spread to 24 frames
    assert r.frames_embedded == 24
    emb = next(m for m in r.verdict.metrics if m.name == "embeddings")
    assert emb.verdict == "significant" and emb.n_current == 24 and emb.n_reference == 72
    assert "embeddings" in {e.metric for e in r.events}


def test_new_camera_is_judged_against_the_training_embeddings(tmp_path: Path) -> None:
    train = (training_set(100), "curated train split (100 frames)")
    src = MemorySources(embedding_model="embedder-1", training=train)
    src.add_window("cam-new", w(0), seed=0, frames_per_window=24, scene=NIGHT)
    mon = make_monitor(tmp_path, src)

    r = mon.evaluate("cam-new", w(0), now=NOW)
    assert r.reference_status.startswith("training data (curated train split")
    v = r.verdict
    assert v.reference["kind"] == "training_data" and v.reference["embeddings"] == 100
    assert "embeddings" in v.reference["noise_floor"]
    hb = [m for m in v.metrics if m.family == "heartbeats"]
    assert hb and {m.verdict for m in hb} == {"no_reference"}
    assert all("holds no heartbeats" in m.reason for m in hb)
    assert v.verdict == "significant" and v.metric == "embeddings" and r.frames_embedded == 24
    assert [e.metric for e in r.events] == ["embeddings"]
    assert r.events[0].reference_id == v.reference["reference_id"]
    assert index(tmp_path, "cam-new") == {}  # a training-data reference is not the camera's
    assert not (tmp_path / "refs" / "cam-new").exists()


def test_noise_floors_do_not_fit_the_report_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Floors score embeddings as evidently's EmbeddingsDriftMetric does, without its t-SNE
    plot (seconds of CPU per floor, never shown)."""
    import evidently.metrics.data_drift.embeddings_drift as ed

    from roadloop.monitoring.reference import reference_from_embeddings

    def no_tsne(*a, **kw):
        raise AssertionError("t-SNE fitted for a noise floor")

    monkeypatch.setattr(ed, "TSNE", no_tsne)
    ref = reference_from_embeddings("cam", training_set(100), source="train")
    assert 0.0 <= ref.noise_floor["embeddings"] < 1.0


def test_without_an_embedding_model_training_data_is_not_asked_for(tmp_path: Path) -> None:
    src = MemorySources(embedding_model=None, training=(training_set(100), "train"))
    src.add_window("cam-new", w(0), seed=0, frames_per_window=16)
    r = make_monitor(tmp_path, src).evaluate("cam-new", w(0), now=NOW)
    assert r.verdict.verdict == "no_reference" and r.frames_embedded == 0
    assert src.calls["training_embeddings"] == 0 and src.calls["embed"] == 0


def test_silent_window_is_critical_and_not_enough_data(tmp_path: Path) -> None:
    src = MemorySources(embedding_model=None)
    for i in range(3):
        src.add_window(CAM, w(i), seed=i)
    mon = make_monitor(tmp_path, src)
    r = mon.evaluate(CAM, w(3), now=NOW)  # no heartbeat at all in window 3
    assert r.heartbeats == 0
    assert {c.name: c.severity for c in r.operations} == {"silent": "critical"}
    assert r.verdict.verdict == "not_enough_data"
    assert "no heartbeat" in r.verdict.reason
    assert r.events == []
