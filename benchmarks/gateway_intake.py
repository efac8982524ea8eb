"""Fleet gateway intake benchmark: real server, real JPEGs, N closed-loop simulated agents.

Starts ``python -m fleet serve`` (loopback) on a fresh home per variant, enrolls each simulated
agent as its own device (its own camera), builds every request body before the timed window
(``benchmarks.intake_loadgen``: raw asyncio HTTP/1.1 keep-alive connections, one task per
agent), then every agent uploads in a closed loop for a fixed time. Per variant it reports
frames/s and requests/s acknowledged (201 or 409), P50/P99 latency of a frame's
acknowledgement (its request's latency), CPU ms per acknowledged frame of the gateway and of
the load generator, the load generator's share of the node, the load average before/after,
the server's time per stage (``GET /v1/stats``) and ``lost`` = acknowledged frames that are
not both a ``frames`` row and a complete frame-store entry afterwards (must be 0), and
duplicate rows (must be 0).

A variant is a combination of settings: ``--batch 1,8,16`` (1 = one multipart
``POST /v1/frames`` per frame, B > 1 = ``POST /v1/frames/batch`` with B frames), the
gateway's ``--frame-sync group,per_file``, ``--principal-cache 0,2`` (seconds),
``--read-back true,false``, ``--jpeg-decode reduced,dc``, ``--workers 1,2`` and any
``--set ROADLOOP_GATEWAY_X=V``; the grid is their product. ``--levers`` runs the lever ladder
instead: one row per lever added on top of the previous one (``LEVERS``), rendered as the
"levers" table. A lever whose setting this checkout's gateway does not have (or the batch
route, when the gateway answers 404) is skipped, listed as such, and adds nothing. ``--kill-after S`` SIGKILLs the gateway (every process) S seconds
into each variant, restarts it on the same home and port, lets the agents re-send what was
not acknowledged, and checks that every frame acknowledged before or after the kill is
stored exactly once (with ``--levers`` it adds one such durability run at the last lever).

The full measurement, every table in one command (run it on a quiet machine):

    python -m benchmarks.gateway_intake --levers --agents 32 --duration 20 --kill-after 8

Closed loop gives the most the node takes (latency is then mostly queueing); the P99 at the
target rate comes from paced agents (``--offered-fps``: each agent's requests fall due at
fixed intervals, latency from the due time):

    python -m benchmarks.gateway_intake --levers --agents 32 --duration 20 --offered-fps 1000 \
        --name gateway_intake_paced1000

Short development run:

    python -m benchmarks.gateway_intake --batch 1,16 --agents 16 --duration 5

JPEGs are frames of the shared videos re-encoded at 640 px wide, quality 85 (~45 KB);
each carries its edge-computed quality block, as the agent sends it.
Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (``--name``, default ``gateway_intake``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import resource
import signal
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from benchmarks.intake_loadgen import (
    BATCH_CONTENT_TYPE,
    JPEG_QUALITY,
    AgentPlan,
    AgentResult,
    Jpeg,
    host_decode_ms,
    install_fast_loop,
    load_jpegs,
    run_agent,
    weighted_percentile,
)
from benchmarks.intake_report import measured_findings, summarize, to_markdown
from benchmarks.node_sampler import NodeSampler
from benchmarks.quiet import remove_tree, set_aside, wait_for_quiet
from launch.localfleet import GatewayProcess
from roadloop.data.frames import FrameStore

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
TARGET_FPS = 1000.0
TARGET_P99_MS = 200.0
ENV = "ROADLOOP_GATEWAY_"


@dataclass(frozen=True)
class Variant:
    """One benchmark run: frames per request and the gateway's environment."""

    name: str
    batch: int = 1
    env: dict[str, str] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # GatewaySettings fields this variant's lever needs
    lever: str | None = None  # what this row adds on top of the previous one (--levers)


# Each lever adds (env, batch) on top of the previous row; ``requires`` names the gateway
# settings it needs (absent in this checkout: the row is skipped, not faked).
_BASE = {f"{ENV}FRAME_SYNC": "per_file", f"{ENV}PRINCIPAL_CACHE_S": "0",
         f"{ENV}FRAME_READ_BACK": "true", f"{ENV}JPEG_DECODE": "reduced", f"{ENV}WORKERS": "1",
         f"{ENV}WORKER_SOCKETS": "shared"}
LEVERS: list[tuple[str, str, dict[str, str], int | None, tuple[str, ...]]] = [
    # (row name, lever, env added, batch (None: unchanged), settings required)
    ("baseline", ("single multipart uploads, per-file fsync, a DB read per upload to "
     "authenticate, sidecar read back, reduced-scale decode"), {}, 1, ()),
    ("+principal-cache", "cached principals (2 s)", {f"{ENV}PRINCIPAL_CACHE_S": "2"}, None,
     ("principal_cache_s",)),
    ("+group-sync", "one sync of the frame store per group commit",
     {f"{ENV}FRAME_SYNC": "group"}, None, ("frame_sync",)),
    ("+no-read-back", "no sidecar read-back from disk", {f"{ENV}FRAME_READ_BACK": "false"},
     None, ("frame_read_back",)),
    ("+dc-decode", "one 1/8-scale (DC) decode per JPEG", {f"{ENV}JPEG_DECODE": "dc"}, None,
     ("jpeg_decode",)),
    ("+batch-8", "8 frames per request (POST /v1/frames/batch)", {}, 8, ()),
    ("+batch-16", "16 frames per request", {}, 16, ()),
    ("+2-workers", "two gateway worker processes (one shared socket)", {f"{ENV}WORKERS": "2"},
     None, ("workers",)),
    ("+own-sockets", "each worker its own SO_REUSEPORT socket",
     {f"{ENV}WORKER_SOCKETS": "reuse_port"}, None, ("worker_sockets",)),
    ("+4-workers", "four worker processes on the two cores", {f"{ENV}WORKERS": "4"}, None,
     ("workers",)),
]


def gateway_fields() -> set[str]:
    """The settings this checkout's gateway has (a lever on a missing one is skipped)."""
    from fleet.config import GatewaySettings

    return set(GatewaySettings.model_fields)


def _skip(v: Variant, fields: set[str]) -> dict[str, Any] | None:
    absent = [f for f in v.requires if f not in fields]
    if not absent:
        return None
    return {"variant": v.name, "lever": v.lever,
            "skipped": f"setting(s) {', '.join(absent)} not in this gateway"}


def run_levers(run: Callable[[Variant, float | None], dict[str, Any]], fields: set[str],
               kill_after: float | None = None,
               fixed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The ladder: each lever on top of the last one that ran (a lever this gateway lacks is
    skipped and adds nothing); with ``kill_after`` one more run of the last rung, SIGKILLed.
    ``fixed`` settings apply to every rung."""
    env, batch, last, results = {**_BASE, **(fixed or {})}, 1, None, []
    for name, lever, add, b, requires in LEVERS:
        v = Variant(name, b if b is not None else batch, {**env, **add}, requires, lever)
        r = _skip(v, fields) or run(v, None)
        results.append(r)
        if "skipped" not in r:
            env, batch, last = v.env, v.batch, v
    if kill_after is not None and last is not None:
        results.append(run(Variant(f"{last.name} SIGKILL", last.batch, last.env), kill_after))
    return results


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def fixed_env(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as gateway environment variables (``ROADLOOP_GATEWAY_`` optional)."""
    out = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        out[k if k.startswith(ENV) else ENV + k.upper()] = v
    return out


def grid_variants(batch: str, frame_sync: str | None, principal_cache: str | None,
                  read_back: str | None, workers: str | None, fixed: list[str],
                  jpeg_decode: str | None = None) -> list[Variant]:
    """The product of the listed values; an axis left out keeps the gateway's default."""
    axes: list[tuple[str, str, list[str]]] = []
    for key, short, values in (("FRAME_SYNC", "sync", frame_sync),
                               ("PRINCIPAL_CACHE_S", "pc", principal_cache),
                               ("FRAME_READ_BACK", "readback", read_back),
                               ("JPEG_DECODE", "decode", jpeg_decode),
                               ("WORKERS", "w", workers)):
        if values:
            axes.append((key, short, _csv(values)))
    base = fixed_env(fixed)
    out = []
    for b in [int(x) for x in _csv(batch)]:
        for combo in itertools.product(*[vals for _, _, vals in axes]):
            env = dict(base)
            parts = ["single" if b == 1 else f"batch-{b}"]
            for (key, short, _), v in zip(axes, combo, strict=True):
                env[ENV + key] = v
                parts.append(f"{short}={v}")
            parts += [kv for kv in fixed]
            out.append(Variant(" ".join(parts), b, env))
    return out


# ---------------------------------------------------------------------------- server
def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss_mb(proc: psutil.Process) -> float:
    """Resident memory of the gateway and its workers, MB."""
    total = 0
    for p in _tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


def _cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in _tree(proc):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _server(home: Path, extra_env: dict[str, str], port: int = 0) -> GatewayProcess:
    env = {
        # Throughput test: the per-device limiter (default 50/s) would be the limit.
        f"{ENV}RATE_LIMIT_PER_S": "1000000",
        f"{ENV}RATE_LIMIT_BURST": "1000000",
        **extra_env,
    }
    return GatewayProcess(home, port=port, env=env, log_path=home / "gateway.log",
                          extra_args=["--log-level", "warning"])


def sigkill_tree(server: GatewayProcess) -> None:
    """SIGKILL the gateway and every worker it spawned (no graceful anything)."""
    assert server.process is not None
    procs = _tree(psutil.Process(server.process.pid))
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    server.process.wait(10)
    server.process = None


# ---------------------------------------------------------------------------- agents
async def _enroll(client: httpx.AsyncClient, admin: str, camera_id: str) -> str:
    h = {"Authorization": f"Bearer {admin}"}
    tok = (await client.post("/v1/enrollment-tokens", json={"camera_id": camera_id},
                             headers=h)).json()["enrollment_token"]
    r = await client.post("/v1/enroll", json={"enrollment_token": tok, "camera_id": camera_id,
                                              "agent_version": "bench"})
    r.raise_for_status()
    return r.json()["access_token"]


async def _enroll_all(url: str, admin: str, agents: int) -> tuple[list[str], list[str], int]:
    """(camera ids, access tokens, status of an empty batch: 404/405 = no batch route)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        cams = [f"bench-{i:03d}" for i in range(agents)]
        tokens = [await _enroll(c, admin, cam) for cam in cams]
        probe = await c.post("/v1/frames/batch", content=b"",
                             headers={"Authorization": f"Bearer {tokens[0]}",
                                      "Content-Type": BATCH_CONTENT_TYPE})
    return cams, tokens, probe.status_code


@dataclass
class KillReport:
    at_s: float
    acked_before: int
    restart_s: float
    server_cpu_before_s: float
    restart_thread_cpu_s: float  # this process's CPU to restart it: not the load generator's


def _start_measured(server: GatewayProcess) -> float:
    """Restart the gateway; returns the CPU seconds this thread spent on it."""
    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    server.start(90)
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    return (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


async def _drive(server: GatewayProcess, plans: list[AgentPlan], duration: float,
                 drain_s: float, kill_after: float | None, interval_s: float | None = None
                 ) -> tuple[list[AgentResult], float, KillReport | None, float]:
    """Run the agents; returns (results, timed window s, kill report, server CPU s before the
    kill: the killed processes' share, measured just before SIGKILL)."""
    host, port = "127.0.0.1", server.port
    start = time.perf_counter()
    results = [AgentResult(p.camera_id) for p in plans]
    # Paced agents start spread over one interval, not all at once.
    tasks = [asyncio.create_task(run_agent(
        p, r, host, port, start, duration, drain_s, interval_s,
        (interval_s or 0.0) * i / len(plans)))
        for i, (p, r) in enumerate(zip(plans, results, strict=True))]
    kill: KillReport | None = None
    if kill_after is not None:
        await asyncio.sleep(max(0.0, start + kill_after - time.perf_counter()))
        assert server.process is not None
        cpu_before = _cpu_seconds(psutil.Process(server.process.pid))
        at = time.perf_counter() - start
        sigkill_tree(server)
        acked_before = sum(len(r.acked) for r in results)
        t0 = time.perf_counter()
        restart_cpu = await asyncio.to_thread(_start_measured, server)
        kill = KillReport(round(at, 2), acked_before, round(time.perf_counter() - t0, 2),
                          round(cpu_before, 2), round(restart_cpu, 3))
        logger.info("SIGKILL at %.1f s (%d frames acknowledged); restarted in %.1f s",
                    at, acked_before, kill.restart_s)
    await asyncio.gather(*tasks)
    return results, duration, kill, kill.server_cpu_before_s if kill else 0.0


# ---------------------------------------------------------------------------- verify
def _frame_rows(home: Path, database_url: str | None) -> list[tuple[str, str]]:
    """``(camera_id, frame_id)`` of every ``frames`` row: the home's SQLite file, or the
    database of ``--set DATABASE_URL=...`` (it must start empty for this run)."""
    if not database_url:
        db = sqlite3.connect(home / "fleet" / "fleet.db")
        try:
            return [tuple(r) for r in db.execute("SELECT camera_id, frame_id FROM frames")]
        finally:
            db.close()
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text("SELECT camera_id, frame_id FROM frames"))]
    finally:
        engine.dispose()


def verify(home: Path, plans: list[AgentPlan], results: list[AgentResult],
           compare_bytes: bool, database_url: str | None = None) -> dict[str, Any]:
    """Every acknowledged frame is one ``frames`` row and a complete frame-store entry holding
    the JPEG that was sent (its size; its bytes when ``compare_bytes``)."""
    rows = _frame_rows(home, database_url)
    row_set = set(rows)
    store = FrameStore(home / "frames")
    stored_files = missing = acked_total = 0
    examples: list[str] = []
    for plan, res in zip(plans, results, strict=True):
        on_disk = {rec.frame_id: path for rec, path in store.iter_frames(res.camera_id)}
        stored_files += len(on_disk)
        for fid in set(res.acked):
            acked_total += 1
            path = on_disk.get(fid)
            ok = path is not None and (res.camera_id, fid) in row_set
            if ok:
                want = plan.jpeg_for(fid).data
                ok = (path.read_bytes() == want) if compare_bytes else (
                    path.stat().st_size == len(want))
            if not ok:
                missing += 1
                if len(examples) < 5:
                    examples.append(f"{res.camera_id}/{fid}")
    return {"acknowledged_distinct": acked_total, "rows": len(rows),
            "duplicate_rows": len(rows) - len(row_set), "frame_store_frames": stored_files,
            "lost": missing, "lost_examples": examples}


# ---------------------------------------------------------------------------- one variant
def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def seed_day_folders(frames_root: Path, cameras: list[str], days: int) -> None:
    """The date folders a long-running gateway's store holds under retention (30 days of raw
    frames by default): ``days`` folders before today per camera. Empty, because what they
    cost an upload is the per-folder lookup of "is this frame id stored already?"
    (``FrameStore.find_frame``), not the frames inside."""
    today = datetime.now(UTC).date()
    for cam in cameras:
        for d in range(1, days + 1):
            (frames_root / cam / (today - timedelta(days=d)).isoformat()).mkdir(parents=True)


def run_variant(v: Variant, agents: int, duration: float, jpegs: list[Jpeg], workdir: Path,
                *, kill_after: float | None = None, max_fps: float = 2500.0,
                offered_fps: float | None = None,
                drain_s: float = 30.0, warmup_s: float = 0.0,
                seed_days: int = 0) -> dict[str, Any]:
    home = workdir / v.name.replace(" ", "_").replace("=", "-").replace("+", "plus-")
    if home.exists():
        remove_tree(home)
    before = wait_for_quiet(probe_dir=workdir)
    server = _server(home, v.env)
    admin = server.admin_token()
    server.start(timeout_s=90)
    try:
        cams, tokens, probe = asyncio.run(_enroll_all(server.url, admin, agents))
        if v.batch > 1 and probe in (404, 405):
            return {"variant": v.name, "skipped": f"no batch route (empty batch -> {probe})"}
        if seed_days:
            seed_day_folders(home / "frames", cams, seed_days)
        host = urlsplit(server.url).netloc
        # Paced: each agent sends ``batch`` frames every interval (offered_fps in all).
        interval = v.batch * agents / offered_fps if offered_fps else None
        per_agent = (offered_fps or max_fps) * (duration + warmup_s
                                                + (kill_after is not None) * 5) / agents
        plans = []
        t_build = time.perf_counter()
        for i, (tok, cam) in enumerate(zip(tokens, cams, strict=True)):
            plan = AgentPlan(host, tok, cam, jpegs, v.batch, offset=i * 7)
            plan.prebuild(int(per_agent) + v.batch)
            plans.append(plan)
        build_s = time.perf_counter() - t_build
        warm: dict[str, Any] | None = None
        warm_results: list[AgentResult] = []
        if warmup_s > 0:  # same agents, same rate, before the timed window; reported apart
            warm_results, *_ = asyncio.run(_drive(server, plans, warmup_s, 0.0, None, interval))
            lat = [x for r in warm_results for x in r.latencies]
            warm = {"duration_s": warmup_s,
                    "acknowledged": sum(r.acked_in_window for r in warm_results),
                    "p50_ms": weighted_percentile(lat, 50),
                    "p99_ms": weighted_percentile(lat, 99)}
        assert server.process is not None
        cpu0_server = _cpu_seconds(psutil.Process(server.process.pid))
        rss_before = _rss_mb(psutil.Process(server.process.pid))
        load_before = _loadavg()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        logger.info("variant %s: %d agents x %d frames/request for %.0f s%s", v.name, agents,
                    v.batch, duration, f", SIGKILL at {kill_after} s" if kill_after else "")
        with NodeSampler() as node:
            t_wall = time.perf_counter()
            results, window, kill, cpu_killed = asyncio.run(
                _drive(server, plans, duration, drain_s if kill_after is not None else 5.0,
                       kill_after, interval))
            wall = time.perf_counter() - t_wall
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        assert server.process is not None
        cpu_server = _cpu_seconds(psutil.Process(server.process.pid)) + (
            cpu_killed - cpu0_server if kill else -cpu0_server)
        load_after = _loadavg()
        rss_after = _rss_mb(psutil.Process(server.process.pid))
        stats = httpx.get(f"{server.url}/v1/stats",
                          headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()
    finally:
        server.stop()
    every = [AgentResult(r.camera_id, acked=w.acked + r.acked)
             for w, r in zip(warm_results, results, strict=True)] if warm_results else results
    check = verify(home, plans, every, compare_bytes=kill is not None,
                   database_url=v.env.get(f"{ENV}DATABASE_URL"))
    cpu_loadgen = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) - (
        kill.restart_thread_cpu_s if kill else 0.0)
    out = summarize(v, agents, window, wall, results, check, cpu_server, cpu_loadgen,
                    load_before, load_after, stats, kill, build_s)
    out["machine_before"] = before
    out["warmup"] = warm
    out["node_by_5s"] = node.slices(t_wall, window, 5.0)
    out["server_rss_mb"] = {"before": rss_before, "after": rss_after}
    # The home stays until the whole run ends (``main``): deleting it here would slow the
    # next variant's file creation for six minutes (``benchmarks.quiet``).
    return out


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--levers", action="store_true",
                    help="the lever ladder (LEVERS) instead of the --batch/... grid")
    ap.add_argument("--batch", default="1", help="frames per request, comma-separated")
    ap.add_argument("--frame-sync", default=None, help="group,per_file")
    ap.add_argument("--principal-cache", default=None, help="seconds, e.g. 0,2")
    ap.add_argument("--read-back", default=None, help="true,false")
    ap.add_argument("--jpeg-decode", default=None, help="reduced,dc")
    ap.add_argument("--workers", default=None, help="e.g. 1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="gateway setting for every variant and lever rung (ROADLOOP_GATEWAY_ optional)")
    ap.add_argument("--kill-after", type=float, default=None,
                    help="SIGKILL the gateway this many seconds into each variant (with "
                    "--levers: one extra run at the last lever), restart it, check 0 lost")
    ap.add_argument("--offered-fps", type=float, default=None,
                    help="pace the agents to this many frames/s in all (latency from each "
                    "request's due time) instead of a closed loop")
    ap.add_argument("--warmup", type=float, default=0.0,
                    help="seconds the agents run (paced or not) before the timed window, on "
                    "the same gateway: reported apart (their frames are checked for loss too)")
    ap.add_argument("--seed-days", type=int, default=0, metavar="N",
                    help="give each camera N earlier date folders before the agents start, "
                    "as a store under retention holds (30: the default for raw frames)")
    ap.add_argument("--max-fps", type=float, default=2500.0,
                    help="frames pre-built per agent = max-fps x duration / agents")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY)
    ap.add_argument("--pool", type=int, default=48, help="distinct JPEGs cycled by the agents")
    ap.add_argument("--synthetic-jpegs", action="store_true",
                    help="synthetic textures instead of the shared videos' frames (smaller and "
                    "cheaper to decode: not comparable with runs on the videos)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--name", default="gateway_intake", help="report file name (no suffix)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep-files", type=Path, default=None, metavar="DIR",
                    help="move each run's files into DIR (same file system) instead of "
                    "deleting them: a deletion slows file creation here for ~6 minutes, "
                    "which the next run waits out (benchmarks.quiet); delete DIR afterwards")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    loop_impl = install_fast_loop()

    fields = gateway_fields()
    jpegs, source = load_jpegs(args.pool, args.width, args.jpeg_quality,
                               synthetic=args.synthetic_jpegs)
    load_before = _loadavg()
    decode_before = host_decode_ms(jpegs)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gateway-bench-"))

    def run(v: Variant, kill: float | None) -> dict[str, Any]:
        return run_variant(v, args.agents, args.duration, jpegs, workdir, kill_after=kill,
                           max_fps=args.max_fps, offered_fps=args.offered_fps,
                           warmup_s=args.warmup, seed_days=args.seed_days)

    try:
        if args.levers:
            results = run_levers(run, fields, args.kill_after, fixed_env(args.set))
        else:
            results = [_skip(v, fields) or run(v, args.kill_after) for v in grid_variants(
                args.batch, args.frame_sync, args.principal_cache, args.read_back,
                args.workers, args.set, args.jpeg_decode)]
    finally:
        keep_in = args.keep_files

        def dispose(path: Path) -> None:
            if keep_in is None:
                remove_tree(path)
            else:
                set_aside(path, keep_in)

        if args.workdir is None:
            dispose(workdir)
        else:
            for home in [p for p in workdir.iterdir() if (p / "fleet").is_dir()
                         or p.name.startswith(".create-probe-")]:
                dispose(home)
    cores = os.cpu_count() or 1
    doc = {
        "benchmark": "gateway_intake",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "command": "python -m benchmarks.gateway_intake "
                   + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": {"cpu": f"{platform.machine()}, {cores} logical cores", "cores": cores,
                    "python": platform.python_version(),
                    "note": "load generator shares these cores with the gateway",
                    "load_average": {"before": load_before, "after": _loadavg()},
                    "host_decode_ms_per_frame": {
                        "before": decode_before, "after": host_decode_ms(jpegs),
                        "note": "one thread's strict 1/8 grey decode of the pool, best of 5: "
                                "this host's speed at the time, in the gateway's own work"}},
        "load_generator": {"event_loop": loop_impl, "transport": "raw HTTP/1.1 keep-alive, "
                           "one connection per agent, bodies pre-built"},
        "agents": args.agents, "duration_s": args.duration, "levers": args.levers,
        "offered_fps": args.offered_fps, "seed_days": args.seed_days,
        "jpegs": {"source": source, "count": len(jpegs), "width": args.width,
                  "mean_bytes": round(statistics.fmean(len(j.data) for j in jpegs)),
                  "min_bytes": min(len(j.data) for j in jpegs),
                  "max_bytes": max(len(j.data) for j in jpegs)},
        "target": {"frames_per_s": TARGET_FPS, "p99_ms": TARGET_P99_MS, "lost": 0},
        "results": results,
    }
    doc["findings"] = measured_findings(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(doc, indent=2)), ("md", to_markdown(doc))):
        tmp = args.out / f".{args.name}.{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, args.out / f"{args.name}.{suffix}")
    print(to_markdown(doc))
    if any(r.get("lost") or r.get("duplicate_rows") for r in results):
        raise SystemExit("acknowledged frames lost or duplicated: see the report")


if __name__ == "__main__":
    main()
