"""Active-learning queue, embeddings cache and the simulated annotator (fixed synthetic inputs)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from roadloop.data.frame_records import Detection, FrameRecord
from roadloop.labeling.active_learning import (
    ALWeights,
    FramePrediction,
    build_queue,
    covering_radius,
    k_center_greedy,
    rarity_score,
    uncertainty_score,
)


def _det(cls: str, conf: float, cid: int = 0) -> Detection:
    return Detection(class_id=cid, class_name=cls, confidence=conf, xyxy=(1, 1, 20, 20))


def _pred(
    fid: str, cam: str = "cam_a", confs=(0.9,), cls: str = "car", conds=()
) -> FramePrediction:
    return FramePrediction(
        frame_id=fid,
        camera_id=cam,
        image=Path(f"/x/{fid}.jpg"),
        detections=[_det(cls, c) for c in confs],
        conditions=list(conds),
    )


# --------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("method", ["margin", "entropy", "least_confidence"])
def test_uncertainty_orders_frames_and_handles_empty(method):
    sure = uncertainty_score([0.97, 0.95], method)
    unsure = uncertainty_score([0.97, 0.5], method)
    assert 0.0 <= sure < unsure <= 1.0
    assert uncertainty_score([], method) == 1.0  # documented: empty frame = worth a look
    assert uncertainty_score([], method, empty_score=0.2) == 0.2


def test_uncertainty_margin_values_and_topk_aggregation():
    assert uncertainty_score([0.5], "margin") == pytest.approx(1.0)
    assert uncertainty_score([1.0], "margin") == pytest.approx(0.0)
    assert uncertainty_score([0.5], "entropy") == pytest.approx(1.0)
    # top-3 mean: many confident boxes do not dilute three ambiguous ones
    crowd = [0.99] * 20 + [0.5, 0.5, 0.5]
    assert uncertainty_score(crowd, "margin", top_k=3) == pytest.approx(1.0)
    assert uncertainty_score([0.5, 0.9], "margin", top_k=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="method"):
        uncertainty_score([0.5], "bogus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- k-center


def _clusters(rng, centres, per=10, spread=0.05):
    return np.concatenate([c + spread * rng.standard_normal((per, len(c))) for c in centres])


def test_k_center_covering_radius_decreases_monotonically():
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((200, 8))
    labelled = rng.standard_normal((5, 8))
    picks = k_center_greedy(cand, labelled, 30)
    assert len(picks) == len(set(picks)) == 30
    radii = [covering_radius(cand, np.concatenate([labelled, cand[picks[:i]]])) for i in range(31)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(radii))
    assert radii[-1] < radii[0]


def test_k_center_picks_spread_out_points():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    cand = _clusters(rng, centres)
    picks = k_center_greedy(cand, None, 4)
    assert sorted(i // 10 for i in picks) == [0, 1, 2, 3]  # one per cluster
    # Clusters already labelled are not picked again.
    picks = k_center_greedy(cand, centres[:2], 2)
    assert sorted(i // 10 for i in picks) == [2, 3]
    assert k_center_greedy(cand, None, 0) == []
    assert len(k_center_greedy(cand, None, 999)) == len(cand)


# --------------------------------------------------------------------------- rarity


def test_rarity_prefers_rare_classes_cameras_conditions():
    freq = {"car": 900, "truck": 50}
    common = _pred("a", confs=(0.9,), cls="car")
    rare = _pred("b", confs=(0.9,), cls="truck")
    unseen = _pred("c", confs=(0.9,), cls="person")
    assert rarity_score(common, freq) < rarity_score(rare, freq) < rarity_score(unseen, freq)
    assert rarity_score(unseen, freq) == pytest.approx(1.0)
    low_conf = _pred("d", confs=(0.1,), cls="person")  # below the rarity confidence: ignored
    assert rarity_score(low_conf, freq) == 0.0
    cams = {"cam_a": 100, "cam_b": 2}
    assert rarity_score(_pred("e", cam="cam_b"), freq, cams) > rarity_score(_pred("f"), freq, cams)
    conds = {"day": 100, "night": 5}
    night = _pred("g", conds=("night",))
    day = _pred("h", conds=("day",))
    assert rarity_score(night, freq, None, conds) > rarity_score(day, freq, None, conds)


# --------------------------------------------------------------------------- queue


def _queue_inputs(n_a=30, n_b=6, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    preds, embs = [], []
    for i in range(n_a):
        preds.append(_pred(f"a{i:03d}", "cam_a", confs=(0.5 + 0.015 * i,)))
        embs.append(rng.standard_normal(dim))
    for i in range(n_b):  # cam_b: confident frames, low scores
        preds.append(_pred(f"b{i:03d}", "cam_b", confs=(0.99,)))
        embs.append(rng.standard_normal(dim))
    return preds, np.array(embs)


def test_build_queue_budget_ranks_components_and_summaries():
    preds, emb = _queue_inputs()
    q = build_queue(preds, emb, None, {"car": 10}, budget=10, seed=0)
    assert len(q) == 10 and [r.rank for r in q.rows] == list(range(1, 11))
    assert len(set(q.frame_ids)) == 10
    for r in q.rows:
        s = r.scores
        assert 0 <= s.uncertainty <= 1 and 0 <= s.diversity <= 1 and 0 <= s.rarity <= 1
        assert s.total == pytest.approx(0.4 * s.uncertainty + 0.3 * s.diversity + 0.3 * s.rarity)
        assert all(d.confidence >= 0.25 for d in r.pre_annotations)
    assert sum(q.per_camera().values()) == 10
    hist = q.histogram("total", bins=5)
    assert sum(hist["counts"]) == 10 and len(hist["edges"]) == 6
    assert set(q.expected_class_mix()) == {"car"}
    assert "cam_a" in q.to_markdown()
    # JSON round trip for the FiftyOne/Dagster side.
    assert type(q).model_validate_json(q.model_dump_json()).frame_ids == q.frame_ids


def test_build_queue_per_camera_fairness_floor():
    preds, emb = _queue_inputs()
    # Uncertainty alone would take only cam_a frames (cam_b frames are all confident).
    q = build_queue(
        preds, emb, None, {}, budget=10, strategy="uncertainty", per_camera_min_share=0.0
    )
    assert q.per_camera().get("cam_b", 0) == 0
    q = build_queue(preds, emb, None, {}, budget=10, strategy="uncertainty")  # default 0.5/n
    assert q.per_camera()["cam_b"] >= 2 and q.camera_floors == {"cam_a": 2, "cam_b": 2}
    q = build_queue(
        preds, emb, None, {}, budget=10, strategy="uncertainty", per_camera_min_share=0.4
    )
    assert q.per_camera()["cam_b"] == 4
    with pytest.raises(ValueError, match="per_camera_min_share"):
        build_queue(preds, emb, None, {}, budget=10, per_camera_min_share=1.5)


def test_combined_diversity_avoids_near_duplicates():
    # Ten copies of one very uncertain scene and ten distinct, slightly less uncertain frames.
    rng = np.random.default_rng(3)
    preds, embs = [], []
    base = rng.standard_normal(16)
    for i in range(10):
        preds.append(_pred(f"dup{i}", confs=(0.5,)))
        embs.append(base + 1e-3 * rng.standard_normal(16))
    for i in range(10):
        preds.append(_pred(f"uniq{i}", confs=(0.6,)))
        embs.append(rng.standard_normal(16))
    emb = np.array(embs)
    unc = build_queue(
        preds, emb, None, {}, budget=5, strategy="uncertainty", per_camera_min_share=0
    )
    assert all(f.startswith("dup") for f in unc.frame_ids)
    comb = build_queue(preds, emb, None, {}, budget=5, strategy="combined", per_camera_min_share=0)
    assert sum(f.startswith("dup") for f in comb.frame_ids) == 1
    # Diversity is selection-aware: it never grows along the queue for a fixed candidate set.
    divs = [r.scores.diversity for r in comb.rows]
    assert divs[0] == pytest.approx(1.0)
    # Already-labelled copies of the scene push it out entirely.
    comb = build_queue(preds, emb, base[None, :], {}, budget=5, per_camera_min_share=0)
    assert not any(f.startswith("dup") for f in comb.frame_ids)


def test_strategies_random_is_seeded_and_errors_are_clear():
    preds, emb = _queue_inputs()
    r1 = build_queue(preds, None, None, {}, budget=8, strategy="random", seed=1)
    r2 = build_queue(preds, None, None, {}, budget=8, strategy="random", seed=1)
    r3 = build_queue(preds, None, None, {}, budget=8, strategy="random", seed=2)
    assert r1.frame_ids == r2.frame_ids != r3.frame_ids
    with pytest.raises(ValueError, match="needs embeddings"):
        build_queue(preds, None, None, {}, budget=8, strategy="combined")
    with pytest.raises(ValueError, match="rows"):
        build_queue(preds, emb[:3], None, {}, budget=8)
    with pytest.raises(ValueError, match="strategy"):
        build_queue(preds, emb, None, {}, strategy="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate"):
        build_queue(preds + preds[:1], np.vstack([emb, emb[:1]]), None, {})
    assert len(build_queue([], None, None, {}, budget=5)) == 0
    # Weights are configurable; diversity-free combined needs no embeddings.
    w = ALWeights(uncertainty=1.0, diversity=0.0, rarity=0.0)
    q = build_queue(preds, None, None, {}, budget=3, weights=w, per_camera_min_share=0)
    assert q.weights == w and len(q) == 3
    with pytest.raises(ValueError):
        ALWeights(uncertainty=0, diversity=0, rarity=0)


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random-init YOLO11n checkpoint (no download, no shared data)."""
    from roadloop.models.training import configure_ultralytics

    d = tmp_path_factory.mktemp("model")
    configure_ultralytics(d / "ultralytics")
    from ultralytics import YOLO

    path = d / "tiny.pt"
    YOLO("yolo11n.yaml").save(str(path))
    return path


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = np.full((48, 64, 3), 20 * i, np.uint8)
        cv2.rectangle(img, (5 + 3 * i, 5), (30, 30 + i), (200, 30 * i % 255, 90), -1)
        p = folder / f"im{i}.jpg"
        cv2.imwrite(str(p), img)
        out.append(p)
    return out


def test_embeddings_cache_computes_only_missing_hashes(tiny_model: Path, tmp_path: Path):
    from roadloop.fsutil import sha256_file
    from roadloop.labeling.embeddings import cache_path, compute_embeddings

    imgs = _images(tmp_path / "imgs", 4)
    cache = tmp_path / "cache"
    t1 = compute_embeddings(
        tiny_model, imgs[:3], imgsz=64, cache_dir=cache, model_version="m1", batch=2
    )
    assert t1.computed == 3 and t1.vectors.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(t1.vectors, axis=1), 1.0, atol=1e-5)
    assert t1.keys == [sha256_file(p) for p in imgs[:3]]
    t2 = compute_embeddings(
        tiny_model, imgs, imgsz=64, cache_dir=cache, model_version="m1", batch=3
    )
    assert t2.computed == 1  # only the new frame
    np.testing.assert_allclose(t2.vectors[:3], t1.vectors, atol=1e-5)  # batch-independent
    t3 = compute_embeddings(tiny_model, imgs, imgsz=64, cache_dir=cache, model_version="m1")
    assert t3.computed == 0
    # Another model version has its own cache file.
    t4 = compute_embeddings(tiny_model, imgs[:1], imgsz=64, cache_dir=cache, model_version="m2")
    assert t4.computed == 1 and cache_path(cache, "m2").is_file()
    assert t2.matrix([t2.keys[3], t2.keys[0]]).shape == (2, t2.dim)


def test_embeddings_bad_inputs(tiny_model: Path, tmp_path: Path):
    from roadloop.errors import InvalidInputError, MissingDataError
    from roadloop.labeling.embeddings import cache_path, compute_embeddings

    imgs = _images(tmp_path / "imgs", 2)
    cache = tmp_path / "cache"
    compute_embeddings(tiny_model, imgs[:1], imgsz=64, cache_dir=cache, model_version="v")
    before = cache_path(cache, "v").read_bytes()
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xffnot really a jpeg")
    with pytest.raises(InvalidInputError, match="broken.jpg"):
        compute_embeddings(tiny_model, [imgs[1], bad], imgsz=64, cache_dir=cache, model_version="v")
    assert cache_path(cache, "v").read_bytes() == before  # cache untouched by the failed call
    with pytest.raises(MissingDataError, match="nope.jpg"):
        compute_embeddings(
            tiny_model, [tmp_path / "nope.jpg"], imgsz=64, cache_dir=cache, model_version="v"
        )
    # A corrupt cache file is moved aside (kept), then rebuilt.
    cache_path(cache, "v").write_bytes(b"garbage")
    t = compute_embeddings(tiny_model, imgs, imgsz=64, cache_dir=cache, model_version="v")
    assert t.computed == 2
    assert (cache / "v.npz.corrupt-0").read_bytes() == b"garbage"


# --------------------------------------------------------------------------- oracle


def _fake_source(root: Path) -> Path:
    """A manaus-like labelled source: names use manaus_v4's class names."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(
        "train: images/train\nval: images/val\nnames: [biker, car, cyclist, people, truck, kiosk]\n"
    )
    img = np.full((60, 80, 3), 120, np.uint8)
    cv2.imwrite(str(root / "images" / "train" / "f1.jpg"), img)
    (root / "labels" / "train" / "f1.txt").write_text(
        "3 0.5 0.5 0.1 0.2\n4 0.2 0.3 0.2 0.2\n5 0.7 0.7 0.1 0.1\n0 0.4 0.4 0.1 0.1\n"
    )
    return root


def _record(root: Path, labels_ref: Path | None) -> FrameRecord:
    return FrameRecord(
        frame_id="f1",
        camera_id="manaus_intersections",
        captured_at=datetime.now(UTC),
        source="replay:manaus_v4",
        labels_ref=str(labels_ref) if labels_ref else None,
        width=80,
        height=60,
    )


def test_oracle_maps_ground_truth_to_taxonomy_and_says_it_is_simulated(tmp_path: Path):
    from roadloop.labeling.oracle import OracleCannotAnswer, SimulatedAnnotator

    root = _fake_source(tmp_path / "manaus_v4")
    oracle = SimulatedAnnotator()
    ans = oracle.answer(_record(root, root / "labels" / "train" / "f1.txt"))
    assert ans.annotator == "oracle-simulation" and ans.simulated
    # The review store records ``annotator.name`` as ``annotated_by``: a simulated review
    # is stored under the simulation's name, never as a person's.
    assert oracle.name == ans.annotator
    assert [b.class_name for b in ans.boxes] == ["person", "truck", "two_wheeler"]
    assert [b.class_id for b in ans.boxes] == [4, 1, 3]
    assert len(ans.dropped_rows) == 1 and "kiosk" in ans.dropped_rows[0]
    with pytest.raises(OracleCannotAnswer, match="labels_ref"):
        oracle.answer(_record(root, None))


def test_oracle_labels_enter_curated_dataset(tmp_path: Path):
    from roadloop.data.datasets import build_curated_dataset, load_taxonomy, make_synthetic_dataset
    from roadloop.labeling.oracle import SimulatedAnnotator

    root = _fake_source(tmp_path / "manaus_v4")
    synth = make_synthetic_dataset(tmp_path / "synth", n_train=3, n_val=2, n_test=0, imgsz=64)
    oracle = SimulatedAnnotator()
    frame, _ans = oracle.labelled_frame(
        _record(root, root / "labels" / "train" / "f1.txt"),
        root / "images" / "train" / "f1.jpg",
        tmp_path / "reviewed",
    )
    ds = build_curated_dataset(
        [synth], tmp_path / "curated", load_taxonomy(), 0.0, extra_frames=[frame], progress=False
    )
    assert ds.source_counts["manaus_v4"]["train"] == 1
    label = tmp_path / "curated" / "labels" / "train" / "manaus_v4__f1.txt"
    assert [int(line.split()[0]) for line in label.read_text().splitlines()] == [4, 1, 3]
