"""The demo's before/after table (roadloop.evaluation.before_after) from synthetic reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.demo import LoopOutcome
from roadloop.evaluation.before_after import (
    JSON_NAME,
    MARKDOWN_NAME,
    BeforeAfterTable,
    build_before_after,
    render_markdown,
    render_text,
    write_before_after,
)
from roadloop.evaluation.results import (
    BenchmarkResults,
    DetectionMetrics,
    LatencyConfig,
    MetricsRow,
    ModelSet,
)

TEST_SETS = ["all", "atl_v2", "manaus_v4", "blur"]
KINDS = {"all": "all", "atl_v2": "source", "manaus_v4": "source", "blur": "slice"}


def _m(map50_95: float, n_images: int = 10) -> DetectionMetrics:
    return DetectionMetrics(map50=2 * map50_95, map50_95=map50_95, precision=0.5, recall=0.5,
                            f1=0.5, per_class_ap50={}, per_class_ap50_95={},
                            per_class_count_mae={}, count_mae=1.0, n_images=n_images)


def _report(version: str, base: float, int8: bool = True) -> BenchmarkResults:
    """A report where ``version`` was the candidate (and some older production was compared)."""
    rows = []
    for i, ts in enumerate(TEST_SETS):
        for model, offset in (("candidate", 0.0), ("production", -0.5)):
            formats = {"pytorch": 0.0, "onnx_fp32": -0.001, **({"onnx_int8": -0.01} if int8 else {})}
            rows += [MetricsRow(model=model, version=version, format=f, test_set=ts,
                                metrics=_m(base + offset + d + i / 100, n_images=10 + i))
                     for f, d in formats.items()]
    return BenchmarkResults(
        created_at="2026-11-27T00:00:00+00:00", imgsz=320, split="test", conf=0.25,
        models={"candidate": ModelSet(version=version)}, test_sets=TEST_SETS,
        test_set_kinds=KINDS, latency_config=LatencyConfig(), rows=rows,
    )


def _start() -> tuple[str, dict[str, DetectionMetrics]]:
    return "atl_v2_yolo11n_gpu.pt", {"all": _m(0.05, 10), "atl_v2": _m(0.07, 11),
                                     "manaus_v4": _m(0.01, 12)}


def test_rows_per_source_test_set_then_all_start_production_candidate() -> None:
    prod, cand = _report("2", 0.10), _report("3", 0.20, int8=False)
    table = build_before_after(prod, production=("2", prod), candidate=("3", cand), start=_start(),
                               start_eval_seconds=4.2)
    # Slices are left out; the sources first, then all.
    assert table.test_sets == ["atl_v2", "manaus_v4", "all"]
    assert [(r.test_set, r.role) for r in table.rows] == [
        (ts, role) for ts in table.test_sets for role in ("start", "production", "candidate")
    ]
    # Production's and the candidate's figures are their own report's candidate rows (PyTorch
    # for mAP, INT8 for INT8), never the older production those reports compared against.
    atl = table.row("production", "atl_v2")
    assert atl is not None and atl.model == "v2" and atl.figures_from == "benchmark report of v2"
    assert atl.map50_95 == pytest.approx(prod.get("candidate", "pytorch", "atl_v2").map50_95)
    assert atl.map50 == pytest.approx(prod.get("candidate", "pytorch", "atl_v2").map50)
    assert atl.int8_map50_95 == pytest.approx(prod.get("candidate", "onnx_int8", "atl_v2").map50_95)
    assert atl.n_images == 11
    assert table.row("candidate", "atl_v2").int8_map50_95 is None  # that report had no INT8
    start = table.row("start", "manaus_v4")
    assert start.model == "atl_v2_yolo11n_gpu.pt" and start.int8_map50_95 is None
    assert table.delta_vs_start(atl) == pytest.approx(atl.map50_95 - 0.07)
    assert table.delta_vs_start(start) is None
    assert (table.imgsz, table.split, table.conf) == (320, "test", 0.25)


def test_a_candidate_equal_to_production_and_a_missing_start_leave_their_rows_out() -> None:
    prod = _report("2", 0.10)
    table = build_before_after(prod, production=("2", prod), candidate=("2", prod),
                               notes=["training starts from random init"])
    assert {r.role for r in table.rows} == {"production"}
    assert table.delta_vs_start(table.rows[0]) is None
    assert "training starts from random init" in render_text(table)


def test_text_markdown_and_json_say_the_same_rows(tmp_path: Path) -> None:
    prod, cand = _report("2", 0.10), _report("3", 0.20, int8=False)
    table = build_before_after(prod, production=("2", prod), candidate=("3", cand), start=_start(),
                               start_eval_seconds=4.2)
    text = render_text(table)
    assert text[1].split()[:3] == ["test", "set", "model"] and set(text[2]) <= {"-", " "}
    body = text[3:3 + len(table.rows)]
    assert len(body) == 9
    assert body[0].split()[:4] == ["atl_v2", "start", "atl_v2_yolo11n_gpu.pt", "11"]
    prod_line = next(line for line in body if line.startswith("atl_v2") and "production v2" in line)
    delta = table.delta_vs_start(table.row("production", "atl_v2"))
    assert f"{delta:+.3f}" in prod_line
    assert "n/a" in next(line for line in body if "candidate v3" in line)

    json_path, md_path = write_before_after(table, tmp_path / "reports")
    assert (json_path.name, md_path.name) == (JSON_NAME, MARKDOWN_NAME)
    assert BeforeAfterTable.model_validate_json(json_path.read_text()) == table
    assert json.loads(json_path.read_text())["start_eval_seconds"] == 4.2
    md = md_path.read_text()
    assert md == render_markdown(table)
    assert sum(line.startswith("| atl_v2 |") for line in md.splitlines()) == 3
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted([JSON_NAME, MARKDOWN_NAME])


def test_demo_summary_prints_the_table_and_where_it_is() -> None:
    prod = _report("2", 0.10)
    table = build_before_after(prod, production=("2", prod), start=_start())
    outcome = LoopOutcome(success=True)
    assert "before/after" not in outcome.summary()
    outcome.before_after = render_text(table)
    outcome.before_after_files = ["/h/reports/demo_before_after.json"]
    summary = outcome.summary()
    assert "before/after the loop (/h/reports/demo_before_after.json):" in summary
    assert all(f"    {line}" in summary for line in render_text(table))


def test_demo_table_without_test_set_files_or_start_weights_says_why(roadloop_home: Path) -> None:
    from launch.demo_before_after import demo_before_after, reports_dir
    from roadloop.evaluation.report import JSON_NAME as REPORT_JSON
    from roadloop.models.training import TrainConfig
    from roadloop.settings import get_settings

    settings = get_settings()
    report = Path(settings.artifacts_dir) / "benchmarks" / "2" / "report" / REPORT_JSON
    report.parent.mkdir(parents=True)
    report.write_text(_report("2", 0.10).model_dump_json())
    scratch = TrainConfig(model="yolo11n.yaml", fallback_weights=[])
    table, json_path, md_path = demo_before_after(settings, scratch, production="2", candidate="2")
    assert [r.role for r in table.rows] == ["production"] * 3
    assert table.notes == ["training starts from random init (yolo11n.yaml): no start row"]
    assert json_path.parent == md_path.parent == reports_dir(settings)
    # A start checkpoint, but the report's test-set files are gone: no start row, and why.
    weights = roadloop_home / "start.pt"
    weights.write_bytes(b"not read")
    table, _, _ = demo_before_after(settings, TrainConfig(model=str(weights)), production="2",
                                    candidate=None)
    assert "start" not in {r.role for r in table.rows}
    assert table.notes[0].startswith("start checkpoint not scored: test-set files of v2 missing")
