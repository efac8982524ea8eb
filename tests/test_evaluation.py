"""Evaluation on real frames and the shared atl_v2 checkpoint, kept tiny (6 frames, 320 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.models.training import configure_ultralytics

from .helpers import require_shared

IMGSZ = 320  # the shared ONNX export is static 1x3x320x320
ATL_NAMES = ["bike", "bus", "car", "truck"]
# manaus_v4 ids -> atl ids (biker/cyclist -> bike, car, truck; people has no atl class)
MANAUS_TO_ATL = {0: 0, 1: 2, 2: 0, 4: 3}


@pytest.fixture(scope="module")
def models(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = shared_dir / "models"
    pt, onnx = d / "atl_v2_yolo11n_320.pt", d / "atl_v2_yolo11n_320.onnx"
    require_shared(pt, onnx)
    configure_ultralytics()
    return {"pt": pt, "onnx": onnx}


def _add_frame(
    src_img: Path, src_lbl: Path, dst_dir: Path, name: str, class_map: dict[int, int] | None
) -> None:
    import cv2

    img = cv2.imread(str(src_img))
    scale = 320 / max(img.shape[:2])  # labels are normalised, so resizing keeps them valid
    img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)))
    cv2.imwrite(str(dst_dir / "images" / "test" / f"{name}.jpg"), img)
    rows = []
    for line in src_lbl.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        c = int(parts[0]) if class_map is None else class_map.get(int(parts[0]))
        if c is not None:
            rows.append(" ".join([str(c), *parts[1:5]]))
    (dst_dir / "labels" / "test" / f"{name}.txt").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def tiny_dataset(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 atl_v2 + 2 manaus_v4 test frames (manaus labels mapped onto atl classes), 320 px."""
    root = tmp_path_factory.mktemp("tiny") / "ds"
    (root / "images" / "test").mkdir(parents=True)
    (root / "labels" / "test").mkdir(parents=True)
    for source, n, cmap in (("atl_v2", 4, None), ("manaus_v4", 2, MANAUS_TO_ATL)):
        src = shared_dir / "datasets" / source
        for img in sorted((src / "images" / "test").iterdir())[:n]:
            _add_frame(
                img,
                src / "labels" / "test" / f"{img.stem}.txt",
                root,
                f"{source}__{img.stem}",
                cmap,
            )
    (root / "data.yaml").write_text(
        yaml.safe_dump(
            {
                "train": "images/test",
                "val": "images/test",
                "test": "images/test",
                "names": dict(enumerate(ATL_NAMES)),
            }
        )
    )
    return root


def _label_classes(ds: Path) -> set[int]:
    return {
        int(line.split()[0])
        for f in (ds / "labels" / "test").glob("*.txt")
        for line in f.read_text().splitlines()
        if line.strip()
    }


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_evaluate_detector_pt_and_onnx(models, tiny_dataset: Path, fmt: str) -> None:
    from roadloop.evaluation.accuracy import evaluate_detector

    m = evaluate_detector(models[fmt], tiny_dataset / "data.yaml", imgsz=IMGSZ)
    for v in (
        m.map50,
        m.map50_95,
        m.precision,
        m.recall,
        m.f1,
        *m.per_class_ap50.values(),
        *m.per_class_ap50_95.values(),
    ):
        assert 0.0 <= v <= 1.0
    assert m.map50_95 <= m.map50
    rows = [
        line
        for f in (tiny_dataset / "labels" / "test").glob("*.txt")
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    assert m.n_images == 6 and m.n_instances == len(rows) > 0
    # Count errors are means over the 6 frames of whole-box differences; the all-class
    # error cannot exceed the per-class errors added up (triangle inequality).
    for v in (m.count_mae, *m.per_class_count_mae.values()):
        assert v >= 0 and v * m.n_images == pytest.approx(round(v * m.n_images))
    assert m.count_mae <= sum(m.per_class_count_mae.values()) + 1e-9
    assert set(m.per_class_count_mae) == set(ATL_NAMES)  # every class has a count error
    present = {ATL_NAMES[c] for c in _label_classes(tiny_dataset)}
    assert set(m.per_class_ap50) == present == set(m.per_class_ap50_95)
    assert set(m.absent_classes) == set(ATL_NAMES) - present  # absent: reported, not scored 0
    # Support per class (what the quality floor needs to judge a class): the labelled boxes.
    per_class = {name: sum(1 for r in rows if int(r.split()[0]) == c)
                 for c, name in enumerate(ATL_NAMES)}
    assert m.per_class_instances == per_class and sum(per_class.values()) == m.n_instances
    assert m.f1 == pytest.approx(2 * m.precision * m.recall / (m.precision + m.recall), abs=1e-9)
    # The trained model finds cars: the box count error is below the number of boxes.
    assert m.count_mae < m.n_instances / m.n_images
    # The dataset folder is left untouched (no cache, no run folders).
    assert sorted(p.name for p in tiny_dataset.iterdir()) == ["data.yaml", "images", "labels"]


def test_pt_and_onnx_agree(models, tiny_dataset: Path) -> None:
    from roadloop.evaluation.accuracy import evaluate_detector

    a = evaluate_detector(models["pt"], tiny_dataset / "data.yaml", imgsz=IMGSZ)
    b = evaluate_detector(models["onnx"], tiny_dataset / "data.yaml", imgsz=IMGSZ)
    assert abs(a.map50 - b.map50) < 0.03
    assert abs(a.count_mae - b.count_mae) <= 1.0


@pytest.fixture(scope="module")
def dynamic_onnx(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's ONNX format: dynamic batch, static spatial size (imgsz 160 to stay cheap)."""
    export = pytest.importorskip("roadloop.models.export")
    out = tmp_path_factory.mktemp("export") / "model_160.onnx"
    export.export_onnx(models["pt"], out, imgsz=160)
    return out


def test_dynamic_batch_onnx(dynamic_onnx: Path, tiny_dataset: Path) -> None:
    """Ultralytics treats a dynamic-batch ONNX as fully dynamic (rectangular letterbox);
    evaluation must still feed it square frames."""
    from roadloop.evaluation.accuracy import evaluate_detector
    from roadloop.evaluation.latency import measure_latency

    m = evaluate_detector(dynamic_onnx, tiny_dataset / "data.yaml", imgsz=160)
    assert m.n_images == 6 and 0 <= m.map50_95 <= m.map50 <= 1
    stats = measure_latency(
        dynamic_onnx, imgsz=160, batch_sizes=(1, 2), warmup=1, runs=3, threads=1
    )
    assert [s.batch for s in stats] == [1, 2]


def test_missing_model_file_names_it(tiny_dataset: Path, tmp_path: Path) -> None:
    from roadloop.evaluation.accuracy import evaluate_detector
    from roadloop.evaluation.latency import measure_latency

    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(MissingDataError, match=str(missing)) as exc:
        evaluate_detector(missing, tiny_dataset / "data.yaml", imgsz=IMGSZ)
    assert exc.value.path == missing
    with pytest.raises(MissingDataError, match="model.onnx"):
        measure_latency(tmp_path / "model.onnx", imgsz=IMGSZ)


def test_bad_inputs_are_named(models, tiny_dataset: Path, tmp_path: Path) -> None:
    from roadloop.evaluation.accuracy import evaluate_detector

    with pytest.raises(MissingDataError, match="data.yaml"):
        evaluate_detector(models["pt"], tmp_path / "data.yaml", imgsz=IMGSZ)
    # the ONNX export has a static 320x320 input
    with pytest.raises(InvalidInputError, match="imgsz=160") as exc:
        evaluate_detector(models["onnx"], tiny_dataset / "data.yaml", imgsz=160)
    assert exc.value.path == models["onnx"]
    # a model whose class list does not match the data
    five = tmp_path / "five.yaml"
    five.write_text(
        yaml.safe_dump(
            {
                "path": str(tiny_dataset),
                "train": "images/test",
                "val": "images/test",
                "test": "images/test",
                "names": dict(enumerate(ATL_NAMES + ["person"])),
            }
        )
    )
    with pytest.raises(InvalidInputError, match="4 classes"):
        evaluate_detector(models["pt"], five, imgsz=IMGSZ)
    # an empty / garbage model file
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(InvalidInputError, match="junk.onnx"):
        evaluate_detector(junk, tiny_dataset / "data.yaml", imgsz=IMGSZ)


def test_split_by_source(models, tiny_dataset: Path, tmp_path: Path) -> None:
    from roadloop.evaluation.accuracy import evaluate_detector
    from roadloop.evaluation.inputs import split_images
    from roadloop.evaluation.testsets import split_by_source

    out = split_by_source(tiny_dataset, "test", tmp_path / "sources")
    assert set(out) == {"all", "atl_v2", "manaus_v4"}
    counts = {k: len(split_images(v, "test")) for k, v in out.items()}
    assert counts == {"all": 6, "atl_v2": 4, "manaus_v4": 2}
    for img in (out["manaus_v4"].parent / "images" / "test").iterdir():
        assert img.is_symlink() and img.name.startswith("manaus_v4__")
        assert img.resolve().parent == (tiny_dataset / "images" / "test").resolve()
        lbl = out["manaus_v4"].parent / "labels" / "test" / f"{img.stem}.txt"
        assert lbl.read_text() == (tiny_dataset / "labels" / "test" / f"{img.stem}.txt").read_text()
    m = evaluate_detector(models["onnx"], out["atl_v2"], imgsz=IMGSZ)
    assert m.n_images == 4
    # Rebuilding replaces the folders cleanly; nothing temporary is left behind.
    split_by_source(tiny_dataset, "test", tmp_path / "sources")
    assert sorted(p.name for p in (tmp_path / "sources").iterdir()) == [
        "all",
        "atl_v2",
        "manaus_v4",
    ]


def test_one_model_on_several_test_sets_scores_each_as_alone(
    models, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The benchmark loads a model once for all its test sets; the figures stay each set's."""
    from roadloop.evaluation.accuracy import evaluate_detector, evaluate_detector_on_sets
    from roadloop.evaluation.testsets import split_by_source

    sets = split_by_source(tiny_dataset, "test", tmp_path / "sources")
    together = evaluate_detector_on_sets(models["onnx"], sets, imgsz=IMGSZ)
    assert list(together) == list(sets)
    assert {k: m.n_images for k, m in together.items()} == {"all": 6, "atl_v2": 4, "manaus_v4": 2}
    for name, yml in sets.items():
        alone = evaluate_detector(models["onnx"], yml, imgsz=IMGSZ)
        assert together[name] == alone, name
    # Every YAML is checked before any set is scored: a missing one fails first, named.
    with pytest.raises(MissingDataError, match="gone.yaml"):
        evaluate_detector_on_sets(models["onnx"], {**sets, "gone": tmp_path / "gone.yaml"},
                                  imgsz=IMGSZ)


def test_split_by_source_errors(tmp_path: Path) -> None:
    from roadloop.errors import EmptyDatasetError
    from roadloop.evaluation.testsets import split_by_source

    with pytest.raises(MissingDataError, match="data.yaml"):
        split_by_source(tmp_path, "test", tmp_path / "out")
    (tmp_path / "images" / "test").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("train: images/test\nval: images/test\nnames: [car]\n")
    with pytest.raises(EmptyDatasetError):
        split_by_source(tmp_path, "test", tmp_path / "out")


def test_robustness_slices(tiny_dataset: Path, tmp_path: Path) -> None:
    import cv2

    from roadloop.evaluation.inputs import read_class_names
    from roadloop.evaluation.testsets import SLICE_NAMES, make_robustness_slices

    out = make_robustness_slices(tiny_dataset, "test", tmp_path / "slices", seed=0)
    assert list(out) == list(SLICE_NAMES)
    originals = sorted((tiny_dataset / "images" / "test").iterdir())
    for kind, data_yaml in out.items():
        assert read_class_names(data_yaml) == ATL_NAMES
        root = data_yaml.parent
        for src in originals:
            a = cv2.imread(str(src)).astype(np.float32)
            b = cv2.imread(str(root / "images" / "test" / src.name)).astype(np.float32)
            assert a.shape == b.shape
            assert np.abs(a - b).mean() > 2.0, f"{kind} barely changed {src.name}"
            if kind == "low_light":
                assert b.mean() < a.mean()
            lbl = f"{src.stem}.txt"
            assert (root / "labels" / "test" / lbl).read_bytes() == (
                tiny_dataset / "labels" / "test" / lbl
            ).read_bytes()
    # fog is denser at the top of the frame than at the bottom
    src = originals[0]
    a = cv2.imread(str(src)).astype(np.float32)
    f = cv2.imread(str(out["fog"].parent / "images" / "test" / src.name)).astype(np.float32)
    h = a.shape[0]
    haze = 0.8 * 255
    top = np.abs(f[: h // 5] - haze).mean() / max(np.abs(a[: h // 5] - haze).mean(), 1e-6)
    bottom = np.abs(f[-h // 5 :] - haze).mean() / max(np.abs(a[-h // 5 :] - haze).mean(), 1e-6)
    assert top < bottom

    # Deterministic by seed, per frame; another seed draws other noise.
    again = make_robustness_slices(
        tiny_dataset, "test", tmp_path / "again", slices=("noise",), seed=0
    )
    other = make_robustness_slices(
        tiny_dataset, "test", tmp_path / "other", slices=("noise",), seed=1
    )
    name = originals[0].name
    n0 = cv2.imread(str(out["noise"].parent / "images" / "test" / name))
    assert np.array_equal(n0, cv2.imread(str(again["noise"].parent / "images" / "test" / name)))
    assert not np.array_equal(n0, cv2.imread(str(other["noise"].parent / "images" / "test" / name)))

    with pytest.raises(ValueError, match="snow"):
        make_robustness_slices(tiny_dataset, "test", tmp_path / "x", slices=("snow",))


def test_robustness_slice_bad_image_leaves_nothing(tiny_dataset: Path, tmp_path: Path) -> None:
    import shutil

    from roadloop.evaluation.testsets import make_robustness_slices

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    bad = ds / "images" / "test" / "atl_v2__broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "slices"
    with pytest.raises(InvalidInputError, match="atl_v2__broken.jpg"):
        make_robustness_slices(ds, "test", out, slices=("blur",))
    assert list(out.iterdir()) == []  # no half-built slice


def test_measure_latency(models) -> None:
    from roadloop.evaluation.latency import measure_latency

    pt = measure_latency(models["pt"], imgsz=IMGSZ, batch_sizes=(1, 2), warmup=1, runs=5, threads=1)
    assert [s.batch for s in pt] == [1, 2]
    # the shared ONNX has a static batch of 1: other batch sizes are skipped, not failed
    ox = measure_latency(
        models["onnx"], imgsz=IMGSZ, batch_sizes=(1, 2), warmup=1, runs=5, threads=1
    )
    assert [s.batch for s in ox] == [1]
    for s in pt + ox:
        assert 0 < s.p50_ms <= s.p95_ms <= s.p99_ms
        assert s.frames_per_s == pytest.approx(s.batch / (s.mean_ms / 1000))
        assert s.runs == 5 and s.warmup == 1 and s.threads == 1 and s.device == "cpu"


def test_benchmark_small(models, tiny_dataset: Path, tmp_path: Path) -> None:
    from roadloop.evaluation.benchmark import benchmark
    from roadloop.evaluation.results import BenchmarkResults, LatencyConfig, ModelSet
    from roadloop.evaluation.testsets import make_robustness_slices, split_by_source

    sets = split_by_source(tiny_dataset, "test", tmp_path / "sets")
    sets.update(
        make_robustness_slices(tiny_dataset, "test", tmp_path / "slices", slices=("noise",))
    )
    cand = ModelSet(version="cand-1", pytorch=models["pt"], onnx_fp32=models["onnx"])
    prod = ModelSet(version="prod-0", pytorch=models["pt"])
    lat = LatencyConfig(batch_sizes=(1,), warmup=1, runs=3, threads=1)
    res = benchmark(
        {"candidate": cand, "production": prod}, sets, imgsz=IMGSZ, latency=lat, progress=False
    )

    assert len(res.rows) == 3 * 4  # (cand pt, cand onnx, prod pt) x (all, atl_v2, manaus_v4, noise)
    assert res.test_set_kinds == {
        "all": "all",
        "atl_v2": "source",
        "manaus_v4": "source",
        "noise": "slice",
    }
    assert res.get("candidate", "onnx_fp32", "manaus_v4").n_images == 2
    assert res.get("production", "onnx_fp32", "all") is None
    assert res.latency("candidate", "onnx_fp32", 1).runs == 3
    assert res.latency("production", "pytorch", 4) is None
    assert res.formats("candidate") == ["pytorch", "onnx_fp32"]
    # JSON round trip
    back = BenchmarkResults.model_validate_json(res.model_dump_json())
    assert back == res
    assert json.loads(res.model_dump_json())["models"]["candidate"]["version"] == "cand-1"


def test_benchmark_fails_fast_on_missing_model(models, tiny_dataset: Path, tmp_path: Path) -> None:
    from roadloop.evaluation.benchmark import benchmark
    from roadloop.evaluation.results import ModelSet

    gone = tmp_path / "int8.onnx"
    cand = ModelSet(version="c", pytorch=models["pt"], onnx_int8=gone)
    with pytest.raises(MissingDataError, match="int8.onnx") as exc:
        benchmark(
            {"candidate": cand}, {"all": tiny_dataset / "data.yaml"}, imgsz=IMGSZ, progress=False
        )
    assert "candidate ONNX INT8" in str(exc.value)


def test_benchmark_counts_on_tracks(models, tiny_dataset: Path, tmp_path: Path) -> None:
    """The benchmark's counting rows are what the agent's detector + counter give on the
    recorded scene, scored by evaluate_counter directly."""
    from edge_agent.inference import Detection, OnnxDetector
    from edge_agent.traffic import parse_traffic_section
    from edge_agent.traffic.counter import TrafficCounter
    from roadloop.evaluation.benchmark import benchmark
    from roadloop.evaluation.counting_accuracy import evaluate_counter
    from roadloop.evaluation.results import CountingConfig, LatencyConfig, ModelSet
    from roadloop.evaluation.traffic_scenes import (
        CLASS_NAMES,
        TrafficScene,
        build_scene,
        render_frames,
    )

    cfg = CountingConfig(duration_s=4.0, fps=5.0, width=320, height=192, seed=2)
    res = benchmark(
        {"candidate": ModelSet(version="c1", onnx_fp32=models["onnx"])},
        {"all": tiny_dataset / "data.yaml"},
        imgsz=IMGSZ, latency=LatencyConfig(enabled=False), progress=False,
        counting=cfg, crop_dataset=tiny_dataset,
    )
    assert [(r.model, r.format) for r in res.counting_rows] == [("candidate", "onnx_fp32")]
    assert res.counting_config == cfg
    scene_cfg = TrafficScene.model_validate(res.counting_scene)
    assert scene_cfg.crop_datasets == (tiny_dataset,) and scene_cfg.crop_split == "test"
    assert (scene_cfg.seed, scene_cfg.width, scene_cfg.fps) == (2, 320, 5.0)

    scene = build_scene(scene_cfg)
    detector = OnnxDetector(models["onnx"])  # the agent's defaults: conf 0.25, model imgsz
    atl = {"bike": "two_wheeler", "bus": "bus", "car": "car", "truck": "truck"}
    dets = [
        [Detection(CLASS_NAMES.index(atl[d.class_name]), d.confidence, d.x1, d.y1, d.x2, d.y2,
                   atl[d.class_name]) for d in detector.detect(frame)]
        for frame in render_frames(scene)
    ]
    counter = TrafficCounter(parse_traffic_section(scene.traffic_section()), list(CLASS_NAMES))
    direct = evaluate_counter(counter, scene, dets)

    row = res.counting("candidate", "onnx_fp32")
    t, c, mot = direct.total, direct.crossings, direct.mot
    assert t["truth"] > 0 and row.frames == 20
    assert (row.truth, row.counted, row.error, row.rel_error) == (
        t["truth"], t["counted"], t["error"], t["rel_error"])
    assert (row.matched, row.missed, row.duplicates, row.ghosts, row.wrong_class) == (
        c["matched"], c["missed"], c["duplicates"], c["ghosts"], c["wrong_class"])
    assert (row.idsw, row.idf1, row.mota) == (mot["IDSW"], mot["IDF1"], mot["MOTA"])
    assert row.lines == direct.lines and row.rows == direct.rows
    assert row.detections_per_frame == pytest.approx(sum(map(len, dets)) / len(dets), abs=1e-3)
