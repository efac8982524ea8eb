"""How well, and at what cost, does the agent's tracker + line counter count traffic?

* **Accuracy, simulated detections** — seeded synthetic scenes
  (``roadloop.evaluation.traffic_scenes``: 320x192, 10 fps, 60 s, lanes toward / away / one
  closed) with detections from the detector simulator at three noise levels (``clean``,
  ``typical``: 3 % jitter, 10 % misses + bursts, flicker, car↔truck 5 %, 0.2 false
  positives a frame; ``harsh``: twice that). Scored by
  ``roadloop.evaluation.counting_accuracy``: count error per line / direction / class and in
  total, matched / missed / duplicate / ghost crossings, MOTA, IDF1, ID switches, speed error.
* **Accuracy, real detector** — one scene rendered at 640x384 (a shared video's empty road,
  vehicle crops from atl_v2 + manaus_v4) through ``OnnxDetector`` on
  ``atl_v2_yolo11n_gpu_320.onnx``, class names mapped onto the taxonomy.
* **Field failure modes** — ``roadloop.evaluation.traffic_cases`` (flicker across a line, a
  track that never confirms, a stop on the line, a line nothing can cross).
* **Cost** — wall time of ``TrafficCounter.update`` per frame (median, p95) and of the
  tracker alone (``VehicleTracker.update``), on the ONNX detector's own detections over 120
  consecutive frames of each shared video (its density) and on 50 moving boxes a frame.
  Everything runs on one thread (ONNX Runtime intra-op 1, BLAS/OpenMP 1); the JSON records
  the load average and the hash of the counter's source.

Nothing here tunes the counter: its defaults are used as shipped.

    .venv/bin/python -m benchmarks.traffic_counting [--seeds 0 1 2] [--duration 60]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.inference import Detection, OnnxDetector
from edge_agent.traffic import parse_traffic_section
from roadloop.data.datasets import load_taxonomy
from roadloop.evaluation.counting_accuracy import evaluate_counter
from roadloop.evaluation.traffic_cases import failure_cases
from roadloop.evaluation.traffic_noise import NOISE_LEVELS, simulate_detections
from roadloop.evaluation.traffic_scenes import (
    CLASS_NAMES,
    TrafficScene,
    build_scene,
    render_frames,
)
from roadloop.fsutil import write_text_atomic
from roadloop.settings import PROJECT_ROOT, get_settings

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def _counter(section: dict):
    from edge_agent.traffic.counter import TrafficCounter

    return TrafficCounter(parse_traffic_section(section), list(CLASS_NAMES))


def _source_hash() -> str:
    import edge_agent.traffic as t

    h = hashlib.sha256()
    for p in sorted(Path(t.__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _summary(r) -> dict:
    d = r.to_dict()
    d.pop("details", None)
    return d


def simulated(seeds: list[int], duration: float) -> list[dict]:
    out = []
    for seed in seeds:
        scene = build_scene(TrafficScene(seed=seed, duration_s=duration))
        truth = list(scene.truth_frames())
        for level, noise in NOISE_LEVELS.items():
            dets = simulate_detections(truth, noise, width=320, height=192, seed=seed)
            r = evaluate_counter(_counter(scene.traffic_section()), scene, dets, truth=truth)
            out.append({"seed": seed, "noise": level, **_summary(r),
                        "missed_detail": r.details["missed"], "ghost_detail": r.details["ghosts"]})
    return out


def _taxonomy_names(det: OnnxDetector) -> list[str]:
    tax = load_taxonomy()
    src = tax.sources["atl_v2"]
    return [src.get(n, n) for n in det.class_names]


def real_detector(model: Path, shared: Path, duration: float, seed: int) -> dict:
    cfg = TrafficScene(seed=seed, duration_s=duration, width=640, height=384,
                       background_video=shared / "videos" / "cctv_street.mp4",
                       crop_datasets=(shared / "datasets" / "atl_v2",
                                      shared / "datasets" / "manaus_v4"))
    scene = build_scene(cfg)
    det = OnnxDetector(model, intra_op_threads=1)
    names = _taxonomy_names(det)
    dets = []
    for frame in render_frames(scene):
        dets.append([Detection(CLASS_NAMES.index(names[d.class_id]) if names[d.class_id] in
                               CLASS_NAMES else d.class_id, d.confidence, d.x1, d.y1, d.x2, d.y2,
                               names[d.class_id]) for d in det.detect(frame)])
    r = evaluate_counter(_counter(scene.traffic_section()), scene, dets)
    return {"model": model.name, "size": [640, 384], "duration_s": duration, "seed": seed,
            "detections_per_frame": statistics.mean(map(len, dets)), **_summary(r),
            "missed_detail": r.details["missed"], "ghost_detail": r.details["ghosts"]}


def _video_section(w: int, h: int) -> dict:
    return {"frame_size": [w, h],
            "lines": [{"name": "mid", "start": [0.05 * w, 0.5 * h], "end": [0.95 * w, 0.5 * h]},
                      {"name": "low", "start": [0.05 * w, 0.75 * h],
                       "end": [0.95 * w, 0.75 * h]}],
            "zones": [{"name": "all", "polygon": [[1, 0.3 * h], [w - 1, 0.3 * h],
                                                  [w - 1, h - 1], [1, h - 1]], "capacity": 20}],
            "homography": {"image_points": [[0, h], [w, h], [0.6 * w, 0.3 * h],
                                            [0.4 * w, 0.3 * h]],
                           "world_points": [[-10, 0], [10, 0], [10, 60], [-10, 60]]}}


def _time(fn, streams: list[tuple[float, list]]) -> dict:
    ms = []
    for t, dets in streams:
        t0 = time.perf_counter()
        fn(dets, t)
        ms.append((time.perf_counter() - t0) * 1000)
    ms = ms[5:]  # warm-up
    return {"median_ms": round(statistics.median(ms), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3), "frames": len(ms)}


def _cost(name: str, size: tuple[int, int], stream: list[tuple[float, list]]) -> dict:
    from edge_agent.traffic.tracking import VehicleTracker

    counter = _counter(_video_section(*size))
    tracker = VehicleTracker(list(CLASS_NAMES))
    return {"stream": name, "objects_per_frame": round(statistics.mean(len(d) for _, d in stream),
                                                       1),
            "max_objects": max(len(d) for _, d in stream),
            "counter": _time(lambda d, t: counter.update(d, stream_time=t), stream),
            "tracker_only": _time(lambda d, t: tracker.update(d, t), stream)}


def cost(model: Path, shared: Path, frames: int) -> list[dict]:
    det = OnnxDetector(model, intra_op_threads=1)
    names = _taxonomy_names(det)
    out = []
    for video in sorted((shared / "videos").glob("*.mp4")):
        cap = cv2.VideoCapture(str(video))
        fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
        stream, size = [], None
        for k in range(frames):
            ok, frame = cap.read()
            if not ok:
                break
            size = (frame.shape[1], frame.shape[0])
            stream.append((k / fps, [Detection(d.class_id, d.confidence, d.x1, d.y1, d.x2, d.y2,
                                               names[d.class_id]) for d in det.detect(frame)]))
        cap.release()
        out.append(_cost(video.name, size, stream))
    rng = np.random.default_rng(0)  # 50 boxes drifting down a 1280x720 frame, 3 % jitter
    base = np.stack([rng.uniform(0, 1200, 50), rng.uniform(0, 600, 50)], 1)
    stream = []
    for k in range(200):
        pos = base + [0, (k * 4) % 120]
        boxes = [Detection(0, 0.8, float(x), float(y), float(x + 60 + rng.normal(0, 2)),
                           float(y + 40 + rng.normal(0, 1.2)), "car") for x, y in pos]
        stream.append((k / 10, boxes))
    out.append(_cost("50 objects/frame (synthetic)", (1280, 720), stream))
    return out


def cases() -> list[dict]:
    out = []
    for case in failure_cases():
        r = evaluate_counter(_counter(case.scene.traffic_section()), case.scene, case.detections,
                             warmup_s=0.0, tail_s=0.0)
        out.append({"case": case.name, "description": case.description, "lines": r.lines,
                    "crossings": r.crossings, "speed": r.speed})
    return out


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = ["# Traffic counting: accuracy and cost", "",
             (f"Counter source sha256[:16] `{rep['counter_source']}`; load average "
             f"{m['load_avg_start']} → {m['load_avg_end']}; one thread everywhere."), "",
             "## Simulated detections (320x192, 10 fps)", "",
             ("| seed | noise | truth | counted | error | |err| per line/dir/class | matched | "
             "missed | dup | ghost | wrong class | MOTA | IDF1 | IDSW | speed MAE km/h | bias |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["simulated"] + [dict(rep["real_detector"], seed=rep["real_detector"]["seed"],
                                      noise="ONNX detector 640x384")]:
        t, c, mo, s = r["total"], r["crossings"], r["mot"], r["speed"]
        lines.append(f"| {r['seed']} | {r['noise']} | {t['truth']} | {t['counted']} | "
                     f"{t['error']:+d} | {t['abs_error_sum']} | {c['matched']} | {c['missed']} | "
                     f"{c['duplicates']} | {c['ghosts']} | {c['wrong_class']} | {mo['MOTA']} | "
                     f"{mo['IDF1']} | {mo['IDSW']} | {s['median_abs_error_kmh']} | "
                     f"{s['bias_kmh']} |")
    lines += ["", "## Field failure modes", "", ("| case | per line: truth / counted | "
              "dup | ghost | missed |"), "|---|---|---|---|---|"]
    for r in rep["cases"]:
        per = ", ".join(f"{x['line']} {x['truth']}/{x['counted']}" for x in r["lines"])
        c = r["crossings"]
        lines.append(f"| {r['case']} | {per} | {c['duplicates']} | {c['ghosts']} | "
                     f"{c['missed']} |")
    lines += ["", "## Cost per frame (ms, one thread)", "",
              ("| stream | objects/frame (max) | counter median | counter p95 | tracker median "
              "| tracker p95 |"), "|---|---|---|---|---|---|"]
    for r in rep["cost"]:
        lines.append(f"| {r['stream']} | {r['objects_per_frame']} ({r['max_objects']}) | "
                     f"{r['counter']['median_ms']} | {r['counter']['p95_ms']} | "
                     f"{r['tracker_only']['median_ms']} | {r['tracker_only']['p95_ms']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--real-duration", type=float, default=30.0)
    ap.add_argument("--cost-frames", type=int, default=120)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    shared = get_settings().shared_dir
    model = args.model or shared / "models" / "atl_v2_yolo11n_gpu_320.onnx"
    load0 = round(os.getloadavg()[0], 2)
    rep = {"counter_source": _source_hash(),
           "simulated": simulated(args.seeds, args.duration),
           "real_detector": real_detector(model, shared, args.real_duration, args.seeds[0]),
           "cases": cases(), "cost": cost(model, shared, args.cost_frames)}
    rep["machine"] = {"load_avg_start": load0, "load_avg_end": round(os.getloadavg()[0], 2),
                      "cpu_count": os.cpu_count(), "threads": 1}
    write_text_atomic(args.out / "traffic_counting.json", json.dumps(rep, indent=2) + "\n",
                      parents=True)
    write_text_atomic(args.out / "traffic_counting.md", markdown(rep), parents=True)
    print(markdown(rep))


if __name__ == "__main__":
    main()
