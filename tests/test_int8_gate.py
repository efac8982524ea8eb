"""The INT8 gate: absolute, relative and per-class limits, on synthetic metrics and on real
quantizations of the shared gpu checkpoint (a broken one fails, the platform's recipe passes)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from roadloop.evaluation.gates import GateConfig, check_int8_drop, int8_class_drops
from roadloop.evaluation.results import (
    BenchmarkResults,
    DetectionMetrics,
    LatencyConfig,
    MetricsRow,
    ModelSet,
)

from .helpers import SHARED_DIR, require_shared


def _m(per_class: dict[str, float], support: dict[str, int] | None = None) -> DetectionMetrics:
    """Metrics whose mAP50-95 is the mean of ``per_class`` (as Ultralytics' is)."""
    mean = sum(per_class.values()) / len(per_class)
    return DetectionMetrics(
        map50=mean, map50_95=mean, precision=0.5, recall=0.5, f1=0.5,
        per_class_ap50=dict(per_class), per_class_ap50_95=dict(per_class),
        per_class_count_mae={c: 0.0 for c in per_class}, count_mae=0.0, n_images=10,
        per_class_instances=support if support is not None else {c: 100 for c in per_class},
    )


def _results(ref: DetectionMetrics, int8: DetectionMetrics, ts: str = "all") -> BenchmarkResults:
    return BenchmarkResults(
        created_at=datetime.now(UTC).isoformat(), imgsz=320, split="test", conf=0.25,
        models={"candidate": ModelSet(version="1")}, test_sets=[ts], test_set_kinds={ts: "all"},
        latency_config=LatencyConfig(enabled=False),
        rows=[
            MetricsRow(model="candidate", version="1", format=f, test_set=ts, metrics=m)
            for f, m in (("onnx_fp32", ref), ("onnx_int8", int8))
        ],
    )


def _gate(ref: DetectionMetrics, int8: DetectionMetrics, **cfg):
    return check_int8_drop(_results(ref, int8), GateConfig(**cfg))


def test_weak_model_losing_half_fails_on_relative_loss_alone() -> None:
    # The case: mAP50-95 0.026 -> 0.012 is 1.4 points (inside the 1.5-point limit)
    # but 54 % of the model.
    out = _gate(_m({"car": 0.026}), _m({"car": 0.012}), int8_class_max_drop_pct=100.0)
    assert out.measured["drop_points"] == pytest.approx(1.4)
    assert out.measured["relative_drop_pct"] == pytest.approx(1.4 / 2.6 * 100)
    assert not out.passed and "% >" in out.description and "points >" not in out.description
    # A strong model losing 1.6 points (3.2 %) breaks the absolute limit alone.
    strong = _gate(_m({"car": 0.5}), _m({"car": 0.484}))
    assert not strong.passed and "points >" in strong.description and "% >" not in strong.description


def test_overall_limits_pass_at_threshold_and_fail_beyond() -> None:
    cfg = {"max_int8_drop_points": 1.5, "max_int8_drop_pct": 5.0}
    assert _gate(_m({"car": 0.30}), _m({"car": 0.285}), **cfg).passed  # 1.5 points, 5.0 %
    assert not _gate(_m({"car": 0.30}), _m({"car": 0.284}), **cfg).passed  # 1.6 points, 5.3 %
    assert not _gate(_m({"car": 0.10}), _m({"car": 0.094}), **cfg).passed  # 0.6 points, 6 %
    gain = _gate(_m({"car": 0.10}), _m({"car": 0.12}), **cfg)
    assert gain.passed and gain.measured["relative_drop_pct"] == pytest.approx(-20.0)


def test_one_class_vanishing_behind_a_stable_average_fails() -> None:
    ref = {"car": 0.40, "truck": 0.20, "bus": 0.30, "two_wheeler": 0.10}
    # truck vanishes, the others gain: the mean moves 0.25 -> 0.2475 (1 %, 0.25 points).
    new = {"car": 0.46, "truck": 0.0, "bus": 0.33, "two_wheeler": 0.20}
    out = _gate(_m(ref), _m(new))
    assert out.measured["drop_points"] < 1.5 and out.measured["relative_drop_pct"] < 5.0
    assert not out.passed
    assert out.measured["classes_failed"] == "truck"
    assert "class truck" in out.description
    assert out.measured["class_truck_drop_pct"] == pytest.approx(100.0)


def test_class_limits_relative_and_absolute() -> None:
    cfg = GateConfig(int8_class_max_drop_points=3.0, int8_class_max_drop_pct=20.0)
    ref = _m({"car": 0.60, "bus": 0.10, "truck": 0.20})
    new = _m({"car": 0.565, "bus": 0.075, "truck": 0.17})
    rows = {r["class"]: r for r in int8_class_drops(ref, new, cfg)}
    assert rows["car"]["failed"]  # 3.5 points (5.8 %): over the absolute limit
    assert rows["bus"]["failed"]  # 2.5 points but 25 %: over the relative limit
    assert not rows["truck"]["failed"]  # 3.0 points, 15 %: at the limit passes
    assert rows["truck"]["drop_points"] == pytest.approx(3.0)


def test_classes_with_little_or_unknown_support_are_reported_not_gated() -> None:
    ref = _m({"car": 0.30, "bus": 0.30}, support={"car": 200, "bus": 12})
    new = _m({"car": 0.30, "bus": 0.27}, support={"car": 200, "bus": 12})  # bus -10 %
    out = _gate(ref, new, int8_class_min_instances=50, int8_class_max_drop_pct=5.0)
    assert out.passed  # overall 1.5 points, 5 %: at the limits
    assert out.measured["classes_not_gated"] == "bus" and out.measured["classes_failed"] == "none"
    assert out.measured["class_bus_instances"] == 12.0 and "Not gated" in out.description
    assert not _gate(ref, new, int8_class_min_instances=10, int8_class_max_drop_pct=5.0).passed
    # Results written before per-class support was recorded: nothing is gated per class.
    old = _m({"car": 0.30, "bus": 0.30}, support={})
    vanished = _m({"car": 0.30, "bus": 0.29}, support={})
    out = _gate(old, vanished, int8_class_max_drop_pct=1.0)
    assert out.passed and out.measured["class_car_instances"] == "unknown"


def test_gate_limits_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from resources import BenchmarkResource, int8_gate_settings
    from roadloop.settings import Settings

    assert GateConfig.from_settings(Settings()) == GateConfig()  # one set of defaults
    monkeypatch.setenv("ROADLOOP_INT8_MAX_DROP_PCT", "2.5")
    monkeypatch.setenv("ROADLOOP_INT8_CLASS_MIN_INSTANCES", "7")
    cfg = BenchmarkResource(**int8_gate_settings(Settings())).gate_config()
    assert cfg.max_int8_drop_pct == 2.5 and cfg.int8_class_min_instances == 7
    assert cfg.max_int8_drop_points == GateConfig().max_int8_drop_points
    assert BenchmarkResource().counting_config().enabled  # the resource's other methods intact


# --------------------------------------------------------------------- real quantizations


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data YAML over the 6 atl_v2 val frames with the most boxes (links, so Ultralytics'
    label cache lands in the temporary folder, never in ../shared)."""
    import yaml

    ds = SHARED_DIR / "datasets" / "atl_v2"
    require_shared(ds, SHARED_DIR / "models" / "atl_v2_yolo11n_gpu_320.onnx")
    root = tmp_path_factory.mktemp("tiny_eval")
    labels = sorted((ds / "labels" / "val").glob("*.txt"),
                    key=lambda p: (-len(p.read_text().split("\n")), p.name))[:6]
    for kind in ("images", "labels"):
        (root / kind / "val").mkdir(parents=True)
    for lbl in labels:
        img = next((ds / "images" / "val").glob(lbl.stem + ".*"))
        (root / "images" / "val" / img.name).symlink_to(img)
        (root / "labels" / "val" / lbl.name).symlink_to(lbl)
    names = yaml.safe_load((ds / "data.yaml").read_text())["names"]
    data = {"path": str(root), "train": "images/val", "val": "images/val", "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


@pytest.fixture(scope="module")
def quantized_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared fp32 export, quantized with the platform's recipe and with ORT's defaults
    over the whole graph."""
    from roadloop.models.quantize import QuantConfig, list_images, quantize_int8
    from roadloop.models.training import configure_ultralytics

    work = tmp_path_factory.mktemp("int8_gate")
    configure_ultralytics(work / "ultralytics")
    fp32 = SHARED_DIR / "models" / "atl_v2_yolo11n_gpu_320.onnx"
    train = list_images(SHARED_DIR / "datasets" / "atl_v2" / "images" / "train")
    files = {"fp32": fp32}
    # The collapse does not depend on the calibration frames: 2 suffice for the broken one.
    for name, cfg in (("recipe", QuantConfig(num_calibration_frames=8)),
                      ("whole_graph", QuantConfig(num_calibration_frames=2, exclude_node_patterns=[]))):
        files[name] = quantize_int8(fp32, work / f"{name}.onnx", train, imgsz=320, config=cfg).path
    return files


@pytest.fixture(scope="module")
def quantized(tiny_eval: Path, quantized_files: dict[str, Path]) -> dict[str, DetectionMetrics]:
    """Each of ``quantized_files`` scored once by the platform's evaluator (Ultralytics val)
    on the tiny set, at 320 px."""
    from roadloop.evaluation.accuracy import evaluate_detector

    return {k: evaluate_detector(p, tiny_eval, imgsz=320, split="val")
            for k, p in quantized_files.items()}


def test_quantizing_an_old_export_moves_its_dfl_softmax_last(
        quantized_files: dict[str, Path]) -> None:
    """The shared export predates ``graph_rewrites``; what ``quantize_int8`` makes of it has
    the DFL softmax over the last axis (roadloop.models.graph_rewrites)."""
    import onnx
    from onnx import helper

    def softmax_axes(path: Path) -> list[int]:
        return [helper.get_attribute_value(n.attribute[0])
                for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax"]

    assert 1 in softmax_axes(quantized_files["fp32"])  # the old layout, as exported
    assert softmax_axes(quantized_files["recipe"]) and 1 not in softmax_axes(
        quantized_files["recipe"])


# Per-class limits on the tiny set: cars (about 100 boxes) are gated, the rest too rare.
TINY = {"int8_class_min_instances": 20}


def test_broken_quantization_fails_the_gate(quantized: dict[str, DetectionMetrics]) -> None:
    fp32, broken = quantized["fp32"], quantized["whole_graph"]
    assert fp32.map50_95 > 0.05  # the gpu checkpoint finds the cars
    out = _gate(fp32, broken, **TINY)
    assert not out.passed
    assert out.measured["relative_drop_pct"] > 50  # collapsed, as INSTALL-NOTES measured
    assert "car" in str(out.measured["classes_failed"])


def test_recipe_quantization_passes_the_gate(quantized: dict[str, DetectionMetrics]) -> None:
    fp32, recipe = quantized["fp32"], quantized["recipe"]
    out = _gate(fp32, recipe, **TINY)
    assert out.passed, out.description
    assert fp32.per_class_instances["car"] >= TINY["int8_class_min_instances"]
    # Ultralytics' per-class support adds up to the boxes in the label files.
    assert sum(fp32.per_class_instances.values()) == fp32.n_instances
    assert "car" not in str(out.measured["classes_not_gated"])
