"""Drift detection benchmark (issue 10): detection delay and false alarms per feature set.

Reads the captures of ``benchmarks.drift_capture`` (real agents and the real gateway; one
folder per stream of ``benchmarks.drift_streams``), cuts each into drift windows of the
capture's ``window_s`` (20 s of stream time: 200 frames, ~20 heartbeats, ~50 uploads),
and runs the drift detector (``roadloop.monitoring.drift``) on every window after the
reference, for each feature set: ``heartbeats`` (the agents' telemetry), ``embeddings``
(backbone embeddings of the uploaded frames, ``roadloop.labeling.embeddings`` on the
``atl_v2_yolo11n_320.pt`` checkpoint, cached by image hash) and ``both``.

* Reference: the stream's first ``--reference-windows`` (4) windows, all before any onset.
  The detector's thresholds are its own defaults (``DriftConfig()``): nothing here is tuned
  to these streams.
* A heartbeat belongs to the window holding the midpoint of its own window; an uploaded
  frame to the window holding its stream position (``source_ref``).
* Alarm levels: *any* = verdict ``minor`` or ``significant``; *significant* = ``significant``.
* Delay (shifted streams): first alarm window minus the onset window, where the onset
  window is the one containing the onset (an onset mid-window makes that window 0).
  ``missed`` when no window from the onset on alarms.
* False alarms: alarms on every evaluated window of a stable stream and on the evaluated
  windows before the onset of a shifted stream; reported per 100 such (stable) windows.
* Cost: CPU seconds (``time.process_time``) of each ``evaluate_window`` call, per feature
  set, and of ``build_reference``; the embedding features also cost the embedding of each
  uploaded frame, measured here on this machine (CPU per frame, model load excluded).
  Scaling to 1000 cameras: cores = cameras × windows per hour × CPU per window / 3600.

    python -m benchmarks.drift_detection [--captures benchmarks/.cache/drift_captures]
        [--reference-windows 4] [--out benchmarks/results]

Writes ``<out>/drift_detection.json`` (every window's verdict and metrics) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from roadloop.fsutil import write_text_atomic

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAPTURES = REPO / "benchmarks" / ".cache" / "drift_captures"
DEFAULT_CACHE = REPO / "benchmarks" / ".cache" / "drift_embeddings"
EMBED_MODEL = "atl_v2_yolo11n_320.pt"
EMBED_IMGSZ = 320
FEATURE_SETS = ("heartbeats", "embeddings", "both")
ALARM_LEVELS = {"any": frozenset({"minor", "significant"}), "significant": frozenset({"significant"})}
NO_VERDICT = frozenset({"not_enough_data", "no_reference"})


@dataclass
class Window:
    """One drift window of one stream: its heartbeats, uploaded frames and their embeddings."""

    stream: str
    index: int
    start: datetime
    end: datetime
    heartbeats: list[dict] = field(default_factory=list)  # gateway payloads
    frames: list[Path] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    model_version: str = ""


@dataclass
class Capture:
    name: str
    truth: dict[str, Any]
    windows: list[Window]

    @property
    def onset_window(self) -> int | None:
        return self.truth.get("onset_window")


def load_capture(folder: Path) -> Capture:
    truth = json.loads((folder / "truth.json").read_text())
    cap = truth["capture"]
    t0 = datetime.fromtimestamp(cap["t0_unix"], UTC)
    wl = float(truth["window_s"])
    windows = [Window(truth["name"], k, t0 + timedelta(seconds=k * wl), t0 + timedelta(seconds=(k + 1) * wl))
               for k in range(truth["n_windows"])]
    for line in (folder / "heartbeats.jsonl").read_text().splitlines():
        row = json.loads(line)
        k = row["stream"]["window"]
        if k is not None:
            windows[k].heartbeats.append(row["payload"])
    for line in (folder / "frames.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["window"] is not None:
            windows[row["window"]].frames.append(folder / row["path"])
    for w in windows:
        versions = [h.get("model_version") for h in w.heartbeats if h.get("model_version")]
        w.model_version = versions[-1] if versions else (cap.get("agent_summary") or {}).get("model_version", "")
    return Capture(truth["name"], truth, windows)


# --------------------------------------------------------------------------- embeddings
def attach_embeddings(captures: list[Capture], model: Path, cache_dir: Path) -> dict[str, Any]:
    """Embeddings of every uploaded frame (cached by image hash); returns how long it took."""
    from roadloop.fsutil import sha256_file
    from roadloop.labeling.embeddings import compute_embeddings

    images = [p for c in captures for w in c.windows for p in w.frames]
    model_version = f"{model.name}:{sha256_file(model)[:16]}"
    cpu, wall = time.process_time(), time.monotonic()
    table = compute_embeddings(model, images, imgsz=EMBED_IMGSZ, cache_dir=cache_dir,
                               model_version=model_version)
    info = {"frames": len(images), "computed_now": table.computed, "model": model.name,
            "model_version": model_version, "imgsz": EMBED_IMGSZ, "layers": table.layers,
            "dim": table.dim, "cpu_s": round(time.process_time() - cpu, 2),
            "wall_s": round(time.monotonic() - wall, 2)}
    rows = iter(table.vectors)
    for c in captures:
        for w in c.windows:
            w.embeddings = (np.stack([next(rows) for _ in w.frames]) if w.frames
                            else np.zeros((0, table.dim), np.float32))
    return info


def embedding_cpu_per_frame(model: Path, images: list[Path], n: int = 24) -> float | None:
    """CPU seconds to embed one frame, model load excluded: (1 + n frames) minus (1 frame),
    each with an empty cache, after a warm-up call (the first one in a process also pays for
    importing Ultralytics and initialising torch)."""
    from roadloop.labeling.embeddings import compute_embeddings

    if len(images) < n + 1:
        return None
    costs = []
    for k in (1, 1, n + 1):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.process_time()
            compute_embeddings(model, images[:k], imgsz=EMBED_IMGSZ, cache_dir=Path(tmp),
                               model_version="calibration")
            costs.append(time.process_time() - t)
    return max(0.0, (costs[2] - costs[1]) / n)


# --------------------------------------------------------------------------- the detector
def run_detector(reference: list[Window], windows: list[Window], features: str) -> tuple[list[dict], dict]:
    """THE adapter to ``roadloop.monitoring.drift`` (the only place that calls it).

    Builds the reference from ``reference`` and evaluates each of ``windows`` with
    ``features``; returns one plain dict per window (verdict, score, metrics, cpu_s) and the
    reference's facts (id, build CPU seconds).
    """
    from roadloop.monitoring.drift import DriftConfig, WindowData, build_reference, evaluate_window

    config = DriftConfig()

    def data(w: Window) -> WindowData:
        return WindowData(camera_id=w.stream, window_start=w.start, window_end=w.end,
                          heartbeats=w.heartbeats, embeddings=w.embeddings,
                          model_version=w.model_version)

    t = time.process_time()
    ref = build_reference([data(w) for w in reference], config=config)
    describe = getattr(ref, "describe", None)
    ref_info = {"reference_id": str(getattr(ref, "reference_id", "")),
                "build_cpu_s": round(time.process_time() - t, 5), "config": repr(config),
                "describe": json.loads(json.dumps(describe(), default=str)) if describe else None}
    out = []
    for w in windows:
        d = data(w)
        t = time.process_time()
        v = evaluate_window(d, ref, config=config, features=features)
        cpu = time.process_time() - t
        out.append({
            "window": w.index,
            "verdict": str(v.verdict),
            "score": None if v.score is None else float(v.score),
            "metric": getattr(v, "metric", None),
            "reason": getattr(v, "reason", ""),
            "metrics": [{"name": m.name, "value": _num(m.value), "threshold": _num(m.threshold),
                         "threshold_significant": _num(getattr(m, "threshold_significant", None)),
                         "verdict": str(m.verdict), "n_current": getattr(m, "n_current", None),
                         "reason": getattr(m, "reason", "")} for m in (v.metrics or [])],
            "cpu_s": round(cpu, 5),
        })
    return out, ref_info


def _num(x: Any) -> Any:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return str(x)


# --------------------------------------------------------------------------- scoring
def score_stream(verdicts: dict[int, str], onset_window: int | None) -> dict[str, Any]:
    """Delay and false alarms of one stream from its evaluated windows' verdicts.

    ``verdicts`` maps window index → verdict for every evaluated window (those after the
    reference). Windows before ``onset_window`` (all, for a stable stream) are stable.
    """
    stable = sorted(k for k in verdicts if onset_window is None or k < onset_window)
    shifted = sorted(k for k in verdicts if onset_window is not None and k >= onset_window)
    out: dict[str, Any] = {
        "stable_windows": len(stable),
        "shifted_windows": len(shifted),
        "no_verdict_windows": sum(v in NO_VERDICT for v in verdicts.values()),
        "minor_false_alarms": sum(verdicts[k] == "minor" for k in stable),
    }
    for level, alarms in ALARM_LEVELS.items():
        out[f"false_alarms_{level}"] = sum(verdicts[k] in alarms for k in stable)
        first = next((k for k in shifted if verdicts[k] in alarms), None)
        out[f"delay_{level}"] = None if first is None else first - onset_window
        out[f"missed_{level}"] = onset_window is not None and first is None
    return out


def summarise(streams: dict[str, dict], feature_set: str) -> dict[str, Any]:
    """Pooled false alarms per 100 stable windows and delays by stream kind, for one set."""
    rows = [(s["kind"], s["feature_sets"][feature_set]["score"]) for s in streams.values()]
    stable_n = sum(r["stable_windows"] for _, r in rows)
    out: dict[str, Any] = {"stable_windows": stable_n}
    for level in ALARM_LEVELS:
        fa = sum(r[f"false_alarms_{level}"] for _, r in rows)
        out[f"false_alarms_{level}"] = fa
        out[f"fa_per_100_{level}"] = round(100.0 * fa / stable_n, 2) if stable_n else None
        for kind in ("abrupt", "gradual"):
            delays = [r[f"delay_{level}"] for k, r in rows if k == kind]
            hit = [d for d in delays if d is not None]
            out[f"{kind}_{level}"] = {
                "streams": len(delays), "missed": len(delays) - len(hit),
                "max_delay": max(hit) if hit else None,
                "median_delay": statistics.median(hit) if hit else None,
                "within_1_window": sum(d <= 1 for d in hit),
            }
    out["minor_false_alarms"] = sum(r["minor_false_alarms"] for _, r in rows)
    out["no_verdict_windows"] = sum(r["no_verdict_windows"] for _, r in rows)
    cpu = [v["cpu_s"] for s in streams.values() for v in s["feature_sets"][feature_set]["windows"]]
    out["cpu_s_per_window_mean"] = statistics.fmean(cpu) if cpu else None
    out["cpu_s_per_window_p95"] = float(np.percentile(cpu, 95)) if cpu else None
    out["windows_evaluated"] = len(cpu)
    builds = [s["feature_sets"][feature_set]["reference"]["build_cpu_s"] for s in streams.values()]
    out["reference_build_cpu_s_mean"] = statistics.fmean(builds) if builds else None
    return out


def scaling(cpu_per_window: float | None, embed_cpu_per_window: float, window_s: float,
            cameras: int = 1000) -> dict[str, Any]:
    if cpu_per_window is None:
        return {}
    per_hour = 3600.0 / window_s
    total = cpu_per_window + embed_cpu_per_window
    return {"cameras": cameras, "window_s": window_s, "windows_per_hour": cameras * per_hour,
            "cpu_s_per_window": total, "cpu_s_per_hour": cameras * per_hour * total,
            "cores": cameras * per_hour * total / 3600.0}


# --------------------------------------------------------------------------- the run
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "scipy", "torch", "ultralytics", "onnxruntime", "opencv-python-headless",
                "opencv-python", "roadloop"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _window_counts(c: Capture) -> list[dict]:
    per = {w["window"]: w for w in c.truth["capture"]["per_window"]}
    return [{"window": w.index, "heartbeats": len(w.heartbeats), "uploads": len(w.frames),
             "frames_processed": per.get(w.index, {}).get("frames_processed"),
             "dropped_frames": per.get(w.index, {}).get("dropped_frames")} for w in c.windows]


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = list(os.getloadavg())
    folders = sorted(p.parent for p in args.captures.glob("*/truth.json"))
    if args.streams != "all":
        want = set(args.streams.split(","))
        folders = [f for f in folders if f.name in want]
    if not folders:
        raise SystemExit(f"no captures under {args.captures} (run benchmarks.drift_capture)")
    captures = [load_capture(f) for f in folders]
    n_ref = args.reference_windows
    for c in captures:
        if c.onset_window is not None and c.onset_window < n_ref:
            raise SystemExit(f"{c.name}: onset window {c.onset_window} < {n_ref} reference windows")
    model = args.embed_model or args.shared / "models" / EMBED_MODEL
    embed_info = attach_embeddings(captures, model, args.cache_dir)
    all_frames = [p for c in captures for w in c.windows for p in w.frames]
    embed_info["cpu_s_per_frame"] = embedding_cpu_per_frame(model, all_frames[:: max(1, len(all_frames) // 25)])

    streams: dict[str, dict] = {}
    for c in captures:
        ref, rest = c.windows[:n_ref], c.windows[n_ref:]
        entry = {"kind": c.truth["kind"], "description": c.truth["description"],
                 "onset_s": c.truth["onset_s"], "onset_window": c.onset_window,
                 "n_windows": len(c.windows), "window_counts": _window_counts(c),
                 "feature_sets": {}}
        for fs in FEATURE_SETS:
            verdicts, ref_info = run_detector(ref, rest, fs)
            entry["feature_sets"][fs] = {
                "reference": ref_info, "windows": verdicts,
                "score": score_stream({v["window"]: v["verdict"] for v in verdicts}, c.onset_window),
            }
        streams[c.name] = entry
        log.info("%s: %s", c.name, {fs: (e["score"]["delay_any"], e["score"]["false_alarms_any"])
                                     for fs, e in entry["feature_sets"].items()})

    window_s = float(captures[0].truth["window_s"])
    uploads = [len(w.frames) for c in captures for w in c.windows]
    uploads_per_window = statistics.fmean(uploads)
    embed_per_frame = embed_info["cpu_s_per_frame"] or 0.0
    summary = {}
    for fs in FEATURE_SETS:
        s = summarise(streams, fs)
        embed_cpu = 0.0 if fs == "heartbeats" else uploads_per_window * embed_per_frame
        s["embedding_cpu_s_per_window"] = embed_cpu
        s["scaling_bench_cadence"] = scaling(s["cpu_s_per_window_mean"], embed_cpu, window_s)
        # A production cadence: 10-minute windows, frames at the agent's default hourly budget
        # (360/h: 60 a window); the detector's own cost taken as measured here per window.
        prod_frames = 360.0 * args.prod_window_s / 3600.0
        s["scaling_production_cadence"] = scaling(
            s["cpu_s_per_window_mean"], 0.0 if fs == "heartbeats" else prod_frames * embed_per_frame,
            args.prod_window_s)
        summary[fs] = s

    capture_record = {}
    if (args.captures / "capture.json").is_file():
        capture_record = json.loads((args.captures / "capture.json").read_text())
    definitions = {c.name: {k: v for k, v in c.truth.items() if k != "capture"} for c in captures}
    result = {
        "benchmark": "drift_detection",
        "created_at": datetime.now(UTC).isoformat(),
        "git_commit": _git_commit(),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()},
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "versions": _versions(),
        "settings": {
            "reference_windows": n_ref, "window_s": window_s,
            "frames_per_window": captures[0].truth["frames_per_window"],
            "heartbeat_interval_s": capture_record.get("heartbeat_interval_s"),
            "agent_base_rate": capture_record.get("base_rate"),
            "agent_sampler": "base rate only (--no-condition-samplers), no hourly budget",
            "agent_model": capture_record.get("agent_model"),
            "uploads_per_window_mean": uploads_per_window,
            "prod_window_s": args.prod_window_s,
        },
        "capture": {k: capture_record.get(k) for k in (
            "started_at", "wall_s", "stream_s", "agents_cpu_s", "gateway_cpu_s", "concurrency",
            "machine", "loadavg_end")},
        "embeddings": embed_info,
        "stream_definitions": definitions,
        "streams": streams,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "drift_detection.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(args.out / "drift_detection.md", to_markdown(result))
    return result


def _delay(score: dict, level: str) -> str:
    if score[f"missed_{level}"]:
        return "missed"
    d = score[f"delay_{level}"]
    return "–" if d is None else str(d)


def to_markdown(r: dict) -> str:
    st = r["settings"]
    lines = [
        "# Drift detection benchmark",
        "",
        (f"`python -m benchmarks.drift_detection` on captures of `benchmarks.drift_capture` "
        f"(real agents, real gateway). Commit `{(r['git_commit'] or '?')[:10]}`, "
        f"{r['machine']['cpu']} ({r['machine']['cpu_count']} cores), load average "
        f"{r['loadavg_start'][0]:.2f} → {r['loadavg_end'][0]:.2f}."),
        "",
        (f"Drift window {st['window_s']:g} s of stream time ({st['frames_per_window']:g} frames at "
        f"10 fps), heartbeats every {st['heartbeat_interval_s']} s, agent sampler "
        f"{st['agent_sampler']} at base rate {st['agent_base_rate']} "
        f"({st['uploads_per_window_mean']:.1f} uploads per window on average). Reference: the "
        f"first {st['reference_windows']} windows of each stream. Detector thresholds: its "
        "defaults (`DriftConfig()`), not tuned to these streams."),
        "",
        ("Delay = first alarm window − onset window (the window holding the onset is 0); "
        "*any* = verdict minor or significant, *sig* = significant. FA = false alarms on "
        "stable windows (every evaluated window of a stable stream, the evaluated windows "
        "before the onset of the others)."),
        "",
        "| stream | kind | onset (window) | " + " | ".join(
            f"{fs}: delay any / sig | {fs}: FA any / sig" for fs in FEATURE_SETS) + " |",
        "|---|---|---|" + "---|---|" * len(FEATURE_SETS),
    ]
    for name, s in r["streams"].items():
        onset = "–" if s["onset_window"] is None else f"{s['onset_s']:g} s ({s['onset_window']})"
        cells = []
        for fs in FEATURE_SETS:
            sc = s["feature_sets"][fs]["score"]
            cells.append(f"{_delay(sc, 'any')} / {_delay(sc, 'significant')}")
            cells.append(f"{sc['false_alarms_any']} / {sc['false_alarms_significant']} "
                         f"of {sc['stable_windows']}")
        lines.append(f"| {name} | {s['kind']} | {onset} | " + " | ".join(cells) + " |")
    lines += [
        "",
        ("| feature set | FA per 100 stable windows (any / sig) | abrupt: within 1 window (any / sig) "
        "| abrupt: max delay (any) | gradual: delays (any) | detector CPU ms / window (mean, p95) "
        f"| + embedding CPU ms / window | cores for 1000 cameras, {st['window_s']:g} s windows | "
        f"cores for 1000 cameras, {st['prod_window_s']:g} s windows | windows without a verdict |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fs, s in r["summary"].items():
        ab_a, ab_s = s["abrupt_any"], s["abrupt_significant"]
        grad = [r["streams"][n]["feature_sets"][fs]["score"] for n in r["streams"]
                if r["streams"][n]["kind"] == "gradual"]
        grad_txt = ", ".join(_delay(g, "any") for g in grad) or "–"
        bench, prod = s["scaling_bench_cadence"], s["scaling_production_cadence"]
        lines.append(
            f"| {fs} | {s['fa_per_100_any']} / {s['fa_per_100_significant']} "
            f"(of {s['stable_windows']}) | {ab_a['within_1_window']} / {ab_s['within_1_window']} "
            f"of {ab_a['streams']} | {ab_a['max_delay']} ({ab_a['missed']} missed) | {grad_txt} | "
            f"{1000 * (s['cpu_s_per_window_mean'] or 0):.2f}, {1000 * (s['cpu_s_per_window_p95'] or 0):.2f} "
            f"| {1000 * s['embedding_cpu_s_per_window']:.0f} | {bench.get('cores', 0):.2f} "
            f"| {prod.get('cores', 0):.3f} | {s['no_verdict_windows']} of {s['windows_evaluated']} |")
    e = r["embeddings"]
    cap = r["capture"]
    lines += [
        "",
        (f"Embeddings: {e['model']} layer {e['layers']} ({e['dim']}-d), imgsz {e['imgsz']}, "
        f"{(e['cpu_s_per_frame'] or 0) * 1000:.1f} ms CPU per frame (model load excluded). "
        f"Cores for 1000 cameras = 1000 × windows per hour × (detector + embedding CPU per "
        f"window) / 3600 s; at {st['prod_window_s']:g} s windows the embeddings are those of "
        f"the agent's default upload budget (360 frames/h, {360 * st['prod_window_s'] / 3600:g} a "
        "window) and the detector's own CPU per window is taken as measured here. Building a "
        "reference (4 windows, noise floors included; once per camera and model version) took "
        + ", ".join(f"{fs} {1000 * (s['reference_build_cpu_s_mean'] or 0):.0f} ms"
                    for fs, s in r["summary"].items()) + " CPU on average."),
    ]
    if cap.get("wall_s"):
        lines.append(
            f"Capture: {cap['stream_s']:g} s of streams in {cap['wall_s']:g} s wall "
            f"({cap['concurrency']} agents at a time); agents {cap['agents_cpu_s']:g} s CPU, "
            f"gateway {cap['gateway_cpu_s']} s CPU.")
    lines += ["", "Per window, the range over each stream's windows:", ""]
    for name, s in r["streams"].items():
        wc = s["window_counts"]
        hb = [w["heartbeats"] for w in wc]
        up = [w["uploads"] for w in wc]
        fp = [w["frames_processed"] or 0 for w in wc]
        lines.append(f"- {name}: {len(wc)} windows, heartbeats {min(hb)}–{max(hb)}, frames "
                     f"processed {min(fp)}–{max(fp)} of {st['frames_per_window']:g}, "
                     f"uploads {min(up)}–{max(up)}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from roadloop.settings import Settings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captures", type=Path, default=DEFAULT_CAPTURES)
    p.add_argument("--streams", default="all", help="comma-separated stream names, or all")
    p.add_argument("--reference-windows", type=int, default=4)
    p.add_argument("--shared", type=Path, default=Settings().shared_dir)
    p.add_argument("--embed-model", type=Path, default=None, help=f"default shared {EMBED_MODEL}")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--prod-window-s", type=float, default=900.0,
                   help="window length of the production-cadence scaling estimate")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    result = run(args)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
