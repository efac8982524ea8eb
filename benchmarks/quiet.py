"""Wait for a quiet machine before a timed run, and say how quiet it was.

Storage-bound benchmarks (the gateway's intake creates two files per frame and syncs the
file system once per group commit) inherit what an earlier run left behind, in two ways:

* **Write-back.** Deleting the last run's ~20,000 frames keeps the disk busy for tens of
  seconds (ext4 mounted with ``discard`` trims every freed extent), and a ``syncfs`` issued
  then waits for all of it. Linux's pressure-stall information (``/proc/pressure/{io,cpu}``:
  the share of the last 10 s in which some task waited for the resource) says when the
  machine is quiet again; the load average lags by a minute and counts tasks in disk sleep
  the same as runnable ones.
* **ext4's inode allocator** (without a journal, as this host's root file system is: with
  one the check below is skipped). A new file does not take an inode freed less than 60 s
  ago (5 min while that inode's table block is still dirty): ``find_inode_bit`` walks past
  each one, calling ``recently_deleted`` per inode, for every file it creates. Right after
  a run's frames are deleted, the next run's new files land in the same block groups (ext4
  puts new folders where most inodes are free) and every ``open(O_CREAT)`` pays that walk.
  Measured here (``perf record -a``, 2026-11-27): ext4's new-inode path took 7-35 % of
  both cores' samples in the 5 s slices from about 40 to 55 s after such a deletion and
  none after about 60 s; the intake at 1000 frames/s ran at P99 3-6 s in the 4 of 4 runs
  whose quiet wait ended 26-36 s after the previous run's deletion, and at P99 66-866 ms
  in the runs started more than 65 s after one (benchmarks/results/gateway_intake_paced*).
  PSI does not show it (the walk is CPU time in the creating process), so the wait also
  lets ``MIN_SINCE_REMOVAL_S`` pass since the last ``remove_tree`` of any benchmark run
  on this machine (a marker file in the temp folder keeps the time across runs).

  That wait was 65 s until 2026-11-29, after ``RECENTCY_MIN``, and too short: an inode is
  "recent" for ``RECENTCY_MIN + RECENTCY_DIRTY`` = 360 s while its inode-table block is dirty
  in the buffer cache, and a run's own file creations dirty those blocks. Measured here
  (``benchmarks/results/intake-1129-s17/README.md``): creating a file took 0.25–1.24 ms of
  CPU from 1 to 4 minutes after in-process benchmarks deleted a few thousand files, 33–40 µs
  five minutes after — at two files a frame, up to 2.5 ms of a frame's CPU. (It is not what
  makes this host's slow hours: the slow runs of that day started with a file costing
  0.05–0.13 ms.) Deletions the marker does not know of (a test run's temporary folders, another
  script) have the same effect, so the wait also measures it: ``file_create_ms`` creates
  ``CREATE_PROBE_FILES`` files in a new folder beside the run's and waits until one costs at
  most ``MAX_CREATE_MS``, 0.15 ms — several times the 17–40 µs of a file system without
  recent deletions, under the walk's 0.25 ms and more.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

PRESSURE = Path("/proc/pressure")
# ext4's RECENTCY_MIN + RECENTCY_DIRTY (fs/ext4/ialloc.c): 60 + 300 s, and a margin.
MIN_SINCE_REMOVAL_S = 370.0
REMOVAL_MARKER = Path(tempfile.gettempdir()) / "roadloop-bench-last-removal"
CREATE_PROBE_FILES = 64
MAX_CREATE_MS = 0.15


def file_create_ms(where: Path, files: int = CREATE_PROBE_FILES) -> float:
    """CPU ms (this process, kernel time included) to create one empty file, as the gateway
    creates frame files, in a new folder under ``where``. The files stay: deleting them would
    add recently freed inodes of its own; they go when ``where`` does (a run's work folder)."""
    where.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix=".create-probe-", dir=where))
    t0 = time.process_time()
    for i in range(files):
        os.close(os.open(probe / f"{i}.tmp", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    return round((time.process_time() - t0) / files * 1000, 3)


def remove_tree(path: Path, marker: Path = REMOVAL_MARKER) -> None:
    """Delete a run's files and note when (``marker``), for ``wait_for_quiet``."""
    shutil.rmtree(path, ignore_errors=True)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    # Full precision: rounded to the millisecond, the stored time could lie up to 0.5 ms in
    # the future and a reading right after would be negative.
    tmp.write_text(f"{time.time()!r}\n")
    os.replace(tmp, marker)


def set_aside(path: Path, into: Path) -> Path | None:
    """Move a run's files into ``into`` instead of deleting them; where they went (None:
    ``path`` is absent). A rename frees no inode, so the next run's file creation is not
    slowed and ``wait_for_quiet`` has nothing to wait for: side-by-side runs can follow each
    other in a minute or two instead of ``MIN_SINCE_REMOVAL_S``. ``into`` must be on the same
    file system (``OSError`` otherwise). Delete it when the comparison is done: that
    deletion starts the slow period."""
    if not path.exists():
        return None
    into.mkdir(parents=True, exist_ok=True)
    target = into / f"{path.name}-{time.time_ns()}"
    os.rename(path, target)
    return target


def seconds_since_removal(marker: Path = REMOVAL_MARKER) -> float | None:
    """Wall-clock seconds since the last ``remove_tree`` (None: no record, or unreadable —
    including a time that is not finite, which would otherwise hold every wait to its
    timeout)."""
    try:
        removed = float(marker.read_text().strip())
    except (OSError, ValueError):
        return None
    return time.time() - removed if math.isfinite(removed) else None


def pressure(resource: str, window: str = "avg10") -> float | None:
    """``some <window>`` (``avg10``, ``avg60``, ``avg300``) of ``/proc/pressure/<resource>``
    (percent), None where not available."""
    try:
        first = (PRESSURE / resource).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=", 1) for f in first.split()[1:])
    return float(fields[window])


def wait_for_quiet(max_io: float = 0.5, max_cpu: float = 5.0, timeout_s: float = 600.0,
                   min_since_removal_s: float = MIN_SINCE_REMOVAL_S,
                   marker: Path = REMOVAL_MARKER, max_cpu_avg60: float = 5.0,
                   probe_dir: Path | None = None, max_create_ms: float = MAX_CREATE_MS,
                   ) -> dict[str, object]:
    """``sync``, then wait (at most ``timeout_s``) until I/O and CPU pressure over the last
    10 s are at most ``max_io`` / ``max_cpu`` percent, CPU pressure over the last minute at
    most ``max_cpu_avg60``, and ``min_since_removal_s`` have passed since the last
    ``remove_tree``, and, with ``probe_dir``, until creating a file there costs at most
    ``max_create_ms`` (``file_create_ms``, measured once the rest is quiet, at most every
    10 s). Returns what it saw, for the report: the pressures at the end, the seconds since
    that removal, the last file-creation cost, the seconds waited and whether it timed out.

    The minute's average: a run started 0 s after a test run had ended passed the 10 s check
    (3.2 %; load average 2.6) and ran its warm-up at P99 983 ms, its window at P99 407 ms;
    the same code two minutes later, P99 73 ms (``benchmarks/results/intake-1128-s14/``)."""
    t0 = time.monotonic()
    os.sync()
    create_ms: float | None = None
    probed_at = -math.inf
    while True:
        io, cpu, cpu60 = pressure("io"), pressure("cpu"), pressure("cpu", "avg60")
        since = seconds_since_removal(marker)
        quiet = ((io is None or io <= max_io) and (cpu is None or cpu <= max_cpu)
                 and (cpu60 is None or cpu60 <= max_cpu_avg60)
                 and (since is None or since >= min_since_removal_s))
        waited = time.monotonic() - t0
        if probe_dir is not None and (quiet or waited >= timeout_s):
            if create_ms is None or time.monotonic() - probed_at >= 10.0:
                create_ms, probed_at = file_create_ms(probe_dir), time.monotonic()
            quiet = quiet and create_ms <= max_create_ms
        if quiet or waited >= timeout_s:
            return {"io_pressure_avg10": io, "cpu_pressure_avg10": cpu,
                    "cpu_pressure_avg60": cpu60,
                    "since_removal_s": None if since is None else round(since, 1),
                    "file_create_ms": create_ms,
                    "waited_s": round(waited, 1), "quiet": quiet,
                    "load_average": [round(x, 2) for x in os.getloadavg()]}
        time.sleep(1.0)
