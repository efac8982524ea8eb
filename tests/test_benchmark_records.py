"""What the benchmarks record: the inference target's verdict when accuracy was not measured,
the intake-parsing report's load average, and result files replaced whole (never written in
place, so a run cut short leaves the previous file or the new one, not half of one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks import intake_parsing
from benchmarks.inference import TARGET_SPEEDUP, _verdict

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _int8(speedup: float, map50_95: float | None, delta_pts: float | None) -> dict:
    return {"name": "edge_onnx_int8", "speedup_vs_pytorch": speedup, "map50_95": map50_95,
            "delta_map50_95_pts": delta_pts,
            "stages_ms": {"preprocess_ms": 1.0, "inference_ms": 3.0, "postprocess_ms": 1.0}}


def test_no_map_with_the_speed_met_is_not_judged() -> None:
    t = _verdict([_int8(TARGET_SPEEDUP + 0.5, None, None)])
    assert t["met"] is None and t["accuracy_ok"] is None and t["speed_ok"] is True
    assert t["verdict"].startswith("not judged (mAP not measured)")
    assert "missed" not in t["verdict"]


def test_no_map_with_the_speed_missed_is_missed() -> None:
    t = _verdict([_int8(TARGET_SPEEDUP - 0.5, None, None)])
    assert t["met"] is False
    assert t["verdict"].startswith("missed")


@pytest.mark.parametrize(("delta", "met"), [(-0.1, True), (-50.0, False)])
def test_measured_accuracy_is_judged(delta: float, met: bool) -> None:
    t = _verdict([_int8(TARGET_SPEEDUP + 0.5, 0.4, delta)])
    assert t["met"] is met
    assert t["verdict"].startswith("met" if met else "missed")


def test_intake_parsing_header_states_the_load_average() -> None:
    doc = {"load_average_start_end": [[0.5, 0.25, 0.125], [1.0, 0.5, 0.25]]}
    text = intake_parsing._load_text(doc)
    assert "0.50/0.25/0.12 at start" in text and "1.00/0.50/0.25 at end" in text
    assert intake_parsing._load_text({}) == "load average not recorded"
    assert len(intake_parsing._load_average()) == 3


# The modules whose results files are written with roadloop.fsutil.write_text_atomic.
ATOMIC = ("agent_speed", "dp_per_sample", "drift_detection", "gpu_graph_split",
          "hostile_uploads", "intake_parsing", "quantization_sweep", "rect_shapes", "redaction")


@pytest.mark.parametrize("name", ATOMIC)
def test_results_files_are_replaced_whole(name: str) -> None:
    """No ``.write_text(`` whose target names a results file (``.json`` / ``.md`` or a path
    variable of the report); scratch files (labels, launchers, child output) may still be."""
    tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "write_text"]
    for call in calls:
        target = ast.unparse(call.func.value)
        assert not any(word in target for word in (".json", ".md", "out_json", "out_md")), (
            f"{name}: {target}.write_text(...) writes a results file in place")
        assert target != "path", f"{name}: {target}.write_text(...) writes a results file in place"
    assert "write_text_atomic" in {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
        and n.module == "roadloop.fsutil" for a in n.names}
