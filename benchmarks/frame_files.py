"""What a request's frames cost to write: two files a frame, as the gateway's folder store
writes them, against one segment file a request (the lever of docs/capacity.md section 7).

Each request is 16 frames (the shared videos' JPEGs at quality 85, as ``gateway_intake``
sends them, and a record of a stored frame's size),
written either way with ``roadloop.fsutil.write_bytes_atomic`` (on Linux an unnamed file
linked into place, as the store does), then one ``syncfs`` through a ``SyncFsHandle``, as
the group committer does before each commit. Two CPU figures, per frame:

* **process**: this process's CPU (user + kernel), what a gateway worker would spend;
* **node**: every core's busy time (``/proc/stat`` as ``node_sampler`` counts it: not
  idle, iowait or steal), which adds the kernel's write-back
  threads — and whatever else ran on this shared host meanwhile, hence the rounds
  alternated and the paired medians.

    python -m benchmarks.frame_files --out benchmarks/results

Writes ``<out>/frame_files.json`` and ``.md``. It waits for a quiet machine first
(``benchmarks.quiet``), and removes its files at the end, which slows file creation on
this host for a few minutes (see ``benchmarks/quiet.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.intake_loadgen import JPEG_QUALITY, describe_jpegs, load_jpegs
from benchmarks.node_sampler import busy_s, read_sample
from benchmarks.quiet import MAX_CREATE_MS, remove_tree, wait_for_quiet
from roadloop.fsutil import (
    SyncFsHandle,
    ext4_without_journal,
    mount_of,
    write_bytes_atomic,
    write_text_atomic,
)

FRAMES_PER_REQUEST = 16
RECORD_BYTES = 2297  # a stored frame's record with 10 detections (docs/capacity.md, section 5)
Frame = tuple[str, bytes, bytes]  # file stem, JPEG, record
Write = Callable[[Path, int, list[Frame]], None]


def as_files(folder: Path, request: int, frames: list[Frame]) -> None:
    """Two files a frame, image then record, as ``FrameStore.write_frame`` names them."""
    for stem, jpeg, record in frames:
        write_bytes_atomic(folder / f"{stem}.jpg", jpeg)
        write_bytes_atomic(folder / f"{stem}.json", record)


def as_segment(folder: Path, request: int, frames: list[Frame]) -> None:
    """One file for the request: its frames' images and records, one after another."""
    write_bytes_atomic(folder / f"request-{request:06d}.seg",
                       b"".join(jpeg + record for _, jpeg, record in frames))


WAYS: dict[str, Write] = {"files": as_files, "segment": as_segment}


def node_busy_s() -> float:
    """Seconds every core of this machine has been busy since boot, as ``node_sampler``
    counts it for the server benchmark's slices."""
    sample = read_sample()
    if sample is None:
        raise RuntimeError("/proc/stat is unreadable: no node CPU figure on this system")
    return busy_s(sample)


def one_round(write: Write, folder: Path, sync: SyncFsHandle, jpegs: list[bytes],
              requests: int, first: int) -> tuple[float, float]:
    """(process, node) CPU ms a frame for ``requests`` requests written one way."""
    record = b"{" + b" " * (RECORD_BYTES - 2) + b"}"
    batches = [[(f"f{(first + r) * FRAMES_PER_REQUEST + i:08d}",
                 jpegs[(r * FRAMES_PER_REQUEST + i) % len(jpegs)], record)
                for i in range(FRAMES_PER_REQUEST)] for r in range(requests)]
    n0, p0 = node_busy_s(), time.process_time()
    for r, frames in enumerate(batches):
        write(folder, first + r, frames)
        sync.sync()
    p1, n1 = time.process_time(), node_busy_s()
    frames_written = requests * FRAMES_PER_REQUEST
    return (p1 - p0) * 1000 / frames_written, (n1 - n0) * 1000 / frames_written


def measure(where: Path, jpegs: list[bytes], rounds: int, requests: int) -> dict[str, Any]:
    """Both ways, ``rounds`` times, order reversed every other round; each way in its own
    folder (the store's day folder), both on ``where``'s file system."""
    folders = {name: where / name for name in WAYS}
    for folder in folders.values():
        folder.mkdir(parents=True)
    sync = SyncFsHandle(where)
    sync.arm()
    per: dict[str, dict[str, list[float]]] = {n: {"process": [], "node": []} for n in WAYS}
    first = 0
    names = list(WAYS)
    for r in range(-1, rounds):  # round -1 warms both up and is not kept
        for name in names if r % 2 == 0 else names[::-1]:
            process, node = one_round(WAYS[name], folders[name], sync, jpegs, requests, first)
            first += requests
            if r >= 0:
                per[name]["process"].append(process)
                per[name]["node"].append(node)
    out: dict[str, Any] = {"ways": {}}
    for name, figures in per.items():
        out["ways"][name] = {kind: {"median": round(statistics.median(v), 4),
                                    "rounds": [round(x, 4) for x in v]}
                             for kind, v in figures.items()}
    out["saved"] = {}
    for kind in ("process", "node"):
        diffs = [f - s for f, s in zip(per["files"][kind], per["segment"][kind], strict=True)]
        out["saved"][kind] = {"paired_median_ms": round(statistics.median(diffs), 4),
                              "segment_cheaper_in": sum(d > 0 for d in diffs),
                              "of": len(diffs)}
    return out


def to_markdown(doc: dict[str, Any]) -> str:
    la = " and ".join("/".join(f"{x:.2f}" for x in v) for v in doc["load_average_start_end"])
    header = (f"{doc['at']} · {doc['machine']} · {doc['jpegs']} · requests of "
              f"{FRAMES_PER_REQUEST} frames, {doc['requests_per_round']} a way in each of "
              f"{doc['rounds']} rounds, alternated · file system: {doc['file_system']} · "
              f"waited {doc['quiet']['waited_s']} s for a quiet machine (a new file then cost "
              f"{doc['quiet'].get('file_create_ms')} ms) · load average (1/5/15 min) at start "
              f"and end: {la} · `python -m benchmarks.frame_files`.")
    rows = []
    for name, what in (("files", "two files a frame (image, record), as the folder store"),
                       ("segment", "one segment file a request")):
        w = doc["ways"][name]
        rows.append(f"| {what} | {w['process']['median']} | {w['node']['median']} |")
    saved = doc["saved"]
    summary = (f"Writing a request as one segment saves **{saved['process']['paired_median_ms']} "
               f"ms** of this process's CPU a frame (cheaper in "
               f"{saved['process']['segment_cheaper_in']} of {saved['process']['of']} rounds) "
               f"and **{saved['node']['paired_median_ms']} ms** of the node's (cheaper in "
               f"{saved['node']['segment_cheaper_in']} of {saved['node']['of']}), paired medians. "
               "Every reader of the frame layout (the folder and object stores' listings, "
               "retention, erasure, reconcile, the Dagster assets) would have to learn "
               "segments for it: docs/capacity.md, section 7.")
    return "\n".join([
        "# Frame files: two a frame, or one segment a request", "", header, "",
        ("CPU ms a frame, median of the rounds; each request followed by one `syncfs`, as "
         "the gateway's group commit. *node*: all cores' busy time, the kernel's write-back "
         "threads included (and anything else running on this shared host)."), "",
        "| how a request's frames are written | process CPU ms a frame | node CPU ms a frame |",
        "|---|---|---|", *rows, "", summary, "",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--where", type=Path, default=None,
                    help="folder to write in (default: a new one in the system's temp folder)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--requests", type=int, default=60, help="requests a way in each round")
    ap.add_argument("--pool", type=int, default=48)
    ap.add_argument("--max-create-ms", type=float, default=MAX_CREATE_MS,
                    help="start once creating a file costs at most this (benchmarks.quiet); "
                    "a file system with no deletion in the last minutes: 0.02-0.04 ms here")
    ap.add_argument("--synthetic-jpegs", action="store_true",
                    help="synthetic textures instead of the shared videos' frames")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        ap.error("--rounds and --requests must be at least 1")
    if not args.max_create_ms > 0:  # also NaN: no file would ever be cheap enough
        ap.error("--max-create-ms must be a positive number of milliseconds")
    jpegs, source = load_jpegs(args.pool, 640, JPEG_QUALITY, synthetic=args.synthetic_jpegs)
    parent = args.where or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="frame-files-", dir=parent))
    try:
        quiet = wait_for_quiet(probe_dir=work, max_create_ms=args.max_create_ms)
        load_start = [round(x, 2) for x in os.getloadavg()]
        doc: dict[str, Any] = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} logical cores, "
                       f"Python {platform.python_version()}",
            "jpegs": describe_jpegs(jpegs, source, JPEG_QUALITY),
            "file_system": _file_system(work),
            "rounds": args.rounds, "requests_per_round": args.requests,
            "quiet": quiet,
            **measure(work / "run", [j.data for j in jpegs], args.rounds, args.requests),
        }
        doc["load_average_start_end"] = [load_start, [round(x, 2) for x in os.getloadavg()]]
    finally:
        remove_tree(work)
    write_text_atomic(args.out / "frame_files.json", json.dumps(doc, indent=2) + "\n",
                      parents=True)
    write_text_atomic(args.out / "frame_files.md", to_markdown(doc), parents=True)
    print(to_markdown(doc))


def _file_system(path: Path) -> str:
    """``<type> on <mount point>`` of the mount holding ``path`` (``fsutil.mount_of``)."""
    found = mount_of(path)
    if found is None:
        return "unknown"
    _, mount, fstype = found
    journal = {True: ", no journal", False: "", None: ""}[ext4_without_journal(path)]
    return f"{fstype} on {mount}{journal}"


if __name__ == "__main__":
    main()
