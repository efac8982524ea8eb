"""The minimum-quality gate: an absolute floor (overall mAP50 and AP50 per well-supported
class) that every candidate must reach, the first one included; relaxed floors say so."""

import pytest

from roadloop.evaluation.gates import (
    GateConfig,
    QualityFloor,
    all_passed,
    check_minimum_quality,
    evaluate_all_gates,
)
from roadloop.evaluation.results import BenchmarkResults
from tests.test_report_gates import make_results

FLOOR = QualityFloor(min_map50=0.10, min_class_ap50=0.01, min_class_support=10)


def _candidate(map50: float, ap50: dict[str, float], support: dict[str, int]) -> BenchmarkResults:
    """No production model (the first candidate); its INT8 metrics on 'all' as given."""
    res = make_results()
    row = next(r for r in res.rows
               if (r.model, r.format, r.test_set) == ("candidate", "onnx_int8", "all"))
    row.metrics.map50 = map50
    row.metrics.per_class_ap50 = ap50
    row.metrics.per_class_instances = support
    return res


def test_a_first_model_below_the_floor_is_not_promoted() -> None:
    """The issue's model: mAP50 0.084 and AP 0.000 for two_wheeler and person."""
    res = _candidate(0.084, {"car": 0.30, "truck": 0.04, "two_wheeler": 0.0, "person": 0.0},
                     {"car": 289, "truck": 16, "two_wheeler": 18, "person": 23})
    outs = evaluate_all_gates(res, GateConfig(quality_floor=FLOOR))
    by_name = {o.name: o for o in outs}
    assert by_name["candidate_vs_production"].passed  # no production model: passes by definition
    floor = by_name["minimum_quality"]
    assert not floor.passed and not all_passed(outs)
    assert floor.measured["candidate_map50"] == pytest.approx(0.084)
    assert floor.measured["min_map50"] == 0.10 and floor.measured["format"] == "onnx_int8"
    assert floor.measured["classes_below_floor"] == "person, two_wheeler"
    assert floor.measured["support/person"] == 23 and floor.measured["ap50/car"] == 0.30
    assert floor.measured["floor"] == "standard" and "below" in floor.description


def test_a_class_under_its_floor_fails_when_the_mean_passes() -> None:
    res = _candidate(0.40, {"car": 0.80, "truck": 0.60, "two_wheeler": 0.005},
                     {"car": 300, "truck": 40, "two_wheeler": 12})
    out = check_minimum_quality(res, GateConfig(quality_floor=FLOOR))
    assert not out.passed
    assert out.measured["classes_below_floor"] == "two_wheeler"
    assert "at or above" in out.description and "two_wheeler 0.005 (12 boxes)" in out.description
    fixed = _candidate(0.40, {"car": 0.80, "truck": 0.60, "two_wheeler": 0.01},
                       {"car": 300, "truck": 40, "two_wheeler": 12})
    assert check_minimum_quality(fixed, GateConfig(quality_floor=FLOOR)).passed  # at the floor


def test_a_class_with_too_little_support_is_reported_not_gated() -> None:
    res = _candidate(0.40, {"car": 0.80, "bus": 0.0, "person": 0.0},
                     {"car": 300, "bus": 3, "person": 9})
    out = check_minimum_quality(res, GateConfig(quality_floor=FLOOR))
    assert out.passed
    assert out.measured["classes_not_gated_low_support"] == "bus, person"
    assert out.measured["classes_below_floor"] == "none"
    assert out.measured["support/bus"] == 3 and out.measured["ap50/bus"] == 0.0
    assert "Not gated (under 10 labelled boxes): bus 0.000 (3 boxes)" in out.description


def test_the_relaxed_demo_floor_passes_and_says_what_the_standard_floor_would_do() -> None:
    res = _candidate(0.084, {"car": 0.30, "two_wheeler": 0.0}, {"car": 289, "two_wheeler": 18})
    demo = QualityFloor(min_map50=0.02, min_class_ap50=0.0, min_class_support=10)
    cfg = GateConfig(quality_floor=demo, relaxed_from=FLOOR, relaxed_reason="demo")
    out = check_minimum_quality(res, cfg)
    assert out.passed
    assert out.description.startswith("RELAXED DEMO FLOOR (mAP50 >= 0.02, class AP50 >= 0)")
    assert out.measured["floor"] == "RELAXED (demo)"
    assert out.measured["standard_min_map50"] == 0.10
    assert out.measured["standard_floor_verdict"] == "FAIL (two_wheeler)"
    broken = _candidate(0.001, {"car": 0.002}, {"car": 289})  # still below the demo floor
    assert not check_minimum_quality(broken, cfg).passed


def test_the_resource_builds_the_floor_from_the_settings(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path) -> None:
    from resources import build_resources
    from roadloop.settings import Settings

    monkeypatch.setenv("ROADLOOP_MIN_MAP50", "0.25")
    monkeypatch.setenv("ROADLOOP_MIN_CLASS_SUPPORT", "30")
    monkeypatch.setenv("ROADLOOP_DEMO_MIN_MAP50", "0.03")
    settings = Settings(home=tmp_path)
    standard = build_resources(settings, "default")["benchmark"].gate_config()
    assert standard.quality_floor == QualityFloor(min_map50=0.25, min_class_support=30)
    assert standard.relaxed_from is None
    demo = build_resources(settings, "demo")["benchmark"].gate_config()
    assert demo.quality_floor == QualityFloor(min_map50=0.03, min_class_ap50=0.0,
                                              min_class_support=30)
    assert demo.relaxed_from == standard.quality_floor and demo.relaxed_reason == "demo"


def test_the_asset_check_fails_and_production_model_refuses(tmp_path) -> None:
    """The blocking Dagster check carries the values; a failed floor stops the promotion."""
    import dagster as dg

    from assets.evaluation import model_meets_quality_floor, production_model
    from assets.records import BenchmarkReportFiles, TrainedModelVersion
    from resources import BenchmarkResource, MlflowResource

    res = _candidate(0.084, {"car": 0.30, "two_wheeler": 0.0, "bus": 0.0},
                     {"car": 289, "two_wheeler": 18, "bus": 2})
    results_json = tmp_path / "results.json"
    results_json.write_text(res.model_dump_json())
    benchmark = BenchmarkResource()  # the standard floor
    report = BenchmarkReportFiles(
        candidate_version="1", production_version=None, results_json=results_json,
        html=tmp_path / "r.html", markdown=tmp_path / "r.md",
        gates=evaluate_all_gates(res, benchmark.gate_config()),
    )
    check = model_meets_quality_floor(context=dg.build_asset_check_context(),
                                      benchmark_report=report, benchmark=benchmark)
    assert not check.passed
    md = {k: v.value for k, v in check.metadata.items()}
    assert md["candidate_map50"] == pytest.approx(0.084) and md["min_map50"] == 0.10
    assert md["classes_below_floor"] == "two_wheeler" and md["relaxed_floor"] is False
    assert "| two_wheeler | 0.000 | 18 | below floor |" in md["per_class"]
    assert "| bus | 0.000 | 2 | not gated (support) |" in md["per_class"]

    trained = TrainedModelVersion(
        registered_name="m", model_version="1", run_id="r", weights=tmp_path / "w.pt",
        imgsz=96, class_names=["car"], dataset_md5="x")
    mlflow = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'unused.db'}")
    with pytest.raises(dg.Failure, match="gates failed: minimum_quality"):
        production_model(context=dg.build_asset_context(), benchmark_report=report,
                         trained_model=trained, mlflow=mlflow)
