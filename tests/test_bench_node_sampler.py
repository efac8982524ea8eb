"""benchmarks.node_sampler: per-slice node CPU states and dirty memory from /proc samples."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks.node_sampler import (
    NodeSampler,
    Sample,
    busy_s,
    read_sample,
    summarize_slices,
)


def _s(
    at: float,
    user: int,
    idle: int,
    iowait: int = 0,
    steal: int = 0,
    dirty_kb: int = 0,
    wb_kb: int = 0,
) -> Sample:
    # user nice system idle iowait irq softirq steal
    return Sample(at, (user, 0, 0, idle, iowait, 0, 0, steal), dirty_kb, wb_kb)


def test_slices_split_ticks_by_the_sample_that_ends_them() -> None:
    samples = [
        _s(100.0, 0, 0),
        _s(102.0, 100, 100),  # slice 0: 100 busy of 200
        _s(104.0, 300, 100, dirty_kb=2048),  # slice 0: +200 busy
        _s(106.0, 300, 200, iowait=100, steal=100, wb_kb=1024),  # slice 1
    ]
    got = summarize_slices(samples, start=100.0, duration=10.0, slice_s=5.0)
    assert got[0] == {
        "busy_pct": 75.0,
        "iowait_pct": 0.0,
        "steal_pct": 0.0,
        "dirty_mb": 2.0,
        "writeback_mb": 0.0,
    }
    assert got[1] == {
        "busy_pct": 0.0,
        "iowait_pct": 33.3,
        "steal_pct": 33.3,
        "dirty_mb": 0.0,
        "writeback_mb": 1.0,
    }
    outside = summarize_slices(samples, start=200.0, duration=5.0)
    assert outside == [dict.fromkeys(got[0], None)]  # no sample pair in the window


def test_unreadable_proc_files_give_no_sample(tmp_path: Path) -> None:
    assert read_sample(tmp_path / "missing", tmp_path / "missing") is None
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    (tmp_path / "meminfo").write_text("Dirty: 12 kB\n")
    assert read_sample(tmp_path / "stat", tmp_path / "meminfo") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_sampler_reads_this_machine() -> None:
    with NodeSampler(interval_s=0.01) as node:
        pass
    assert len(node.samples) >= 2  # the first read and the one at exit
    (first,) = node.slices(node.samples[0].at, 60.0, slice_s=60.0)
    assert first["busy_pct"] is None or 0.0 <= first["busy_pct"] <= 100.0


def test_busy_seconds_count_what_the_slices_count() -> None:
    """user, nice, system, irq and softirq; not idle, iowait or steal (``frame_files``'s node
    figure uses it)."""
    tick = os.sysconf("SC_CLK_TCK")
    sample = Sample(0.0, (1 * tick, 2 * tick, 3 * tick, 100 * tick, 50 * tick, 4 * tick,
                          5 * tick, 60 * tick), 0, 0)
    assert busy_s(sample) == pytest.approx(15.0)
