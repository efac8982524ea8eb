"""Gateway memory under concurrent hostile uploads: real server on loopback, RSS sampled.

Starts ``python -m fleet serve`` (one worker, 127.0.0.1) on a fresh home, enrolls one
device, lets it settle, then sends ``--rounds`` bursts of ``--concurrency`` hostile uploads
at once, each burst mixed with ``--good`` well-formed agent uploads. While it runs, a
thread samples the server's resident memory (``VmRSS`` from ``/proc/<pid>/status``, every
``--sample-ms``); the report gives the idle RSS, the peak RSS and their difference, the
kernel's own high-water mark (``VmHWM``), the answers per kind of upload and the latency of
the good ones. Everything is bounded: requests time out after 60 s, each variant stops
after ``--max-seconds``.

Hostile kinds (few-KB bodies unless noted):

- ``claims_4096x2160``: a 160x120 JPEG whose frame header claims 4096x2160 (within the
  4096 px side limit and the pixel cap), metadata agreeing, agent quality sent;
- ``claims_4096x2160_noq``: the same without a quality block (the old gateway then ran its
  float64 Laplacian over the full claimed image; the new one decodes natively but strictly);
- ``claims_4096x4096``: within the side limit, over the 4096x2160 pixel cap;
- ``progressive_4096x2160``: a progressive JPEG claiming 4096x2160 (libjpeg allocates a
  whole-image coefficient buffer for progressive JPEGs, even at reduced scale);
- ``progressive444_4096x2160_noq``: the same, 4:4:4 (the largest coefficient buffer: 6 bytes
  a pixel) and without quality (a native-scale decode): the costliest decode there is;
- ``truncated_eoi``: a real 1920x1080 frame cut in half with FFD9 put back (~100 KB);
- ``zip_appended``: a real 640x360 frame with a ZIP archive after its end marker.

``--tree label=PATH[@N]`` (repeatable) runs the gateway from a checkout — e.g. the code
before the fix — with the same driver at ``N`` concurrent hostile uploads (default
``--concurrency``), so old and new are measured side by side in one run:

    python -m benchmarks.hostile_uploads --rounds 3 --tree new=.@64 \\
        --tree new=.@8 --tree old=/path/to/old/checkout@8 --out benchmarks/results

Writes ``<out>/hostile_uploads.json`` and ``<out>/hostile_uploads.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from benchmarks.intake_loadgen import AGENT_REDACTION
from launch.localfleet import GatewayProcess
from roadloop.fsutil import write_text_atomic

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
CAMERA = "cam-hostile"
T0 = datetime(2026, 5, 4, 12, 0, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------- inputs
def _frames() -> list[np.ndarray]:
    """A few real frames from the shared videos (synthetic textures when absent)."""
    from roadloop.settings import get_settings

    out: list[np.ndarray] = []
    for video in sorted(get_settings().videos_dir.glob("*.mp4"))[:3]:
        cap = cv2.VideoCapture(str(video))
        ok, frame = cap.read()
        cap.release()
        if ok and frame is not None:
            out.append(frame)
    if not out:
        rng = np.random.default_rng(0)
        for _ in range(3):
            small = rng.integers(0, 256, size=(27, 48, 3), dtype=np.uint8)
            out.append(cv2.resize(small, (1280, 720), interpolation=cv2.INTER_CUBIC))
    return out


def _encode(image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85, *params])
    assert ok
    return buf.tobytes()


def _claim(jpeg: bytes, w: int, h: int) -> bytes:
    """Rewrite the frame header's dimensions: a decompression-bomb header."""
    b = bytearray(jpeg)
    i = 2
    while True:
        marker, seg = b[i + 1], int.from_bytes(b[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 5 : i + 7] = h.to_bytes(2, "big")
            b[i + 7 : i + 9] = w.to_bytes(2, "big")
            return bytes(b)
        i += 2 + seg


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.bin", os.urandom(4096))
    return buf.getvalue()


@dataclass
class Upload:
    kind: str
    jpeg: bytes
    width: int
    height: int
    quality: dict[str, Any] | None


def build_uploads() -> tuple[list[Upload], list[Upload]]:
    """(hostile kinds, good agent uploads)."""
    frames = _frames()
    small = cv2.resize(frames[0], (160, 120), interpolation=cv2.INTER_AREA)
    # Full quality: the old gateway took only a complete FrameQuality (today's agent sends
    # brightness + sharpness; the new gateway decodes the same way for both).
    q: dict[str, Any] = {"brightness": 100.0, "sharpness": 250.0, "dhash": "0123456789abcdef"}
    tiny = _encode(small)
    tiny_prog = _encode(small, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    tiny_prog444 = _encode(small, cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                           cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)
    full = _encode(cv2.resize(frames[0], (1920, 1080), interpolation=cv2.INTER_CUBIC))
    mid = _encode(cv2.resize(frames[-1], (640, 360), interpolation=cv2.INTER_AREA))
    hostile = [
        Upload("claims_4096x2160", _claim(tiny, 4096, 2160), 4096, 2160, q),
        Upload("claims_4096x2160_noq", _claim(tiny, 4096, 2160), 4096, 2160, None),
        Upload("claims_4096x4096", _claim(tiny, 4096, 4096), 4096, 4096, q),
        Upload("progressive_4096x2160", _claim(tiny_prog, 4096, 2160), 4096, 2160, q),
        Upload("progressive444_4096x2160_noq", _claim(tiny_prog444, 4096, 2160), 4096, 2160,
               None),
        Upload("truncated_eoi", full[: len(full) // 2] + b"\xff\xd9", 1920, 1080, q),
        Upload("zip_appended", mid + _zip(), 640, 360, q),
    ]
    good = [
        Upload("good_1280x720", _encode(cv2.resize(f, (1280, 720), interpolation=cv2.INTER_AREA)),
               1280, 720, q)
        for f in frames
    ]
    return hostile, good


def _metadata(frame_id: str, up: Upload) -> str:
    m: dict[str, Any] = {
        "frame_id": frame_id, "camera_id": CAMERA, "captured_at": T0.isoformat(),
        "reasons": ["base_rate"], "importance": 1.0, "model_version": "bench",
        "detections": [], "width": up.width, "height": up.height,
        "redaction": AGENT_REDACTION,
    }
    if up.quality is not None:
        m["quality"] = up.quality
    return json.dumps(m)


# ---------------------------------------------------------------------------- memory
def _status_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RssSampler(threading.Thread):
    """Samples VmRSS of one process every ``interval_s`` until stopped; keeps the peak."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak_kib = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib(self.pid, "VmRSS"))
            self.samples += 1
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# ---------------------------------------------------------------------------- driving
@dataclass
class VariantResult:
    label: str
    tree: str
    concurrency: int
    commit: str = ""
    idle_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    hwm_before_mib: float = 0.0
    hwm_after_mib: float = 0.0
    rss_samples: int = 0
    codes: dict[str, dict[str, int]] = field(default_factory=dict)
    good_latency_ms: dict[str, float | None] = field(default_factory=dict)
    hostile_acknowledged: int = 0
    wall_s: float = 0.0
    error: str | None = None

    @property
    def peak_over_idle_mib(self) -> float:
        return round(self.peak_rss_mib - self.idle_rss_mib, 1)


async def _post(client: httpx.AsyncClient, token: str, frame_id: str, up: Upload
                ) -> tuple[str, int | str, float]:
    t0 = time.perf_counter()
    try:
        r = await client.post(
            "/v1/frames",
            files={"image": ("f.jpg", up.jpeg, "image/jpeg")},
            data={"metadata": _metadata(frame_id, up)},
            headers={"Authorization": f"Bearer {token}"},
        )
        code: int | str = r.status_code
    except httpx.HTTPError as exc:
        code = type(exc).__name__
    return up.kind, code, (time.perf_counter() - t0) * 1000


async def _drive(base: str, token: str, hostile: list[Upload], good: list[Upload],
                 concurrency: int, rounds: int, n_good: int, deadline: float,
                 prefix: str = "") -> list[tuple[str, int | str, float]]:
    limits = httpx.Limits(max_connections=concurrency + n_good + 4)
    out: list[tuple[str, int | str, float]] = []
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        for rnd in range(rounds):
            if time.monotonic() > deadline:
                break
            jobs = [_post(client, token, f"{prefix}h{rnd}-{i}", hostile[i % len(hostile)])
                    for i in range(concurrency)]
            jobs += [_post(client, token, f"{prefix}g{rnd}-{i}", good[i % len(good)])
                     for i in range(n_good)]
            out.extend(await asyncio.gather(*jobs))
    return out


def _python_for(tree: Path, tmp: Path) -> str:
    """A launcher that runs this venv's Python inside ``tree`` (so ``-m fleet`` is its code)."""
    launcher = tmp / f"python-{abs(hash(str(tree)))}"
    launcher.write_text(f'#!/bin/sh\ncd "{tree}" && PYTHONPATH="{tree}" exec "{sys.executable}" '
                        '"$@"\n')
    launcher.chmod(0o755)
    return str(launcher)


def _commit(tree: Path) -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), for the record."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30, check=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_variant(label: str, tree: Path, concurrency: int, args: argparse.Namespace,
                hostile: list[Upload], good: list[Upload], tmp: Path) -> VariantResult:
    res = VariantResult(label, tree.name, concurrency, _commit(tree))
    home = tmp / f"{label}-{concurrency}"
    env = {
        "ROADLOOP_GATEWAY_RATE_LIMIT_PER_S": "1000000",  # the device limiter is not measured
        "ROADLOOP_GATEWAY_RATE_LIMIT_BURST": "1000000",
        "ROADLOOP_GATEWAY_FSYNC_DIRECTORIES": "false",
        "ROADLOOP_GATEWAY_SQLITE_SYNCHRONOUS": "NORMAL",
    }
    server = GatewayProcess(home, env=env, log_path=home / "gateway.log",
                            python=_python_for(tree, tmp), extra_args=["--log-level", "warning"])
    server.start()
    try:
        assert server.process is not None
        pid = server.process.pid
        enroll_token = server.enrollment_token(CAMERA)
        r = httpx.post(f"{server.url}/v1/enroll", json={
            "enrollment_token": enroll_token, "camera_id": CAMERA, "agent_version": "bench"})
        r.raise_for_status()
        token = r.json()["access_token"]
        # Warm up (first-request allocations belong to idle), then let it settle.
        asyncio.run(_drive(server.url, token, good, good, 0, 1, 2 * len(good),
                           time.monotonic() + 60, prefix="warm-"))
        time.sleep(1.0)
        res.idle_rss_mib = round(_status_kib(pid, "VmRSS") / 1024, 1)
        res.hwm_before_mib = round(_status_kib(pid, "VmHWM") / 1024, 1)
        sampler = RssSampler(pid, args.sample_ms / 1000)
        sampler.start()
        t0 = time.monotonic()
        results = asyncio.run(_drive(server.url, token, hostile, good, concurrency,
                                     args.rounds, args.good, t0 + args.max_seconds))
        res.wall_s = round(time.monotonic() - t0, 2)
        time.sleep(0.2)
        sampler.stop()
        res.peak_rss_mib = round(max(sampler.peak_kib, _status_kib(pid, "VmRSS")) / 1024, 1)
        res.hwm_after_mib = round(_status_kib(pid, "VmHWM") / 1024, 1)
        res.rss_samples = sampler.samples
        codes: dict[str, Counter[str]] = defaultdict(Counter)
        good_ms: list[float] = []
        for kind, code, ms in results:
            codes[kind][str(code)] += 1
            if kind.startswith("good") and code == 201:
                good_ms.append(ms)
            if not kind.startswith("good") and code == 201:
                res.hostile_acknowledged += 1
        res.codes = {k: dict(sorted(v.items())) for k, v in sorted(codes.items())}
        res.good_latency_ms = {
            "p50": round(statistics.median(good_ms), 1) if good_ms else None,
            "max": round(max(good_ms), 1) if good_ms else None,
        }
    except Exception as exc:  # a variant that cannot run is reported, not fatal
        logger.exception("variant %s failed", label)
        res.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        server.stop()
    return res


# ---------------------------------------------------------------------------- report
NOTES = """\
How to read it:

- *peak − idle* is the gateway's resident memory at its highest during the bursts minus
  its resident memory after start-up and a few good uploads. VmHWM is the kernel's
  high-water mark over the process's life (start-up included).
- New gateway: every hostile kind is refused (422) and nothing is stored; the memory above
  idle stays flat as N grows, because decodes run in `max_concurrent_decodes` slots on as
  many threads (min(4, cores): 2 here). The costliest single decode is a progressive 4:4:4
  JPEG claiming 4096x2160 sent without quality: libjpeg allocates its whole-image
  coefficient buffer (6 bytes a pixel, ~51 MiB) even for a reduced decode, plus the native
  output (~8 MiB) — about 60 MiB a slot, so the bound is about slots x 60 MiB plus request
  buffers (2 slots here; 4, the default's ceiling, would be ~240 MiB).
- Old gateway: every header-claims-large JPEG was decoded in full (colour in the frame
  store, plus a float64 Laplacian of the full grey image when no quality was sent),
  answered 201 and stored as a grey frame.
- Good uploads' latency under the burst includes waiting for a decode slot behind the
  hostile uploads (an upload waits at most `decode_wait_s`, then 503 + Retry-After); the
  per-device rate limit bounds how many uploads one device can put in that queue.
"""


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Gateway memory under concurrent hostile uploads",
        "",
        (f"`python -m benchmarks.hostile_uploads` — N hostile uploads at once "
         f"(+{report['good_per_round']} good ones), {report['rounds']} rounds, one gateway "
         f"process (1 uvicorn worker) on 127.0.0.1; RSS sampled every {report['sample_ms']} ms. "
         f"Host: {report['host']['cpus']} CPUs; load average "
         f"{report['load_average']['start']} at start, {report['load_average']['end']} at end."),
        "",
        ("| gateway | N | idle RSS MiB | peak RSS MiB | peak − idle MiB | VmHWM MiB |"
         " hostile 201s | good P50 / max ms | wall s |"),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for v in report["variants"]:
        if v.get("error"):
            lines.append(f"| {v['label']} `{v['commit']}` | {v['concurrency']} | failed: {v['error']} "
                         "| | | | | | |")
            continue
        lat = v["good_latency_ms"]
        lines.append(
            f"| {v['label']} `{v['commit']}` | {v['concurrency']} | {v['idle_rss_mib']} | "
            f"{v['peak_rss_mib']} "
            f"| **{v['peak_over_idle_mib']}** | {v['hwm_after_mib']} | "
            f"{v['hostile_acknowledged']} | {lat['p50']} / {lat['max']} | {v['wall_s']} |")
    lines += ["", "Answers per kind of upload:", ""]
    kinds = sorted({k for v in report["variants"] for k in v.get("codes", {})})
    lines.append("| kind | " + " | ".join(f"{v['label']} (N={v['concurrency']})"
                                         for v in report["variants"]) + " |")
    lines.append("|---|" + "---|" * len(report["variants"]))
    for kind in kinds:
        cells = [", ".join(f"{c}×{n}" for c, n in v.get("codes", {}).get(kind, {}).items())
                 or "-" for v in report["variants"]]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", report["conclusion"], "", NOTES]
    return "\n".join(lines)


def _parse_tree(spec: str, default_n: int) -> tuple[str, Path, int]:
    label, _, rest = spec.partition("=") if "=" in spec else ("new", "", spec)
    path, _, n = rest.partition("@")
    return label, Path(path).resolve(), int(n) if n else default_n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=64, help="hostile uploads at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--good", type=int, default=4, help="good uploads in each burst")
    ap.add_argument("--sample-ms", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=float, default=240.0, help="per variant")
    ap.add_argument("--tree", action="append", default=[],
                    help="label=PATH[@N]: run the gateway from PATH at N hostile uploads at "
                    "once (default new=.)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    trees = [_parse_tree(t, args.concurrency) for t in args.tree or ["new=."]]
    if not 1 <= args.rounds <= 20 or not all(1 <= n <= 512 for *_, n in trees):
        ap.error("--rounds 1..20, concurrency 1..512")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    hostile, good = build_uploads()
    load_start = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="hostile-uploads-"))
    variants: list[VariantResult] = []
    try:
        for label, tree, n in trees:
            logger.info("variant %s: gateway from %s, %d hostile uploads at once", label, tree, n)
            variants.append(run_variant(label, tree, n, args, hostile, good, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = [round(x, 2) for x in os.getloadavg()]
    rows = [{**v.__dict__, "peak_over_idle_mib": v.peak_over_idle_mib} for v in variants]
    parts = [f"{v.label} with {v.concurrency} concurrent hostile uploads: peak RSS "
             f"{v.peak_over_idle_mib} MiB over idle, {v.hostile_acknowledged} hostile uploads "
             "acknowledged" for v in variants if v.error is None]
    report = {
        "benchmark": "hostile_uploads",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds, "good_per_round": args.good, "sample_ms": args.sample_ms,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "machine": platform.machine()},
        "load_average": {"start": load_start, "end": load_end},
        "hostile_kinds": {u.kind: {"bytes": len(u.jpeg), "claims": f"{u.width}x{u.height}",
                                   "quality_sent": u.quality is not None} for u in hostile},
        "variants": rows,
        "conclusion": ("; ".join(parts) + ".") if parts else "No variant ran.",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "hostile_uploads.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / "hostile_uploads.md", _markdown(report))
    print(_markdown(report))
    return 0 if all(v.error is None for v in variants) else 1


if __name__ == "__main__":
    raise SystemExit(main())
