"""What one upload request costs the gateway beyond its frames, in-process (no HTTP).

Two measurements, CPU time of this process (all its threads: the decode slot and the group
committer included), rounds alternated so that a drift of this shared host's speed falls on
both sides alike:

* **transaction**: the database work of one request's group-commit item, one frame (the
  device's ``last_seen_at``, the erasure lookup, the ``INSERT ... ON CONFLICT DO NOTHING``),
  each in its own SQLite write transaction as the committer runs it when requests come one
  at a time: the statements as the gateway built them until 2026-11-29 (per call, the
  device touched through the ORM's ``update(Device)``) against ``fleet.db``'s now (built
  once, Core, on the session's connection).
* **store_batch**: ``fleet.intake_batch.store_batch`` (metadata, JPEG checks and decode,
  files, group commit) for requests of 1, 16 and 32 frames; the fixed cost of a request and
  the cost of each further frame follow from the first two, and a frame's cost in requests of
  32 (the agent's default batch) against 16 is paired round by round.
* **threads at once**: requests of 16 frames stored by 1, 2 or 3 threads of one process at
  once, as a gateway worker's thread pool runs them when its agents' requests overlap: what
  sharing the interpreter's lock costs a frame (every file operation and the decode release
  it, and a waiting thread takes it over); and what one hand-over to another thread and back
  costs (``DecodePool.run`` of a function that does nothing), the unit behind the batch
  path's one hand-over to the decode slot per request instead of one per frame.

    python -m benchmarks.intake_request_cost --out benchmarks/results

Writes ``<out>/intake_request_cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from benchmarks.intake_loadgen import (
    JPEG_QUALITY,
    describe_jpegs,
    frame_metadata,
    load_jpegs,
)
from fleet.app import create_app
from fleet.auth import Principal, authenticate, create_enrollment_token
from fleet.config import GatewaySettings
from fleet.db import (
    Device,
    FrameErasureRow,
    FrameRow,
    erased_frames,
    insert_new_frames,
    touch_device,
)
from fleet.intake_batch import store_batch
from fleet.runtime import Gateway
from roadloop.fsutil import write_text_atomic

CAMERA = "cam-bench"
Transaction = Callable[[Session, str, list[dict[str, Any]], datetime], set[tuple[str, str]]]


def transaction_before(session: Session, device_id: str, rows: list[dict[str, Any]],
                       now: datetime) -> set[tuple[str, str]]:
    """The item's statements as ``fleet.intake`` built them until 2026-11-29."""
    session.execute(update(Device).where(Device.device_id == device_id).values(last_seen_at=now))
    session.execute(select(
        FrameErasureRow.camera_id, FrameErasureRow.since, FrameErasureRow.covers_until,
        FrameErasureRow.erased_at).where(FrameErasureRow.camera_id.in_([CAMERA]))).all()
    table = FrameRow.__table__
    stmt = (sqlite_insert(table).on_conflict_do_nothing(index_elements=["camera_id", "frame_id"])
            .returning(table.c.camera_id, table.c.frame_id))  # type: ignore[attr-defined]
    return {(c, f) for c, f in session.execute(stmt, rows)}


def transaction_now(session: Session, device_id: str, rows: list[dict[str, Any]],
                    now: datetime) -> set[tuple[str, str]]:
    """The item's statements as ``fleet.intake`` runs them (``fleet.db``)."""
    touch_device(session, device_id, now)
    erased_frames(session, [(r["camera_id"], r["frame_id"], r["captured_at"]) for r in rows])
    return insert_new_frames(session, rows)


class Bench:
    """A gateway (its lifespan running), one enrolled device, fresh frame ids."""

    def __init__(self, gw: Gateway, principal: Principal, jpegs: list[Any],
                 prefix: str = "f") -> None:
        self.gw, self.principal, self.jpegs, self.prefix = gw, principal, jpegs, prefix
        self.n = 0
        self.base = datetime.now(UTC) - timedelta(minutes=10)

    def _next(self) -> tuple[str, datetime, Any]:
        i, self.n = self.n, self.n + 1
        return (f"{self.prefix}{i:08d}", self.base + timedelta(milliseconds=i),
                self.jpegs[i % len(self.jpegs)])

    def entries(self, k: int) -> list[tuple[dict[str, Any], bytes]]:
        out = []
        for _ in range(k):
            fid, at, jpeg = self._next()
            out.append((frame_metadata(CAMERA, fid, jpeg, at.isoformat()), jpeg.data))
        return out

    def rows(self) -> list[dict[str, Any]]:
        fid, at, jpeg = self._next()
        return [{"camera_id": CAMERA, "frame_id": fid, "device_id": self.principal.device_id,
                 "captured_at": at, "received_at": self.gw.now(), "path": f"{CAMERA}/x/{fid}.jpg",
                 "width": jpeg.width, "height": jpeg.height, "size_bytes": len(jpeg.data),
                 "sha256": "0" * 64, "model_version": "bench", "importance": 1.0,
                 "reasons": ["base_rate"], "n_detections": 0, "recovered": False}]

    def transaction_ms(self, fn: Transaction, n: int) -> float:
        db, device_id = self.gw.db, str(self.principal.device_id)
        items = [self.rows() for _ in range(n)]
        t0 = time.process_time()
        for rows in items:
            with db.writer_turn(), db.write() as session:
                with session.begin_nested():
                    inserted = fn(session, device_id, rows, self.gw.now())
                session.commit()
            assert len(inserted) == 1
        return (time.process_time() - t0) / n * 1000

    def store_batch_ms(self, frames: int, requests: int) -> float:
        batches = [self.entries(frames) for _ in range(requests)]
        t0 = time.process_time()
        for entries in batches:
            result, _ = store_batch(self.gw, self.principal, entries)
            assert result.stored == frames, result
        return (time.process_time() - t0) / requests * 1000


def threads_at_once_ms(benches: list[Bench], requests: int) -> float:
    """CPU ms a frame when ``len(benches)`` threads each store ``requests`` requests of 16
    frames at the same time (each thread its own frame ids)."""
    threads = [threading.Thread(target=b.store_batch_ms, args=(16, requests)) for b in benches]
    t0 = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.process_time() - t0) * 1000 / (16 * requests * len(benches))


def hand_over_us(gw: Gateway, n: int = 2000) -> float:
    """CPU µs of one hand-over to a decode thread and back, the function doing nothing."""
    t0 = time.process_time()
    for _ in range(n):
        gw.decoders.run(5.0, int)
    return (time.process_time() - t0) * 1e6 / n


THREADS = (1, 2, 3)


def measure_threads(benches: list[Bench], rounds: int, requests: int = 48) -> dict[str, Any]:
    """``threads_at_once_ms`` for 1, 2 and 3 threads (``requests`` in all each time), order
    reversed every other round; the hand-over cost, alternated with them."""
    per: dict[int, list[float]] = {k: [] for k in THREADS}
    hops: list[float] = []
    for r in range(rounds):
        for k in THREADS if r % 2 == 0 else THREADS[::-1]:
            per[k].append(threads_at_once_ms(benches[:k], requests // k))
        hops.append(hand_over_us(benches[0].gw))
    return {
        "threads_ms_per_frame": {str(k): {"median": round(statistics.median(v), 3),
                                          "rounds": [round(x, 3) for x in v]}
                                 for k, v in per.items()},
        "threads_extra_ms_per_frame": {
            str(k): round(statistics.median([b - a for a, b in zip(per[1], per[k],
                                                                    strict=True)]), 3)
            for k in THREADS[1:]},
        "hand_over_us": {"median": round(statistics.median(hops), 1),
                         "rounds": [round(x, 1) for x in hops]},
    }


def measure(bench: Bench, rounds: int) -> dict[str, Any]:
    tx: dict[str, list[float]] = {"before": [], "now": []}
    req: dict[int, list[float]] = {1: [], 16: [], 32: []}
    for fn in (transaction_before, transaction_now):  # warm both paths (statement caches)
        bench.transaction_ms(fn, 20)
    bench.store_batch_ms(1, 10), bench.store_batch_ms(16, 3)
    for r in range(rounds):
        order = [("before", transaction_before), ("now", transaction_now)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            tx[name].append(bench.transaction_ms(fn, 150))
        sizes = [(1, 120), (16, 10), (32, 5)]  # the same 160 frames in both batch sizes
        for frames, requests in sizes if r % 2 == 0 else [sizes[0], *sizes[:0:-1]]:
            req[frames].append(bench.store_batch_ms(frames, requests))
    med = {k: statistics.median(v) for k, v in req.items()}
    per_frame = (med[16] - med[1]) / 15
    # a frame's cost in requests of 32 against 16, round by round (same host moment)
    ratios = [(b / 32) / (a / 16) for a, b in zip(req[16], req[32], strict=True)]
    return {
        "transaction_ms": {k: {"median": round(statistics.median(v), 3),
                               "rounds": [round(x, 3) for x in v]} for k, v in tx.items()},
        "store_batch_ms_per_request": {str(k): {"median": round(med[k], 3),
                                                "rounds": [round(x, 3) for x in v]}
                                       for k, v in req.items()},
        "fixed_ms_per_request": round(med[1] - per_frame, 3),
        "ms_per_further_frame": round(per_frame, 3),
        "frame_in_32_vs_16": {"median_ratio": round(statistics.median(ratios), 3),
                              "rounds_cheaper": sum(x < 1 for x in ratios),
                              "rounds": [round(x, 3) for x in ratios]},
    }


def to_markdown(doc: dict[str, Any]) -> str:
    tx, req = doc["transaction_ms"], doc["store_batch_ms_per_request"]
    extra = doc["threads_extra_ms_per_frame"]
    la = " and ".join("/".join(f"{x:.2f}" for x in v) for v in doc["load_average_start_end"])
    header = (f"{doc['at']} · {doc['machine']} · {doc['jpegs']} · {doc['rounds']} rounds, "
              f"alternated · load average (1/5/15 min) at start and end: {la} · "
              "`python -m benchmarks.intake_request_cost`. CPU ms of this process (all its "
              "threads), median of the rounds.")
    before = (f"| built per call, device touched through the ORM (until 2026-11-29) | "
              f"{tx['before']['median']} | {', '.join(map(str, tx['before']['rounds']))} |")
    now = (f"| built once, Core, on the session's connection (`fleet.db`) | "
           f"{tx['now']['median']} | {', '.join(map(str, tx['now']['rounds']))} |")
    summary = (f"A request's fixed cost: **{doc['fixed_ms_per_request']} ms**; each further "
               f"frame: **{doc['ms_per_further_frame']} ms** (from the two medians). Not "
               "included: HTTP parsing, the middleware stack and the event loop "
               "(`gateway_intake` measures the whole server).")
    vs = doc["frame_in_32_vs_16"]
    batch32 = (f"A frame in requests of 32 against 16, paired round by round: "
               f"**{vs['median_ratio']}×** the CPU (median), cheaper in {vs['rounds_cheaper']} "
               f"of {len(vs['rounds'])} rounds ({', '.join(map(str, vs['rounds']))}).")
    return "\n".join([
        "# Gateway intake: what a request costs beyond its frames (in-process)", "", header, "",
        "## One request's database transaction (one frame, SQLite, as the committer runs it)",
        "", "| statements | CPU ms | rounds |", "|---|---|---|", before, now, "",
        "## `store_batch` per request (checks, decode, files, group commit)", "",
        "| frames a request | CPU ms a request | ms a frame |", "|---|---|---|",
        *(f"| {k} | {v['median']} | {v['median'] / int(k):.3f} |" for k, v in req.items()),
        "", summary, "", batch32, "",
        "## Requests of 16 frames stored by threads of one process at once", "",
        ("Each thread its own frames; the same number of requests in all. What a gateway "
         "worker pays when its agents' requests overlap: the threads take turns on the "
         "interpreter's lock, handed over at every file operation and decode."), "",
        "| threads at once | CPU ms a frame | more than 1 thread (paired median) | rounds |",
        "|---|---|---|---|",
        *(f"| {k} | {v['median']} | {extra.get(k, '–')} | {', '.join(map(str, v['rounds']))} |"
          for k, v in doc["threads_ms_per_frame"].items()),
        "", (f"One hand-over to a decode thread and back (`DecodePool.run` of a function that "
             f"does nothing): **{doc['hand_over_us']['median']} µs** of CPU (rounds: "
             f"{', '.join(map(str, doc['hand_over_us']['rounds']))})."), "",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pool", type=int, default=48)
    ap.add_argument("--synthetic-jpegs", action="store_true",
                    help="synthetic textures instead of the shared videos' frames")
    args = ap.parse_args(argv)
    load_start = [round(x, 2) for x in os.getloadavg()]
    jpegs, source = load_jpegs(args.pool, 640, JPEG_QUALITY, synthetic=args.synthetic_jpegs)
    with tempfile.TemporaryDirectory() as tmp:
        # the device's rate limit out of the way: measure the work, not the limit
        app = create_app(GatewaySettings(home=Path(tmp) / "home", rate_limit_per_s=1e6,
                                         rate_limit_burst=10**6))
        with TestClient(app) as client:  # the lifespan: committer, decode pool, caches
            gw: Gateway = app.state.gateway
            with gw.db.write() as session:
                token, _ = create_enrollment_token(session, gw.now(), ttl_s=600,
                                                   camera_id=CAMERA)
                session.commit()
            r = client.post("/v1/enroll", json={"enrollment_token": token, "camera_id": CAMERA,
                                                "agent_version": "bench"})
            r.raise_for_status()
            principal = authenticate(gw, r.json()["access_token"], "camera:write",
                                     device_only=True)
            doc: dict[str, Any] = {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} logical cores, "
                           f"Python {platform.python_version()}",
                "jpegs": describe_jpegs(jpegs, source, JPEG_QUALITY),
                "rounds": args.rounds,
                **measure(Bench(gw, principal, jpegs), args.rounds),
                **measure_threads([Bench(gw, principal, jpegs, prefix=f"t{k}-")
                                   for k in range(max(THREADS))], args.rounds),
            }
    doc["load_average_start_end"] = [load_start, [round(x, 2) for x in os.getloadavg()]]
    write_text_atomic(args.out / "intake_request_cost.json", json.dumps(doc, indent=2) + "\n",
                      parents=True)
    write_text_atomic(args.out / "intake_request_cost.md", to_markdown(doc), parents=True)
    print(to_markdown(doc))


if __name__ == "__main__":
    main()
