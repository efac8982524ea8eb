"""benchmarks.quiet: a benchmark run's deletion is remembered, and the next wait honours it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks import quiet
from benchmarks.quiet import remove_tree, seconds_since_removal, set_aside, wait_for_quiet


def test_remove_tree_deletes_and_records_when(tmp_path: Path) -> None:
    tree = tmp_path / "home" / "fleet"
    tree.mkdir(parents=True)
    (tree / "frame.jpg").write_bytes(b"x")
    marker = tmp_path / "marker"
    assert seconds_since_removal(marker) is None
    before = time.time()
    remove_tree(tmp_path / "home", marker)
    assert not (tmp_path / "home").exists()
    since = seconds_since_removal(marker)
    assert since is not None and 0 <= since <= time.time() - before + 1
    assert [p.name for p in tmp_path.iterdir()] == ["marker"]  # no temp file left


def test_set_aside_moves_a_run_whole_and_records_no_removal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--keep-files``: the run's files are renamed into the given folder, intact, and no
    removal is recorded (nothing was freed, so the next run need not wait)."""
    marker = tmp_path / "marker"
    monkeypatch.setattr(quiet, "REMOVAL_MARKER", marker)
    tree = tmp_path / "work" / "home" / "fleet"
    tree.mkdir(parents=True)
    (tree / "frame.jpg").write_bytes(b"x")
    kept = tmp_path / "kept"
    moved = set_aside(tmp_path / "work" / "home", kept)
    assert moved is not None and moved.parent == kept and moved.name.startswith("home-")
    assert (moved / "fleet" / "frame.jpg").read_bytes() == b"x"
    assert not (tmp_path / "work" / "home").exists()
    assert set_aside(tmp_path / "work" / "home", kept) is None  # nothing left to move
    assert seconds_since_removal(marker) is None and not marker.exists()


def test_a_recent_removal_keeps_the_machine_not_quiet(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    remove_tree(tmp_path / "absent", marker)  # a missing tree still counts as a removal
    seen = wait_for_quiet(max_io=100.0, max_cpu=100.0, max_cpu_avg60=100.0, timeout_s=0.0,
                          min_since_removal_s=3600.0, marker=marker)
    assert seen["quiet"] is False and seen["since_removal_s"] is not None
    marker.write_text(f"{time.time() - 7200:.3f}\n")  # two hours ago
    seen = wait_for_quiet(max_io=100.0, max_cpu=100.0, max_cpu_avg60=100.0, timeout_s=0.0,
                          min_since_removal_s=3600.0, marker=marker)
    assert seen["quiet"] is True and seen["since_removal_s"] >= 7200


@pytest.mark.parametrize("text", ["not a time\n", "nan\n", "inf\n", "-inf", "", "1e999"])
def test_an_unreadable_marker_does_not_block(tmp_path: Path, text: str) -> None:
    marker = tmp_path / "marker"
    marker.write_text(text)
    assert seconds_since_removal(marker) is None
    seen = wait_for_quiet(max_io=100.0, max_cpu=100.0, max_cpu_avg60=100.0, timeout_s=0.0,
                          marker=marker)
    assert seen["quiet"] is True and seen["since_removal_s"] is None


def test_a_busy_last_minute_keeps_the_machine_not_quiet(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after a test run the 10 s average is back under its limit while the minute's is
    not: the run would start on a machine still busy."""
    from benchmarks import quiet

    proc = tmp_path / "pressure"
    proc.mkdir()
    (proc / "io").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=1\n")

    def cpu(avg10: float, avg60: float) -> None:
        (proc / "cpu").write_text(f"some avg10={avg10} avg60={avg60} avg300=9.00 total=1\n")

    monkeypatch.setattr(quiet, "PRESSURE", proc)
    cpu(3.2, 40.0)
    seen = wait_for_quiet(timeout_s=0.0, min_since_removal_s=0.0, marker=tmp_path / "m")
    assert seen["quiet"] is False and seen["cpu_pressure_avg60"] == 40.0
    cpu(0.5, 1.0)
    seen = wait_for_quiet(timeout_s=0.0, min_since_removal_s=0.0, marker=tmp_path / "m")
    assert seen["quiet"] is True and seen["cpu_pressure_avg10"] == 0.5


def test_a_costly_file_creation_keeps_the_machine_not_quiet(tmp_path: Path) -> None:
    """Recently freed inodes make every new file walk past them (ext4 without a journal):
    the wait measures a file's creation where the run will write, and its probe files stay
    there (deleting them would add freed inodes of its own)."""
    quiet_otherwise = {"max_io": 100.0, "max_cpu": 100.0, "max_cpu_avg60": 100.0,
                       "timeout_s": 0.0, "min_since_removal_s": 0.0, "marker": tmp_path / "m"}
    work = tmp_path / "work"
    seen = wait_for_quiet(probe_dir=work, max_create_ms=-1.0, **quiet_otherwise)
    assert seen["quiet"] is False and isinstance(seen["file_create_ms"], float)
    seen = wait_for_quiet(probe_dir=work, max_create_ms=1e6, **quiet_otherwise)
    assert seen["quiet"] is True and seen["file_create_ms"] >= 0
    probes = [p for p in work.iterdir() if p.name.startswith(".create-probe-")]
    assert len(probes) == 2 and all(len(list(p.iterdir())) == 64 for p in probes)
    assert wait_for_quiet(**quiet_otherwise)["file_create_ms"] is None  # no probe asked
