"""Report rendering and promotion gates on hand-built benchmark results (no models needed)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from roadloop.evaluation.gates import (
    GateConfig,
    check_candidate_vs_production,
    check_int8_drop,
    check_latency_budget,
    evaluate_all_gates,
)
from roadloop.evaluation.report import TrainingProfile, render_report
from roadloop.evaluation.report_context import context_rows
from roadloop.evaluation.results import (
    FORMATS,
    BenchmarkResults,
    CountingConfig,
    CountingRow,
    DetectionMetrics,
    LatencyConfig,
    LatencyRow,
    LatencyStats,
    MetricsRow,
    ModelSet,
)

CLASSES = ["car", "truck", "bus", "two_wheeler", "person"]
TEST_SETS = ["all", "atl_v2", "manaus_v4", "low_light", "fog", "blur", "noise"]


def _metrics(map50_95: float, *, absent: tuple[str, ...] = ("bus",)) -> DetectionMetrics:
    present = [c for c in CLASSES if c not in absent]
    return DetectionMetrics(
        map50=min(1.0, map50_95 * 1.8),
        map50_95=map50_95,
        precision=0.6,
        recall=0.5,
        f1=2 * 0.6 * 0.5 / 1.1,
        per_class_ap50={c: min(1.0, map50_95 * 1.8) for c in present},
        per_class_ap50_95={c: map50_95 for c in present},
        per_class_count_mae={c: 0.5 for c in CLASSES},
        count_mae=1.25,
        n_images=20,
        n_instances=100,
        absent_classes=list(absent),
    )


def _latency(batch: int, p95: float) -> LatencyStats:
    return LatencyStats(
        batch=batch,
        p50_ms=p95 * 0.8,
        p95_ms=p95,
        p99_ms=p95 * 1.1,
        mean_ms=p95 * 0.85,
        frames_per_s=batch / (p95 * 0.85 / 1000),
        runs=100,
        warmup=10,
        threads=2,
    )


def make_results(
    *,
    cand: dict[str, float] | None = None,
    prod: dict[str, float] | None = None,
    int8_p95: float = 20.0,
) -> BenchmarkResults:
    """mAP50-95 per format on 'all' (other sets derived); ``prod=None`` → no production model."""
    cand = cand or {"pytorch": 0.40, "onnx_fp32": 0.40, "onnx_int8": 0.395}
    models = {
        "candidate": ModelSet(
            version="v2",
            pytorch=Path("c.pt"),
            onnx_fp32=Path("c.onnx"),
            onnx_int8=Path("c.int8.onnx"),
        )
    }
    maps = {"candidate": cand}
    if prod is not None:
        models["production"] = ModelSet(
            version="v1",
            pytorch=Path("p.pt"),
            onnx_fp32=Path("p.onnx"),
            onnx_int8=Path("p.int8.onnx"),
        )
        maps["production"] = prod
    rows, lat = [], []
    for m, per_fmt in maps.items():
        for fmt, value in per_fmt.items():
            for i, ts in enumerate(TEST_SETS):
                rows.append(
                    MetricsRow(
                        model=m,
                        version=models[m].version,
                        format=fmt,
                        test_set=ts,
                        metrics=_metrics(value * (1 - 0.05 * i)),
                    )
                )
            base = {"pytorch": 40.0, "onnx_fp32": 25.0, "onnx_int8": int8_p95}[fmt]
            for b in (1, 4, 8):
                lat.append(
                    LatencyRow(
                        model=m,
                        version=models[m].version,
                        format=fmt,
                        stats=_latency(b, base * b * 0.9),
                    )
                )
    return BenchmarkResults(
        created_at="2026-11-25T00:00:00+00:00",
        imgsz=320,
        split="test",
        conf=0.25,
        models=models,
        test_sets=TEST_SETS,
        test_set_kinds={
            t: ("all" if t == "all" else "source" if t in ("atl_v2", "manaus_v4") else "slice")
            for t in TEST_SETS
        },
        latency_config=LatencyConfig(threads=2),
        rows=rows,
        latency_rows=lat,
    )


# --------------------------------------------------------------------------- report


def test_report_files(tmp_path: Path) -> None:
    res = make_results(prod={"pytorch": 0.38, "onnx_fp32": 0.38, "onnx_int8": 0.37})
    gates = evaluate_all_gates(res, GateConfig())
    demo = TrainingProfile.from_params("demo", {"epochs": "5", "imgsz": "320", "model": "y.pt"})
    files = render_report(
        res,
        tmp_path / "report",
        title="Benchmark v2 vs v1",
        # "candidate"/"production" repeat what the results say: one row each, not two.
        context={"dataset": "curated@abc123", "note": "<b>escaped</b>", "candidate": "v2",
                 "production": "v1"},
        gates=gates,
        training=demo,
    )
    for p in (files.html, files.json, files.markdown):
        assert p.is_file() and p.parent == tmp_path / "report"
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        [files.html.name, files.json.name, files.markdown.name]
    )  # no temp files left

    html = files.html.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) >= 5  # mAP by format, per source, per class, robustness, latency
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    assert "http" not in html.replace("http-equiv", "")  # self-contained
    assert "curated@abc123" in html and "<b>escaped</b>" not in html
    assert "absent" in html  # bus has no ground truth
    assert "`" not in html and "<code>test</code>" in html  # code spans, not literal backticks

    cells = re.findall(r"<td>(.*?)</td>", html.split("<h2>Context</h2>")[1].split("<h2>")[0])
    keys = cells[0::2]
    assert len(keys) == len(set(keys)) and keys.count("candidate version") == 1
    assert [v for k, v in zip(keys, cells[1::2]) if "production" in k] == ["v1"]

    gate_html = html.split("<h2>Promotion gates")[1].split("<h2>")[0]
    for g in gates:  # each gate with its measured values, not a bare "pass"
        assert g.name in gate_html
    assert "candidate_map50_95 0.395" in gate_html and "production_map50_95 0.37" in gate_html
    assert "p95_ms 18" in gate_html and "budget_p95_ms 50" in gate_html

    robust = html.split("<h2>Robustness slices")[1].split("<h2>")[0]
    assert "mAP50-95" in robust.split("<table")[0]  # the metric is named before the table
    assert "all clean mAP50-95 (n=20)" in robust and "fog mAP50-95 (n=20)" in robust
    assert "(-0.080)" in robust  # fog on the candidate's PyTorch: 0.32 vs 0.40 clean

    assert "Not a real training run" in html and "5 epochs at 320 px" in html
    assert "Not a real training run" in files.markdown.read_text()

    md = files.markdown.read_text()
    key = md.split("**Per source**")[0]
    table_rows = [
        ln for ln in key.splitlines() if ln.startswith("| ") and not ln.startswith("| Model")
    ]
    assert len(table_rows) == 2 * len(FORMATS)  # one row per (model, format)
    assert {(r.split("|")[1].strip(), r.split("|")[3].strip()) for r in table_rows} == {
        (m, f) for m in ("candidate", "production") for f in ("PyTorch", "ONNX fp32", "ONNX INT8")
    }
    header = next(ln for ln in key.splitlines() if ln.startswith("| Model"))
    for col in ("mAP50", "mAP50-95", "P", "R", "F1", "Count MAE", "P95 ms @b1", "frames/s @b1"):
        assert f" {col} " in header
    assert "atl_v2 mAP50-95" in md and "manaus_v4 mAP50-95" in md
    cand_int8 = next(r for r in table_rows if "candidate" in r and "INT8" in r)
    assert "0.395" in cand_int8 and "18.0" in cand_int8  # mAP50-95, P95 @ b1 (20 * 0.9)

    assert BenchmarkResults.model_validate_json(files.json.read_text()) == res
    assert json.loads(files.json.read_text())["imgsz"] == 320


def test_report_without_production_or_latency(tmp_path: Path) -> None:
    res = make_results()
    res.latency_rows = []
    full = TrainingProfile.from_params("default", {"epochs": "300", "imgsz": "640"})
    files = render_report(res, tmp_path, title="first model", training=full)
    md = files.markdown.read_text()
    assert "production" not in md.split("**Per source**")[0]
    html = files.html.read_text()
    assert "none yet" in html
    assert "Not a real training run" not in html and "300 epochs at 640 px" in html
    assert "| –" in md or "– |" in md  # latency columns left empty, not invented


def test_training_profile_and_context_rows() -> None:
    fed = TrainingProfile.from_params("test", {"rounds": "2", "local_epochs": "1", "imgsz": "64"},
                                      source="federated")
    assert fed.summary() == "federated, 2 rounds, 1 local epoch(s) per round at 64 px (profile test)"
    assert "Test profile" in (fed.smoke_note() or "")
    assert TrainingProfile.from_params("default", {}).smoke_note() is None
    rows = context_rows(make_results(), {"candidate": "v2", "x": "1"}, fed)
    assert [k for k, _ in rows] == ["candidate version", "production version", "training", "x"]


def test_report_failure_leaves_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from roadloop.evaluation import report

    files = render_report(make_results(), tmp_path, title="v1")
    before = {p: p.read_bytes() for p in (files.html, files.json, files.markdown)}

    def boom(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "_plot_latency", boom)
    with pytest.raises(RuntimeError):
        render_report(
            make_results(cand={"pytorch": 0.1, "onnx_fp32": 0.1, "onnx_int8": 0.1}),
            tmp_path,
            title="v2",
        )
    assert {p: p.read_bytes() for p in before} == before
    assert len(list(tmp_path.iterdir())) == 3


def _counting_row(model: str, fmt: str, counted: int, idsw: int) -> CountingRow:
    truth = 20
    return CountingRow(
        model=model, version="v2" if model == "candidate" else "v1", format=fmt, truth=truth,
        counted=counted, error=counted - truth, rel_error=(counted - truth) / truth,
        abs_error_sum=abs(counted - truth) + 2, matched=17, missed=3, duplicates=1,
        ghosts=counted - 18, wrong_direction=0, wrong_class=1, mota=0.7, idf1=0.81, idsw=idsw,
        frames=100, detections_per_frame=4.5,
        lines=[{"line": "near", "truth": 12, "counted": counted - 8, "error": counted - 20,
                "rel_error": None}, {"line": "far", "truth": 8, "counted": 8, "error": 0,
                                     "rel_error": 0.0}],
    )


def test_report_counting_on_tracks(tmp_path: Path) -> None:
    res = make_results(prod={"pytorch": 0.38, "onnx_fp32": 0.38, "onnx_int8": 0.37})
    res.counting_config = CountingConfig(duration_s=10, width=320, height=192)
    res.counting_scene = {"seed": 0, "width": 320, "height": 192, "fps": 10.0,
                          "duration_s": 10.0, "lanes": ["down", "up", "closed"],
                          "crop_datasets": ["/d"], "crop_split": "test"}
    res.counting_rows = [_counting_row("production", "onnx_int8", 23, 4),
                         _counting_row("candidate", "onnx_fp32", 19, 2),
                         _counting_row("candidate", "onnx_int8", 21, 3)]
    files = render_report(res, tmp_path, title="v2")
    md = files.markdown.read_text()
    section = md.split("**Counting on tracks**")[1]
    assert "split `test`" in section and "320x192" in section
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "Model" not in ln]
    assert [tuple(c.strip() for c in r.split("|")[1:4]) for r in rows] == [
        ("candidate", "v2", "ONNX fp32"), ("candidate", "v2", "ONNX INT8"),
        ("production", "v1", "ONNX INT8")]  # report order, whatever the row order
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert cells[3:] == ["20", "21", "+5.0 % (+1)", "3", "1", "3", "3", "0.810"]
    html = files.html.read_text()
    assert "<h2>Counting on tracks</h2>" in html and "near true / counted" in html
    assert BenchmarkResults.model_validate_json(files.json.read_text()) == res

    plain = render_report(make_results(), tmp_path / "plain", title="v2")
    assert "Counting on tracks" not in plain.markdown.read_text()


def test_results_json_without_counting_still_loads() -> None:
    old = json.loads(make_results().model_dump_json())
    for key in ("counting_rows", "counting_config", "counting_scene"):
        old.pop(key)
    res = BenchmarkResults.model_validate(old)
    assert res.counting_rows == [] and res.counting_config is None
    assert res.counting("candidate", "onnx_int8") is None


# --------------------------------------------------------------------------- gates


def test_no_production_passes_with_message() -> None:
    out = check_candidate_vs_production(make_results(), GateConfig())
    assert out.passed and "no production model" in out.description.lower()
    assert out.measured["production"] == "none"


def test_regression_within_tolerance_passes_beyond_fails() -> None:
    cfg = GateConfig(max_regression_map50_95=0.01)
    ok = check_candidate_vs_production(
        make_results(cand={"onnx_int8": 0.395}, prod={"onnx_int8": 0.40}), cfg
    )
    assert ok.passed and ok.measured["format"] == "onnx_int8"
    assert ok.measured["delta_map50_95"] == pytest.approx(-0.005)
    bad = check_candidate_vs_production(
        make_results(cand={"onnx_int8": 0.38}, prod={"onnx_int8": 0.40}), cfg
    )
    assert not bad.passed
    assert bad.measured["delta_map50_95"] == pytest.approx(-0.02)
    assert bad.measured["tolerance_map50_95"] == 0.01
    assert bad.measured["candidate_version"] == "v2" and bad.measured["production_version"] == "v1"
    assert "regression" in bad.description
    better = check_candidate_vs_production(
        make_results(cand={"onnx_int8": 0.45}, prod={"onnx_int8": 0.40}), cfg
    )
    assert better.passed


def test_regression_falls_back_to_common_format() -> None:
    out = check_candidate_vs_production(
        make_results(cand={"pytorch": 0.30, "onnx_int8": 0.30}, prod={"pytorch": 0.35}),
        GateConfig(),
    )
    assert not out.passed and out.measured["format"] == "pytorch" and "note" in out.measured


def test_int8_drop() -> None:
    cfg = GateConfig(max_int8_drop_points=1.5)
    bad = check_int8_drop(make_results(cand={"onnx_fp32": 0.40, "onnx_int8": 0.38}), cfg)
    assert not bad.passed
    assert bad.measured["drop_points"] == pytest.approx(2.0)
    assert bad.measured["relative_drop_pct"] == pytest.approx(5.0)
    assert bad.measured["reference_format"] == "onnx_fp32"
    assert "5.0%" in bad.description
    ok = check_int8_drop(make_results(cand={"onnx_fp32": 0.40, "onnx_int8": 0.39}), cfg)
    assert ok.passed and ok.measured["drop_points"] == pytest.approx(1.0)
    missing = check_int8_drop(make_results(cand={"pytorch": 0.4, "onnx_fp32": 0.4}), cfg)
    assert not missing.passed and "INT8" in missing.description


def test_latency_budget() -> None:
    ok = check_latency_budget(make_results(int8_p95=20.0), GateConfig(p95_latency_budget_ms=50))
    assert ok.passed and ok.measured["p95_ms"] == pytest.approx(18.0)
    assert ok.measured["budget_p95_ms"] == 50
    slow = check_latency_budget(make_results(int8_p95=80.0), GateConfig(p95_latency_budget_ms=50))
    assert not slow.passed and slow.measured["p95_ms"] == pytest.approx(72.0)
    assert "over budget" in slow.description


def test_evaluate_all_gates() -> None:
    outs = evaluate_all_gates(make_results(), GateConfig())
    assert [o.name for o in outs] == [
        "candidate_vs_production", "int8_drop", "latency_budget", "minimum_quality"
    ]
    assert all(o.passed for o in outs)
    for o in outs:
        assert all(isinstance(v, (float, int, str)) for v in o.measured.values())
        json.loads(o.model_dump_json())
