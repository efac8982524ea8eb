"""Replay the drift streams through real edge agents and the real gateway; keep what arrives.

For the drift benchmark (issue 10; streams in ``benchmarks.drift_streams``). One gateway
(``launch.localfleet.LocalFleet``: ``python -m fleet serve`` on loopback) and one real agent
process (``python -m edge_agent run``) per stream, at most ``--concurrency`` (2) at a time,
each streaming its stream's video *paced in real time* (the agent's ``--realtime``
default: 10 frames/s, so a 20 s drift window holds 200 frames). Agent settings:

* ``--heartbeat-interval 1`` — about 20 heartbeats per drift window;
* ``--base-rate 0.25 --no-condition-samplers --hourly-budget 0`` — a uniform random 25 %
  of frames is uploaded (about 50 a window; still over 20 when a loaded machine makes the
  agent drop half its frames, which the first runs on the shared 2-core box did): the frames the
  embedding features see are an unbiased sample, not the low-confidence / edge-case frames
  the condition samplers would add (those fire far more often on shifted frames). The hourly
  budget is off: at these rates a real camera's 360 frames/hour would cap a window at 1;
* ``--update-interval 0`` (no model manifest polling), ``--threads 1`` (ONNX Runtime),
  the shared ``atl_v2_yolo11n_320.onnx``, a per-stream sampler seed.

Per stream, under ``<out>/<stream>/``:

* ``heartbeats.jsonl`` — every heartbeat the gateway stored for the camera, as
  ``GET /v1/cameras/{camera_id}/heartbeats`` returns it (``payload`` is the agent's whole
  heartbeat, whatever fields it has), plus ``stream``: the heartbeat window in stream time
  (``t_start``, ``t_end``, ``t_mid`` s) and the drift ``window`` its midpoint falls in
  (``null`` outside the stream: agent start-up and the final heartbeat);
* ``frames.jsonl`` — every uploaded frame: the gateway's ``FrameRecord`` (frame id,
  ``captured_at``, reasons, detections, quality...), plus ``stream_frame`` (parsed from the
  agent's ``source_ref``), ``stream_t``, ``window`` and ``path`` (the JPEG copied to
  ``frames/<frame_id>.jpg``, relative to the capture folder);
* ``truth.json`` — the stream's truth and definition (``drift_streams.render_stream``) and a
  ``capture`` record: the wall-clock time of stream frame 0 (``t0_unix``: the median over
  uploads of ``captured_at - stream_frame / fps``; ``t0_spread_s`` its range, i.e. how far
  pacing lagged), agent arguments, exit code, wall and CPU seconds (``os.wait4`` rusage of
  the agent process), its summary line, and per drift window the heartbeats, frames
  processed / dropped (summed from heartbeats) and uploads;
* ``agent.log`` — the agent's log.

``<out>/capture.json`` records the whole run: machine, load average before, during (every
10 s: a shared machine's load makes agents drop frames and slows their detector) and after, wall
time, agents' and gateway's CPU seconds, settings. Streams are rendered first (reused when
already rendered with the same definition) under ``--streams-dir``.

    python -m benchmarks.drift_capture [--out benchmarks/.cache/drift_captures] [--streams a,b]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks import drift_streams as ds
from launch.localfleet import LocalFleet, free_port
from roadloop.data.frames import FrameStore
from roadloop.settings import Settings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / ".cache" / "drift_captures"
DEFAULT_STREAMS_DIR = REPO / "benchmarks" / ".cache" / "drift_streams"
AGENT_MODEL = "atl_v2_yolo11n_320.onnx"
_SOURCE_REF = re.compile(r"#(\d+)$")


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())}


def agent_args(*, heartbeat_interval: float, base_rate: float, seed: int) -> list[str]:
    return ["--heartbeat-interval", f"{heartbeat_interval:g}", "--threads", "1",
            "--base-rate", f"{base_rate:g}", "--no-condition-samplers", "--hourly-budget", "0",
            "--update-interval", "0", "--drain-timeout", "60", "--seed", str(seed),
            "--status-interval", "30"]


def fetch_heartbeats(url: str, camera_id: str, token: str, page: int = 1000) -> list[dict]:
    """Every stored heartbeat of ``camera_id`` in ``sent_at`` order (``since`` paging)."""
    rows: list[dict] = []
    seen: set[int] = set()
    since = "2000-01-01T00:00:00+00:00"
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        while True:
            r = client.get(f"{url}/v1/cameras/{camera_id}/heartbeats",
                           params={"since": since, "limit": page})
            r.raise_for_status()
            batch = r.json()
            new = [b for b in batch if b["id"] not in seen]
            rows += new
            seen.update(b["id"] for b in new)
            if len(batch) < page or not new:
                return rows
            since = batch[-1]["sent_at"]


def _window(t: float, truth: dict) -> int | None:
    if not 0.0 <= t < truth["duration_s"]:
        return None
    return int(t // truth["window_s"])


def collect(camera_id: str, truth: dict, *, url: str, token: str, frame_store: FrameStore,
            dest: Path) -> dict[str, Any]:
    """Write heartbeats.jsonl / frames.jsonl / frames/*.jpg for one camera; the mapping facts."""
    fps = truth["fps"]
    frames: list[dict] = []
    offsets: list[float] = []
    (dest / "frames").mkdir(parents=True, exist_ok=True)
    for record, image in frame_store.iter_frames(camera_id):
        row = record.model_dump(mode="json")
        m = _SOURCE_REF.search(record.source_ref or "")
        idx = int(m.group(1)) if m else None
        row["stream_frame"] = idx
        if idx is not None:
            offsets.append(record.captured_at.timestamp() - idx / fps)
        shutil.copy2(image, dest / "frames" / f"{record.frame_id}.jpg")
        row["path"] = f"frames/{record.frame_id}.jpg"
        frames.append(row)
    if not offsets:
        raise RuntimeError(f"{camera_id}: no uploaded frame carries a stream position")
    t0 = statistics.median(offsets)
    for row in frames:
        row["stream_t"] = round(_unix(row["captured_at"]) - t0, 4)
        # The frame's own position is the truth; its capture time only dates it.
        row["window"] = (None if row["stream_frame"] is None
                         else _window(row["stream_frame"] / fps, truth))
    beats = fetch_heartbeats(url, camera_id, token)
    for b in beats:
        p = b["payload"]
        ts, te = _unix(p["window_start"]) - t0, _unix(p["window_end"]) - t0
        mid = (ts + te) / 2
        b["stream"] = {"t_start": round(ts, 4), "t_end": round(te, 4), "t_mid": round(mid, 4),
                       "window": _window(mid, truth)}
    with open(dest / "frames.jsonl", "w") as f:
        for row in frames:
            f.write(json.dumps(row) + "\n")
    with open(dest / "heartbeats.jsonl", "w") as f:
        for b in beats:
            f.write(json.dumps(b) + "\n")
    per_window: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"heartbeats": 0, "frames_processed": 0, "dropped_frames": 0, "uploads": 0})
    for b in beats:
        k = b["stream"]["window"]
        if k is not None:
            w = per_window[k]
            w["heartbeats"] += 1
            w["frames_processed"] += int(b["payload"].get("frames_processed") or 0)
            w["dropped_frames"] += int(b["payload"].get("dropped_frames") or 0)
    for row in frames:
        if row["window"] is not None:
            per_window[row["window"]]["uploads"] += 1
    return {
        "t0_unix": t0,
        "t0_spread_s": round(max(offsets) - min(offsets), 4),
        "uploads": len(frames),
        "heartbeats": len(beats),
        "heartbeats_outside_stream": sum(b["stream"]["window"] is None for b in beats),
        "per_window": [{"window": k, **per_window[k]} for k in range(truth["n_windows"])],
    }


def _summary_line(log_path: Path) -> dict | None:
    if not log_path.is_file():
        return None
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"camera_id"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


class Capture:
    """One gateway, agents started and reaped one stream at a time per slot."""

    def __init__(self, fleet: LocalFleet, model: Path, out: Path, token: str, *,
                 heartbeat_interval: float, base_rate: float) -> None:
        self.fleet, self.model, self.out, self.token = fleet, model, out, token
        self.heartbeat_interval, self.base_rate = heartbeat_interval, base_rate
        self._start_lock = threading.Lock()  # token creation runs the fleet CLI: one at a time
        self.frame_store = FrameStore(fleet.home / "frames")

    def run_stream(self, truth: dict, video: Path) -> dict[str, Any]:
        name = truth["name"]
        seed = int.from_bytes(name.encode()[:4], "big") % 10_000
        args = agent_args(heartbeat_interval=self.heartbeat_interval, base_rate=self.base_rate,
                          seed=seed)
        with self._start_lock:
            t_start = time.monotonic()
            agent = self.fleet.start_agent(name, video, self.model, args)
        # os.wait4 reaps the child and gives its own rusage (all its threads).
        _, status, usage = os.wait4(agent.process.pid, 0)
        wall = time.monotonic() - t_start
        agent.process.returncode = os.waitstatus_to_exitcode(status)
        self.fleet.agents = [a for a in self.fleet.agents if a is not agent]
        dest = self.out / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.copy2(agent.log_path, dest / "agent.log")
        capture = {
            "camera_id": name,
            "agent_args": args,
            "agent_model": self.model.name,
            "exit_code": agent.process.returncode,
            "wall_s": round(wall, 2),
            "cpu_user_s": round(usage.ru_utime, 2),
            "cpu_system_s": round(usage.ru_stime, 2),
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "heartbeat_interval_s": self.heartbeat_interval,
            "base_rate": self.base_rate,
            "agent_summary": _summary_line(agent.log_path),
        }
        if capture["exit_code"] != 0:
            log.error("%s: agent exited with %s; see %s", name, capture["exit_code"], dest / "agent.log")
        capture.update(collect(name, truth, url=self.fleet.url, token=self.token,
                               frame_store=self.frame_store, dest=dest))
        (dest / "truth.json").write_text(json.dumps({**truth, "capture": capture}, indent=2) + "\n")
        w = capture["per_window"]
        log.info("%s: exit %s, %.0f s wall, %.1f s CPU, %d uploads, %d heartbeats; per window "
                 "uploads %s..%s, heartbeats %s..%s, dropped %d", name, capture["exit_code"], wall,
                 usage.ru_utime + usage.ru_stime, capture["uploads"], capture["heartbeats"],
                 min(x["uploads"] for x in w), max(x["uploads"] for x in w),
                 min(x["heartbeats"] for x in w), max(x["heartbeats"] for x in w),
                 sum(x["dropped_frames"] for x in w))
        return capture


def _process_cpu(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with the dev environment
        return None
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            total += sum(child.cpu_times()[:2])
        return round(total, 2)
    except psutil.Error:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = args.shared
    specs = ds.default_streams(windows_pre=args.windows_pre, windows_post=args.windows_post,
                               stable_windows=args.stable_windows)
    if args.streams != "all":
        want = set(args.streams.split(","))
        unknown = want - {s.name for s in specs}
        if unknown:
            raise SystemExit(f"unknown streams: {', '.join(sorted(unknown))}")
        specs = [s for s in specs if s.name in want]
    model = args.model or shared / "models" / AGENT_MODEL
    if not model.is_file():
        raise SystemExit(f"agent model not found: {model}")
    t_render = time.monotonic()
    rendered = []
    for spec in specs:
        truth = ds.render_stream(spec, shared, args.streams_dir)
        rendered.append((truth, (args.streams_dir / spec.name / truth["video"]).resolve()))
    render_s = time.monotonic() - t_render
    rendered.sort(key=lambda tv: -tv[0]["duration_s"])  # longest first: the slots end together

    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(args.fleet_home or tempfile.mkdtemp(prefix="drift-fleet-"))
    record: dict[str, Any] = {"machine": machine(), "started_at": datetime.now().astimezone().isoformat(),
                              "render_s": round(render_s, 1), "concurrency": args.concurrency,
                              "heartbeat_interval_s": args.heartbeat_interval,
                              "base_rate": args.base_rate, "agent_model": model.name,
                              "windows": {"pre": args.windows_pre, "post": args.windows_post,
                                          "stable": args.stable_windows},
                              "fleet_home": str(home), "streams": {}}
    fleet = LocalFleet(home=home, port=free_port())
    t0, c0 = time.monotonic(), os.times()
    load_samples: list[list[float]] = []  # [s since start, 1-min load average], every 10 s
    sampling = threading.Event()

    def sample_load() -> None:
        while not sampling.wait(10.0):
            load_samples.append([round(time.monotonic() - t0, 1), os.getloadavg()[0]])

    threading.Thread(target=sample_load, daemon=True).start()
    try:
        fleet.start_gateway()
        token = fleet.admin_token()
        cap = Capture(fleet, model, args.out, token, heartbeat_interval=args.heartbeat_interval,
                      base_rate=args.base_rate)
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            futures = {truth["name"]: pool.submit(cap.run_stream, truth, video)
                       for truth, video in rendered}
            for name, fut in futures.items():
                record["streams"][name] = fut.result()
        record["gateway_cpu_s"] = _process_cpu(fleet.gateway.process.pid) if fleet.gateway else None
    finally:
        sampling.set()
        fleet.stop()
        if not args.keep_fleet_home and not args.fleet_home:
            shutil.rmtree(home, ignore_errors=True)
    c1 = os.times()
    streams = record["streams"].values()
    record.update(
        wall_s=round(time.monotonic() - t0, 1),
        stream_s=sum(tv[0]["duration_s"] for tv in rendered),
        agents_cpu_s=round(sum(s["cpu_user_s"] + s["cpu_system_s"] for s in streams), 1),
        driver_cpu_s=round(c1.user - c0.user + c1.system - c0.system, 1),
        loadavg_end=list(os.getloadavg()),
        loadavg_samples=load_samples,
    )
    (args.out / "capture.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--streams-dir", type=Path, default=DEFAULT_STREAMS_DIR)
    p.add_argument("--streams", default="all", help="comma-separated stream names, or all")
    p.add_argument("--shared", type=Path, default=Settings().shared_dir)
    p.add_argument("--model", type=Path, default=None, help=f"agent ONNX (default shared {AGENT_MODEL})")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--base-rate", type=float, default=0.25)
    p.add_argument("--windows-pre", type=int, default=7, help="drift windows before an onset")
    p.add_argument("--windows-post", type=int, default=5, help="drift windows from an onset on")
    p.add_argument("--stable-windows", type=int, default=15, help="length of a stable stream")
    p.add_argument("--fleet-home", type=Path, default=None, help="keep the gateway's state here")
    p.add_argument("--keep-fleet-home", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    args.out, args.streams_dir = args.out.absolute(), args.streams_dir.absolute()
    record = run(args)
    print(json.dumps({k: record[k] for k in ("wall_s", "stream_s", "agents_cpu_s", "gateway_cpu_s")}))
    return 0 if all(s["exit_code"] == 0 for s in record["streams"].values()) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
