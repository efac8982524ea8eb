"""What the whole node was doing during a timed window, slice by slice.

A latency tail in one 5 s slice of an intake run can be the gateway, or the machine under it:
both cores busy, the kernel flushing dirty pages (``Dirty``/``Writeback`` in
``/proc/meminfo``), tasks waiting on the disk (``iowait``), or the hypervisor running another
guest on these cores (``steal``). ``NodeSampler`` reads ``/proc/stat`` and ``/proc/meminfo``
on a thread every ``interval_s`` and reports, per slice of the window, the share of all
cores' time in each state and the most dirty / under-write-back memory seen. Linux only;
elsewhere it reports nothing.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

PROC_STAT = Path("/proc/stat")
PROC_MEMINFO = Path("/proc/meminfo")
# /proc/stat's aggregate "cpu" line: user nice system idle iowait irq softirq steal ...
_BUSY = (0, 1, 2, 5, 6)
_IDLE, _IOWAIT, _STEAL = 3, 4, 7


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.perf_counter()
    ticks: tuple[int, ...]  # the aggregate cpu line's first 8 fields
    dirty_kb: int
    writeback_kb: int


def read_sample(stat: Path = PROC_STAT, meminfo: Path = PROC_MEMINFO) -> Sample | None:
    try:
        first = stat.read_text().splitlines()[0].split()
        mem = {}
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback"):
                mem[key] = int(rest.split()[0])
    except (OSError, IndexError, ValueError):
        return None
    if first[0] != "cpu" or len(first) < 9:
        return None
    ticks = tuple(int(v) for v in first[1:9])
    return Sample(time.perf_counter(), ticks, mem.get("Dirty", 0), mem.get("Writeback", 0))


def busy_s(sample: Sample) -> float:
    """Seconds every core had been busy (user, nice, system, irq, softirq) since boot at
    ``sample``: what the slices' busy share counts, not idle, iowait or steal."""
    return sum(sample.ticks[i] for i in _BUSY) / os.sysconf("SC_CLK_TCK")


def summarize_slices(
    samples: list[Sample], start: float, duration: float, slice_s: float = 5.0
) -> list[dict[str, Any]]:
    """Per ``slice_s`` of ``[start, start + duration)``: busy / iowait / steal as % of all
    cores' time between consecutive samples that end in the slice, and the most dirty and
    write-back memory (MB) sampled in it. A slice without two samples is ``None`` values."""
    n = max(1, math.ceil(duration / slice_s))
    acc: list[list[int]] = [[0, 0, 0, 0] for _ in range(n)]  # busy, iowait, steal, total
    dirty: list[int] = [-1] * n
    writeback: list[int] = [-1] * n
    for prev, cur in itertools.pairwise(samples):
        k = int((cur.at - start) // slice_s)
        if not 0 <= k < n:
            continue
        d = [c - p for c, p in zip(cur.ticks, prev.ticks, strict=True)]
        acc[k][0] += sum(d[i] for i in _BUSY)
        acc[k][1] += d[_IOWAIT]
        acc[k][2] += d[_STEAL]
        acc[k][3] += sum(d)
        dirty[k] = max(dirty[k], cur.dirty_kb)
        writeback[k] = max(writeback[k], cur.writeback_kb)
    out = []
    for (busy, iowait, steal, total), dk, wk in zip(acc, dirty, writeback, strict=True):
        if total <= 0:
            out.append(
                {
                    "busy_pct": None,
                    "iowait_pct": None,
                    "steal_pct": None,
                    "dirty_mb": None,
                    "writeback_mb": None,
                }
            )
            continue
        out.append(
            {
                "busy_pct": round(100 * busy / total, 1),
                "iowait_pct": round(100 * iowait / total, 1),
                "steal_pct": round(100 * steal / total, 1),
                "dirty_mb": round(dk / 1024, 1),
                "writeback_mb": round(wk / 1024, 1),
            }
        )
    return out


class NodeSampler:
    """``with NodeSampler() as s: ...`` then ``s.slices(start, duration)``."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            sample = read_sample()
            if sample is not None:
                self.samples.append(sample)
            if self._stop.wait(self.interval_s):
                break
        final = read_sample()
        if final is not None:
            self.samples.append(final)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def slices(self, start: float, duration: float, slice_s: float = 5.0) -> list[dict[str, Any]]:
        return summarize_slices(self.samples, start, duration, slice_s)
