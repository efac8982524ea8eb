"""The demo's stage times on file (launch.demo.write_demo_timings): ``demo_timings.{json,md}``
beside the before/after report, with the load average, the flags, the CPU count and the date,
written atomically, and written too when the demo stops part-way."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from launch import demo
from launch.demo import LoopOutcome, demo_timings_record, write_demo_timings

FLAGS = {"drift_turn": False, "federated_turn": True, "review_turns": 2, "reviews_per_turn": 20,
         "frames_per_camera": 40, "frames_per_agent": 150, "profile": "demo"}
START = datetime(2026, 11, 30, 9, 15, 0, tzinfo=UTC)


def _record(**overrides) -> dict:
    kwargs = {
        "flags": FLAGS, "started_at": START, "finished_at": START.replace(minute=40),
        "wall_s": 1500.04, "load_start": (1.234, 0.5, 0.25), "load_end": (3.0, 2.0, 1.0),
        "success": True,
    }
    return demo_timings_record(
        {"edge_agents_stream": 61.2, "replay_and_partitions": 20.0, "learning_loop": 900.4},
        **{**kwargs, **overrides},
    )


def test_writes_json_and_markdown_with_what_the_run_ran_under(tmp_path: Path) -> None:
    folder = tmp_path / "reports"  # missing: made
    json_path, md_path = write_demo_timings(folder, _record())
    assert (json_path, md_path) == (folder / "demo_timings.json", folder / "demo_timings.md")
    doc = json.loads(json_path.read_text())
    assert list(doc["stages_s"]) == ["edge_agents_stream", "replay_and_partitions",
                                     "learning_loop"]  # in the order they ran
    assert doc["stages_s"]["learning_loop"] == 900.4
    assert doc["stages_total_s"] == 981.6 and doc["wall_s"] == 1500.0
    assert doc["load_average_start"] == [1.23, 0.5, 0.25]
    assert doc["load_average_end"] == [3.0, 2.0, 1.0]
    assert doc["flags"] == FLAGS
    assert doc["cpu_count"] >= 1 and doc["date"] == "2026-11-30"
    assert doc["complete"] and doc["success"] and doc["error"] is None
    md = md_path.read_text()
    assert "| learning_loop | 900.4 |" in md
    assert "Load average (1/5/15 min) at start 1.23 / 0.50 / 0.25, at end 3.00 / 2.00 / 1.00" in md
    assert "drift_turn=False, federated_turn=True, review_turns=2" in md
    assert "result: success" in md
    assert sorted(p.name for p in folder.iterdir()) == ["demo_timings.json", "demo_timings.md"]


def test_a_run_stopped_part_way_says_so_and_replaces_the_last_files(tmp_path: Path) -> None:
    write_demo_timings(tmp_path, _record())
    partial = _record(success=True, error="RuntimeError: gateway did not start",
                      failed_stage="edge_agents_stream")
    json_path, md_path = write_demo_timings(tmp_path, partial)
    doc = json.loads(json_path.read_text())
    assert doc["complete"] is False and doc["success"] is False
    assert doc["failed_stage"] == "edge_agents_stream"
    md = md_path.read_text()
    assert "stopped part-way: RuntimeError: gateway did not start" in md
    assert "(in stage `edge_agents_stream`)" in md
    assert "result: success" not in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_timings.json", "demo_timings.md"]


def test_run_demo_loop_leaves_the_timings_when_it_fails(
    roadloop_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_loop(outcome: LoopOutcome, *args) -> None:
        with outcome.timed("edge_agents_stream"):
            pass
        with outcome.timed("learning_loop"):
            raise RuntimeError("training crashed")

    monkeypatch.setattr(demo, "_demo_loop", broken_loop)
    with pytest.raises(RuntimeError, match="training crashed"):
        demo.run_demo_loop(review_turns=1, drift_turn=False, federated_turn=False)
    doc = json.loads((roadloop_home / "reports" / "demo_timings.json").read_text())
    assert list(doc["stages_s"]) == ["edge_agents_stream", "learning_loop"]
    assert doc["complete"] is False and doc["error"] == "RuntimeError: training crashed"
    assert doc["failed_stage"] == "learning_loop"
    assert (doc["flags"]["drift_turn"], doc["flags"]["federated_turn"],
            doc["flags"]["review_turns"]) == (False, False, 1)
    assert len(doc["load_average_start"]) == len(doc["load_average_end"]) == 3


def test_a_finished_run_names_its_timings_files_in_the_summary(
    roadloop_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def quick_loop(outcome: LoopOutcome, *args) -> None:
        with outcome.timed("edge_agents_stream"):
            pass

    monkeypatch.setattr(demo, "_demo_loop", quick_loop)
    outcome = demo.run_demo_loop()
    reports = roadloop_home / "reports"
    assert outcome.timings_files == [str(reports / "demo_timings.json"),
                                     str(reports / "demo_timings.md")]
    assert str(reports / "demo_timings.json") in outcome.summary()
    doc = json.loads((reports / "demo_timings.json").read_text())
    assert doc["complete"] and doc["success"] and doc["flags"]["review_turns"] == 0


def test_a_timings_file_that_cannot_be_written_does_not_fail_the_demo(
    roadloop_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def quick_loop(outcome: LoopOutcome, *args) -> None:
        with outcome.timed("edge_agents_stream"):
            pass

    def unwritable(folder: Path, record: dict) -> tuple[Path, Path]:
        raise OSError("read-only file system")

    monkeypatch.setattr(demo, "_demo_loop", quick_loop)
    monkeypatch.setattr(demo, "write_demo_timings", unwritable)
    outcome = demo.run_demo_loop()
    assert outcome.success and outcome.timings_files == []
    assert "edge_agents_stream" in outcome.timings
