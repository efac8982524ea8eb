"""What the Dagster UI gets for the benchmark report, its comparison check and the review queue:
numeric values (Plots), tables with schemas, inline-sized markdown, browser-openable links."""

from pathlib import Path

import dagster as dg
import pytest

from assets.ui_metadata import (
    EXPECTED_CLASS_MIX_HELP,
    INLINE_MARKDOWN_CHARS,
    benchmark_metadata,
    class_mix_table,
    comparison_metadata,
    histogram_markdown,
    mlflow_artifact_url,
)
from roadloop.evaluation.gates import GateConfig, check_candidate_vs_production, evaluate_all_gates
from roadloop.evaluation.report import TrainingProfile
from tests.test_report_gates import make_results

PROD = {"pytorch": 0.38, "onnx_fp32": 0.38, "onnx_int8": 0.37}


def _metadata(tmp_path: Path, profile: str = "demo", **kw) -> dict[str, dg.MetadataValue]:
    res = make_results(**kw)
    md = tmp_path / "report.md"
    md.write_text("### full report\n")
    return benchmark_metadata(
        res, evaluate_all_gates(res, GateConfig()), markdown=md, html=tmp_path / "r.html",
        html_url="http://127.0.0.1:5000/#/x", training=TrainingProfile(profile=profile, epochs=5,
                                                                          imgsz=320),
    )


def test_benchmark_metadata_types(tmp_path: Path) -> None:
    meta = _metadata(tmp_path, prod=PROD)
    assert next(iter(meta)) == "key_table"  # first in the UI's metadata table
    key = meta["key_table"]
    assert isinstance(key, dg.MarkdownMetadataValue) and len(key.value) < INLINE_MARKDOWN_CHARS
    assert "| Model |" in key.value and "Not a real training run" in key.value

    floats = {"map50": 0.711, "map50_95": 0.395, "map50_95_onnx_fp32": 0.40,
              "map50_95_pytorch": 0.40, "int8_drop_points": 0.5, "production_map50_95": 0.37,
              "p95_ms_onnx_int8_b1": 18.0, "p95_ms_onnx_fp32_b4": 90.0}
    for k, v in floats.items():
        assert isinstance(meta[k], dg.FloatMetadataValue), k
        assert meta[k].value == pytest.approx(v), k
    assert isinstance(meta["test_frames"], dg.IntMetadataValue) and meta["test_frames"].value == 20

    for k in ("gates", "per_class", "test_sets"):
        assert isinstance(meta[k], dg.TableMetadataValue), k
    sets = {r.data["test_set"]: r.data for r in meta["test_sets"].value.records}
    assert list(sets) == ["all", "atl_v2", "manaus_v4", "low_light", "fog", "blur", "noise"]
    assert sets["fog"]["frames"] == 20 and "haze" in sets["fog"]["what"]
    per_class = {r.data["class"]: r.data for r in meta["per_class"].value.records}
    assert per_class["bus"]["absent"] is True and per_class["bus"]["ap50_95"] is None
    assert per_class["car"]["ap50_95"] == pytest.approx(0.395)
    assert per_class["car"]["production_ap50_95"] == pytest.approx(0.37)
    assert [c.name for c in meta["per_class"].value.schema.columns][:3] == ["class", "ap50", "ap50_95"]

    assert isinstance(meta["html_report"], dg.UrlMetadataValue)
    assert isinstance(meta["html"], dg.PathMetadataValue)
    assert meta["report"].value == "### full report\n"


def test_benchmark_metadata_first_model_real_profile(tmp_path: Path) -> None:
    meta = _metadata(tmp_path, profile="default")
    assert "production_map50_95" not in meta and meta["production_version"].value == "none"
    assert "Not a real training run" not in meta["key_table"].value


def test_comparison_check_metadata() -> None:
    cfg = GateConfig()
    res = make_results(cand={"onnx_int8": 0.395}, prod={"onnx_int8": 0.40})
    meta = comparison_metadata(check_candidate_vs_production(res, cfg), res, cfg.comparison_format,
                               cfg.primary_test_set)
    assert meta["candidate_map50_95"].value == pytest.approx(0.395)
    assert meta["production_map50_95"].value == pytest.approx(0.40)
    assert meta["margin_map50_95"].value == pytest.approx(-0.005 + cfg.max_regression_map50_95)
    assert all(isinstance(meta[k], dg.FloatMetadataValue)
               for k in ("candidate_map50_95", "production_map50_95", "margin_map50_95"))

    first = make_results()  # no production model: the candidate's own score is still there
    meta = comparison_metadata(check_candidate_vs_production(first, cfg), first,
                               cfg.comparison_format, cfg.primary_test_set)
    assert meta["candidate_map50_95"].value == pytest.approx(0.395)
    assert meta["production"].value == "none" and "margin_map50_95" not in meta


def test_queue_histogram_and_class_mix() -> None:
    md = histogram_markdown({"edges": [0.0, 0.5, 1.0], "counts": [2.0, 8.0]})
    rows = [ln for ln in md.splitlines() if ln.startswith(("| 0", "| 1"))]
    assert rows == ["| 0.00–0.50 | 2 | █████ |", "| 0.50–1.00 | 8 | " + "█" * 20 + " |"]
    table = class_mix_table({"car": 3.456, "bus": 0.5})
    assert [r.data for r in table.value.records] == [
        {"class": "car", "expected_objects": 3.46}, {"class": "bus", "expected_objects": 0.5}]
    assert table.value.schema.columns[1].description == EXPECTED_CLASS_MIX_HELP


def test_mlflow_artifact_url() -> None:
    assert mlflow_artifact_url("http://127.0.0.1:5000/", "1", "abc", "reports/r.html") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/abc/artifactPath/reports/r.html")
