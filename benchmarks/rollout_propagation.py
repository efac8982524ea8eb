"""Rollout propagation benchmark: N simulated agents polling a real gateway for a new model.

Starts ``python -m fleet serve`` on a fresh home (with a platform signing key), enrolls N
devices over HTTP, then runs N simulated agents as asyncio tasks in this one process, each
with its own ``httpx.AsyncClient`` (one keep-alive connection per agent, as on a real fleet;
a single shared pool with N waiters spends its time in the pool's bookkeeping). Each agent, every ``--poll-interval`` seconds (random phase):

* ``GET /v1/manifest`` with ``If-None-Match`` (304 when unchanged);
* on a ``serve`` assignment for a model it does not run: verifies the manifest signature
  with the pinned public key, downloads ``GET /v1/models/<sha256>``, checks size + SHA-256,
  switches, and posts a heartbeat reporting the new ``model_version`` at once;
* a heartbeat every ``--heartbeat-interval`` seconds otherwise.

After a warm-up, the operator publishes a signed model, creates a rollout and advances it
stage by stage to 100 % (``/advance``). Measured: time from the 100 % stage until every agent
has *reported* the new version (a 202 for its heartbeat; checked against the gateway's table
afterwards), in seconds and in poll intervals; requests/s served; failed requests (transport
errors and unexpected status codes); latency P50/P99 per request kind; server CPU.

    python -m benchmarks.rollout_propagation --agents 1000 --poll-interval 5

Writes ``<out>/rollout_propagation.json`` and ``<out>/rollout_propagation.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sqlite3
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from launch.localfleet import GatewayProcess
from roadloop.release.signing import (
    build_manifest,
    load_or_create_signing_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
TARGET_INTERVALS = 2.0
KEEPALIVE_EXPIRY_S = 4.0


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))], 3)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    codes: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(
        lambda: defaultdict(int)))
    failures: list[str] = field(default_factory=list)
    requests: int = 0

    def record(self, kind: str, t0: float, status: int | None, ok: tuple[int, ...],
               err: str | None = None) -> None:
        self.requests += 1
        if status is not None:
            self.latencies[kind].append((time.perf_counter() - t0) * 1000)
            self.codes[kind][status] += 1
        if status not in ok:
            self.failures.append(f"{kind}: {status if status is not None else err}")


@dataclass
class SimAgent:
    camera_id: str
    device_id: str
    token: str
    model_version: str = "baseline"
    model_sha: str = "baseline"
    etag: str | None = None
    updated_at: float | None = None  # perf_counter when the new version was reported (202)


async def _request(client: httpx.AsyncClient, stats: Stats, kind: str, method: str, url: str,
                   ok: tuple[int, ...], **kw: Any) -> httpx.Response | None:
    t0 = time.perf_counter()
    try:
        r = await client.request(method, url, **kw)
    except httpx.HTTPError as exc:
        stats.record(kind, t0, None, ok, f"{type(exc).__name__}: {exc}")
        return None
    stats.record(kind, t0, r.status_code, ok)
    return r


async def _heartbeat(client: httpx.AsyncClient, stats: Stats, a: SimAgent,
                     extra: dict[str, Any]) -> bool:
    body = {"schema_version": 1, "camera_id": a.camera_id,
            "sent_at": datetime.now(UTC).isoformat(), "model_version": a.model_sha,
            "frames_processed": 100, "errors": 0, "latency_p95_ms": 30.0, **extra}
    r = await _request(client, stats, "heartbeat", "POST", "/v1/heartbeats", (202,), json=body,
                       headers={"Authorization": f"Bearer {a.token}"})
    return r is not None and r.status_code == 202


async def _agent(base: str, stats: Stats, a: SimAgent, public_key: str,
                 poll_s: float, heartbeat_s: float, stop: asyncio.Event) -> None:
    # Idle connections are dropped by the client before the server's keep-alive timeout
    # (uvicorn: 5 s) can close them under a request that is already on its way (a ReadError).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await _agent_loop(client, stats, a, public_key, poll_s, heartbeat_s, stop)


async def _agent_loop(client: httpx.AsyncClient, stats: Stats, a: SimAgent, public_key: str,
                      poll_s: float, heartbeat_s: float, stop: asyncio.Event) -> None:
    auth = {"Authorization": f"Bearer {a.token}"}
    await asyncio.sleep(random.uniform(0, poll_s))
    next_hb = time.perf_counter() + random.uniform(0, heartbeat_s)
    while not stop.is_set():
        headers = {**auth, **({"If-None-Match": a.etag} if a.etag else {})}
        r = await _request(client, stats, "manifest", "GET", "/v1/manifest", (200, 304),
                           headers=headers)
        if r is not None and r.status_code == 200:
            body = r.json()
            mode, manifest = body["assignment"]["mode"], body.get("manifest")
            settled = True
            if mode == "serve" and manifest and manifest["sha256"] != a.model_sha:
                settled = await _update(client, stats, a, manifest, public_key, auth)
            if settled:
                a.etag = r.headers.get("etag")
        if time.perf_counter() >= next_hb:
            await _heartbeat(client, stats, a, {})
            next_hb = time.perf_counter() + heartbeat_s
        try:
            await asyncio.wait_for(stop.wait(), poll_s)
        except TimeoutError:
            pass


async def _update(client: httpx.AsyncClient, stats: Stats, a: SimAgent, manifest: dict[str, Any],
                  public_key: str, auth: dict[str, str]) -> bool:
    verify_manifest(manifest, public_key)
    r = await _request(client, stats, "download", "GET", f"/v1/models/{manifest['sha256']}",
                       (200,), headers=auth)
    if r is None or r.status_code != 200:
        return False
    if len(r.content) != manifest["size"] or hashlib.sha256(r.content).hexdigest() != manifest[
            "sha256"]:
        stats.failures.append("download: size/sha256 mismatch")
        return False
    a.model_sha, a.model_version = manifest["sha256"], manifest["model_version"]
    ok = await _heartbeat(client, stats, a, {"rollout_id": manifest["rollout_id"],
                                             "update_status": "serving"})
    if ok and a.updated_at is None:
        a.updated_at = time.perf_counter()
    return ok


async def _run(server: GatewayProcess, admin: str, n: int, poll_s: float, heartbeat_s: float,
               warmup_s: float, model: Path, key_dir: Path, max_wait_intervals: float,
               connections: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        admin_h = {"Authorization": f"Bearer {admin}"}
        sem = asyncio.Semaphore(32)

        async def enroll(i: int) -> SimAgent:
            async with sem:
                cam = f"sim-{i:05d}"
                tok = (await client.post("/v1/enrollment-tokens", json={"camera_id": cam},
                                         headers=admin_h)).json()["enrollment_token"]
                r = await client.post("/v1/enroll", json={"enrollment_token": tok,
                                                          "camera_id": cam,
                                                          "agent_version": "bench"})
                r.raise_for_status()
                d = r.json()
                return SimAgent(cam, d["device_id"], d["access_token"])

        t = time.perf_counter()
        agents = await asyncio.gather(*[enroll(i) for i in range(n)])
        enroll_s = time.perf_counter() - t
        logger.info("enrolled %d devices in %.1f s", n, enroll_s)
        public_key = load_public_key(key_dir / "model-signing.pub")

        stats = Stats()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_agent(server.url, stats, a, public_key, poll_s,
                                            heartbeat_s, stop)) for a in agents]
        proc = psutil.Process(server.process.pid)  # type: ignore[union-attr]
        me = psutil.Process()
        cpu0, t_start = _cpu_seconds(proc), time.perf_counter()
        my_cpu0 = _cpu_seconds(me)
        await asyncio.sleep(warmup_s)

        key = load_or_create_signing_key(key_dir)
        manifest = sign_manifest(build_manifest("bench-2", model, 320, ["car", "truck"],
                                                fmt="onnx-fp32"), key)
        t_publish = time.perf_counter()
        r = await client.post("/v1/models", headers=admin_h, data={"manifest": json.dumps(
            manifest)}, files={"file": (model.name, model.read_bytes())})
        r.raise_for_status()
        msha = r.json()["manifest_sha256"]
        r = await client.post("/v1/rollouts", headers=admin_h,
                              json={"manifest_sha256": msha, "hold_seconds": 0})
        r.raise_for_status()
        rid = r.json()["rollout_id"]
        stage_times = {r.json()["stage"]: round(time.perf_counter() - t_publish, 3)}
        for _ in range(5):  # shadow -> canary -> 10 -> 25 -> 50 -> 100, one poll apart
            await asyncio.sleep(poll_s)
            r = await client.post(f"/v1/rollouts/{rid}/advance", headers=admin_h)
            r.raise_for_status()
            stage_times[r.json()["stage"]] = round(time.perf_counter() - t_publish, 3)
        t100 = time.perf_counter()
        deadline = t100 + max_wait_intervals * poll_s
        while time.perf_counter() < deadline and any(a.updated_at is None for a in agents):
            await asyncio.sleep(0.1)
        await asyncio.sleep(poll_s)  # one more interval of steady state (304s)
        t_all = max((a.updated_at or float("inf")) for a in agents)
        stop.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_start
        cpu = _cpu_seconds(proc) - cpu0
        my_cpu = _cpu_seconds(me) - my_cpu0
        st = (await client.get("/v1/stats", headers=admin_h)).json()

    updated = sum(a.updated_at is not None for a in agents)
    after = sorted(a.updated_at - t100 for a in agents
                   if a.updated_at is not None and a.updated_at >= t100)
    before_100 = sum(a.updated_at is not None and a.updated_at < t100 for a in agents)
    lat = {k: {"count": len(v), "p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99),
               "max_ms": round(max(v), 3) if v else None} for k, v in stats.latencies.items()}
    all_s = None if t_all == float("inf") else round(t_all - t100, 3)
    return {
        "agents": n, "poll_interval_s": poll_s, "heartbeat_interval_s": heartbeat_s,
        "connections": connections, "model_bytes": model.stat().st_size, "enroll_s": round(
            enroll_s, 2),
        "rollout_id": rid, "stage_reached_s_after_publish": stage_times,
        "updated_agents": updated, "updated_before_100pct": before_100,
        "time_to_all_updated_after_100pct_s": all_s,
        "time_to_all_updated_in_poll_intervals": None if all_s is None else round(
            all_s / poll_s, 3),
        "update_delay_after_100pct_s": {"p50": _pct(after, 50), "p90": _pct(after, 90),
                                         "p99": _pct(after, 99)},
        "updated_within_1_interval": sum(d <= poll_s for d in after),
        "updated_within_2_intervals": sum(d <= 2 * poll_s for d in after),
        "target_intervals": TARGET_INTERVALS,
        "target_met": all_s is not None and all_s <= TARGET_INTERVALS * poll_s
        and not stats.failures,
        "requests": stats.requests, "wall_s": round(wall, 2),
        "requests_per_s": round(stats.requests / wall, 1),
        "failures": len(stats.failures), "failure_samples": stats.failures[:10],
        "status_codes": {k: dict(v) for k, v in stats.codes.items()},
        "latency": lat, "server_cpu_s": round(cpu, 2),
        "server_cpu_util": round(cpu / wall, 3),
        "load_generator_cpu_s": round(my_cpu, 2),
        "server_counters": {k: v for k, v in st.get("counters", {}).items()
                            if k.startswith(("manifest", "model", "heartbeat"))},
    }


def _check_db(home: Path, result: dict[str, Any], sha: str | None) -> None:
    """Every device has a stored heartbeat reporting the new model."""
    conn = sqlite3.connect(f"file:{home / 'fleet' / 'fleet.db'}?mode=ro", uri=True)
    try:
        sha = sha or conn.execute("SELECT file_sha256 FROM model_manifests").fetchone()[0]
        n = conn.execute("SELECT COUNT(DISTINCT device_id) FROM heartbeats WHERE model_version=?",
                         (sha,)).fetchone()[0]
    finally:
        conn.close()
    result["devices_reporting_new_version_in_db"] = n


def to_markdown(doc: dict[str, Any]) -> str:
    r = doc["result"]
    lines = [
        "# Rollout propagation",
        "",
        (f"{r['agents']} simulated agents (asyncio tasks in one process, one keep-alive "
        f"connection each) polling `GET /v1/manifest` with `If-None-Match` every "
        f"{r['poll_interval_s']:g} s against one gateway process; a signed "
        f"{r['model_bytes'] / 1024:.0f} KiB model advanced stage by stage (one poll interval "
        "apart) to 100 %. An agent counts as updated when its heartbeat reporting the new "
        "version got its 202."),
        "",
        f"Machine: {doc['machine']}. Generated {doc['generated_at']}.",
        "",
        "| metric | value |",
        "|---|---|",
        (f"| agents updated | {r['updated_agents']} / {r['agents']} "
        f"({r['updated_before_100pct']} already in earlier stages) |"),
        (f"| time to all updated after 100 % | {r['time_to_all_updated_after_100pct_s']} s = "
        f"{r['time_to_all_updated_in_poll_intervals']} poll intervals (target ≤ "
        f"{r['target_intervals']:g}) |"),
        (f"| agents updated after the 100 % stage: within 1 / 2 intervals | "
        f"{r['updated_within_1_interval']} / {r['updated_within_2_intervals']} of "
        f"{r['updated_agents'] - r['updated_before_100pct']} (delay P50/P90/P99 "
        f"{r['update_delay_after_100pct_s']['p50']} / {r['update_delay_after_100pct_s']['p90']} / "
        f"{r['update_delay_after_100pct_s']['p99']} s) |"),
        (f"| devices with the new version in the gateway DB | "
        f"{r.get('devices_reporting_new_version_in_db')} |"),
        f"| requests served | {r['requests']} in {r['wall_s']} s = {r['requests_per_s']} req/s |",
        f"| failed requests | {r['failures']} |",
        f"| gateway CPU | {r['server_cpu_s']} s ({r['server_cpu_util']:.0%} of one core) |",
        f"| load generator CPU (the 1000 agents) | {r.get('load_generator_cpu_s')} s |",
        f"| target met | {'yes' if r['target_met'] else 'NO'} |",
        "",
        "| request | count | P50 ms | P99 ms | max ms | status codes |",
        "|---|---|---|---|---|---|",
    ]
    for kind, v in r["latency"].items():
        lines.append(f"| {kind} | {v['count']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} | "
                     f"{r['status_codes'].get(kind)} |")
    lines += ["", f"Stages reached (s after publish): {r['stage_reached_s_after_publish']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--poll-interval", type=float, default=5.0)
    ap.add_argument("--heartbeat-interval", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--model", type=Path, default=None,
                    help="model file to roll out (default: 1 MiB of random bytes)")
    ap.add_argument("--model-kib", type=int, default=1024)
    ap.add_argument("--max-wait-intervals", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    try:
        home = work / "home"
        key_dir = home / "keys"
        load_or_create_signing_key(key_dir)
        model = args.model
        if model is None:
            model = work / "model.onnx"
            model.write_bytes(os.urandom(args.model_kib * 1024))
        server = GatewayProcess(home, log_path=home / "gateway.log",
                                extra_args=["--log-level", "warning"])
        server.start(timeout_s=60)
        try:
            admin = server.cli("admin-token", "create")
            result = asyncio.run(_run(server, admin, args.agents, args.poll_interval,
                                      args.heartbeat_interval, args.warmup, model, key_dir,
                                      args.max_wait_intervals, args.connections))
        finally:
            server.stop()
        _check_db(home, result, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    doc = {"generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                      f"Python {platform.python_version()}, load average at the end "
                      f"{load[0]:.1f} (1 min) / {load[1]:.1f} (5 min)",
           "result": result}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("rollout_propagation.json", json.dumps(doc, indent=2)),
                       ("rollout_propagation.md", to_markdown(doc))):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out / name)
    print(to_markdown(doc))


if __name__ == "__main__":
    main()
