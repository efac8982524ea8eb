"""Wait for a quiet machine before a timed run, and say how quiet it was.

Storage-bound benchmarks (the gateway's intake syncs the file system once per group
commit) inherit whatever write-back an earlier run left behind: deleting the last run's
~20,000 frames keeps the disk busy for tens of seconds (ext4 mounted with ``discard`` trims
every freed extent), and a ``syncfs`` issued then waits for all of it. Measured on this
machine while writing this (those two runs' reports were not kept): the same variant ran at
1.50 ms of CPU and P99 463 ms right after a quiet spell, and at 1.80 ms and P99 7.2 s when
started 12 s after the previous run's clean-up.

Linux's pressure-stall information (``/proc/pressure/{io,cpu}``: the share of the last 10 s
in which some task waited for the resource) says when the machine is quiet again; the load
average lags by a minute and counts tasks in disk sleep the same as runnable ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PRESSURE = Path("/proc/pressure")


def pressure(resource: str) -> float | None:
    """``some avg10`` of ``/proc/pressure/<resource>`` (percent), None where not available."""
    try:
        first = (PRESSURE / resource).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=", 1) for f in first.split()[1:])
    return float(fields["avg10"])


def wait_for_quiet(max_io: float = 0.5, max_cpu: float = 5.0, timeout_s: float = 240.0,
                   ) -> dict[str, object]:
    """``sync``, then wait (at most ``timeout_s``) until I/O and CPU pressure over the last
    10 s are at most ``max_io`` / ``max_cpu`` percent. Returns what it saw, for the report:
    the pressures at the end, the seconds waited and whether it timed out."""
    t0 = time.monotonic()
    os.sync()
    while True:
        io, cpu = pressure("io"), pressure("cpu")
        quiet = (io is None or io <= max_io) and (cpu is None or cpu <= max_cpu)
        waited = time.monotonic() - t0
        if quiet or waited >= timeout_s:
            return {"io_pressure_avg10": io, "cpu_pressure_avg10": cpu,
                    "waited_s": round(waited, 1), "quiet": quiet,
                    "load_average": [round(x, 2) for x in os.getloadavg()]}
        time.sleep(1.0)
