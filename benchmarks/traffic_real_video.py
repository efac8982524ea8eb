"""The agent's counter on real video against a count made by hand.

``benchmarks/data/handcount_<video>.json`` holds a line on a shared video and every vehicle a
person counted crossing it (first frame on the row, optionally the last, x extent), read off
a time-space image of the line's pixel row, plus the cases a person cannot call
(``ambiguous``: counting them or not is both accepted). This script runs the agent's own pipeline pieces — ``OnnxDetector`` (conf 0.25) and
``TrafficCounter`` with the shipped defaults — for each shipped ONNX model, at the video's
frame rate and decimated to about 15 and 10 fps (cameras often stream slower), and matches
the counted crossings to the hand count: a counted crossing matches a hand-counted one when
it happens from ``EARLY_S`` before the vehicle's front reaches the row to ``LATE_S`` after its
rear leaves it (without a recorded rear: after its front), plus one decimation step — the
counter registers a crossing once the counting point is a band beyond the line, later for a
slow vehicle — and its counting point's x lies in the vehicle's x extent (± 30 px).

It also writes the time-space image with the counter's crossings marked, so anyone can
re-check the hand count and the matches by eye.

    .venv/bin/python -m benchmarks.traffic_real_video [--models NAME ...]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.inference import OnnxDetector
from edge_agent.traffic import parse_traffic_section
from edge_agent.traffic.counter import TrafficCounter
from roadloop.fsutil import write_text_atomic
from roadloop.settings import PROJECT_ROOT, get_settings

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
HANDCOUNTS = sorted((PROJECT_ROOT / "benchmarks" / "data").glob("handcount_*.json"))
MODELS = ("atl_v2_yolo11n_gpu_480.onnx", "atl_v2_yolo11n_gpu_320.onnx",
          "atl_v2_yolo11n_480.onnx", "atl_v2_yolo11n_320.onnx")
STEPS = (1, 2, 3)  # every frame, every 2nd (~15 fps), every 3rd (~10 fps)
EARLY_S = 0.2
LATE_S = 1.0
X_MARGIN = 30


def read_frames(video: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames, float(fps)


def line_axis(truth: dict[str, Any]) -> int:
    """0 for a hand-count line along a pixel row (vehicles cross it moving up or down; their
    extents are ``x``), 1 along a pixel column (moving left or right; extents ``y``)."""
    (x0, y0), (x1, y1) = truth["line"]["start"], truth["line"]["end"]
    if y0 == y1:
        return 0
    if x0 == x1:
        return 1
    raise ValueError("a hand-count line runs along a pixel row or a pixel column")


def extent(t: dict[str, Any], axis: int) -> list[float]:
    return t["x" if axis == 0 else "y"]


def count(detections: list[list], truth: dict[str, Any], fps: float, step: int,
          class_names: list[str]) -> list[dict[str, Any]]:
    w, h = truth["frame_size"]
    geometry = parse_traffic_section({"frame_size": [w, h], "lines": [
        {"name": truth["line"]["name"], "start": truth["line"]["start"],
         "end": truth["line"]["end"]}]})
    counter = TrafficCounter(geometry, class_names)
    found = []
    for index in range(0, len(detections), step):
        out = counter.update(detections[index], index / fps)
        anchors = {t.track_id: t.anchor for t in out.confirmed}
        for c in out.crossings:
            found.append({"frame": index, "track_id": c.track_id, "direction": c.direction,
                          "class_name": c.class_name, "x": round(anchors[c.track_id][0], 1),
                          "y": round(anchors[c.track_id][1], 1)})
    return found


def _fits(f: dict[str, Any], t: dict[str, Any], fps: float, step: int, axis: int) -> bool:
    last = t.get("until", t["frame"]) + round(LATE_S * fps) + step
    lo, hi = extent(t, axis)
    where = f["x" if axis == 0 else "y"]
    return t["frame"] - round(EARLY_S * fps) <= f["frame"] <= last and \
        lo - X_MARGIN <= where <= hi + X_MARGIN


def match(found: list[dict[str, Any]], truth: list[dict[str, Any]],
          ambiguous: list[dict[str, Any]], fps: float, step: int,
          axis: int = 0) -> dict[str, Any]:
    """Greedy one-to-one matching in time order (each hand-counted vehicle once); a counted
    crossing that matches no vehicle but an ambiguous case is neither right nor wrong."""
    free = list(range(len(truth)))
    free_ambiguous = list(range(len(ambiguous)))
    matched, extra, uncertain = [], [], []
    for f in sorted(found, key=lambda c: c["frame"]):
        candidates = [i for i in free if _fits(f, truth[i], fps, step, axis)]
        if candidates:
            best = min(candidates, key=lambda i: abs(f["frame"] - truth[i]["frame"]))
            free.remove(best)
            matched.append((truth[best], f))
            continue
        either = [i for i in free_ambiguous if _fits(f, ambiguous[i], fps, step, axis)]
        if either:
            free_ambiguous.remove(either[0])
            uncertain.append(f)
        else:
            extra.append(f)
    return {"matched": len(matched), "missed": [truth[i] for i in free], "extra": extra,
            "ambiguous_counted": uncertain}


def slit_image(frames: list[np.ndarray], truth: dict[str, Any],
               found: list[dict[str, Any]]) -> np.ndarray:
    axis = line_axis(truth)
    (x0, y0), (x1, y1) = truth["line"]["start"], truth["line"]["end"]
    if axis == 0:  # one image row per frame: the line's pixels, left to right
        rows = np.stack([f[int(y0), int(x0):int(x1)] for f in frames])
    else:  # the line's column, top to bottom, laid out as a row
        rows = np.stack([f[int(y0):int(y1), int(x0)] for f in frames])
        x0 = y0  # positions along the line start at the line's first pixel
    key = "x" if axis == 0 else "y"
    scale = 2
    img = cv2.resize(rows, (rows.shape[1], rows.shape[0] * scale),
                     interpolation=cv2.INTER_NEAREST)
    for t in truth["crossings"]:
        cv2.rectangle(img, (int(t[key][0] - x0), t["frame"] * scale),
                      (int(t[key][1] - x0), t["frame"] * scale + 3), (0, 255, 255), -1)
        if "until" in t:  # the rear leaves the row: where a vehicle driving away is counted
            cv2.rectangle(img, (int(t[key][0] - x0), t["until"] * scale),
                          (int(t[key][1] - x0), t["until"] * scale + 2), (0, 200, 0), -1)
    for t in truth.get("ambiguous", []):
        cv2.rectangle(img, (int(t[key][0] - x0), t["frame"] * scale),
                      (int(t[key][1] - x0), t.get("until", t["frame"]) * scale + 3),
                      (255, 0, 255), 1)
    for f in found:
        cv2.circle(img, (int(f[key] - x0), f["frame"] * scale), 6, (0, 0, 255), 2)
    for k in range(0, len(frames), 30):
        cv2.putText(img, str(k), (2, k * scale + 12), 0, 0.45, (0, 0, 255), 1)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--handcount", type=Path, nargs="+", default=HANDCOUNTS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    for path in args.handcount:
        run_one(path.resolve(), args.models, args.out)


def run_one(handcount: Path, models: list[str], out: Path) -> None:
    shared = get_settings().shared_dir
    truth = json.loads(handcount.read_text())
    frames, fps = read_frames(shared / "videos" / truth["video"])
    load_start = os.getloadavg()
    rows = []
    best_found: list[dict[str, Any]] = []
    for name in models:
        det = OnnxDetector(shared / "models" / name, conf_threshold=0.25, intra_op_threads=1)
        t0 = time.perf_counter()
        detections = [det.detect(f) for f in frames]
        detect_s = time.perf_counter() - t0
        for step in STEPS:
            t1 = time.perf_counter()
            found = count(detections, truth, fps, step, det.class_names)
            count_s = time.perf_counter() - t1
            m = match(found, truth["crossings"], truth.get("ambiguous", []), fps, step,
                      line_axis(truth))
            if not best_found and step == 1:
                best_found = found
            rows.append({
                "model": name, "fps": round(fps / step, 1), "hand_count": len(truth["crossings"]),
                "counted": len(found), "matched": m["matched"], "missed": len(m["missed"]),
                "extra": len(m["extra"]), "ambiguous_counted": len(m["ambiguous_counted"]),
                "missed_frames": [t["frame"] for t in m["missed"]],
                "extra_frames": [f["frame"] for f in m["extra"]],
                "classes": sorted({f["class_name"] for f in found}),
                "detect_ms_per_frame": round(detect_s * 1e3 / len(frames), 1),
                "count_ms_per_frame": round(count_s * 1e3 / max(len(frames) // step, 1), 2),
            })
            print(rows[-1])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"traffic_real_video_{Path(truth['video']).stem}"
    cv2.imwrite(str(out / f"{stem}_slit.png"), slit_image(frames, truth, best_found))
    report = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_start": [round(v, 2) for v in load_start],
                    "load_avg_end": [round(v, 2) for v in os.getloadavg()]},
        "handcount": str(handcount.relative_to(PROJECT_ROOT)),
        "video": truth["video"], "line": truth["line"], "frames": len(frames), "fps": fps,
        "match": {"before_front_s": EARLY_S, "after_rear_s": LATE_S, "x_margin_px": X_MARGIN},
        "ambiguous": len(truth.get("ambiguous", [])),
        "rows": rows,
    }
    write_text_atomic(out / f"{stem}.json", json.dumps(report, indent=2))
    load = report["machine"]
    intro = (f"{report['created_at']}; line `{truth['line']['name']}` "
             f"{truth['line']['start']} → {truth['line']['end']} on {len(frames)} frames at "
             f"{fps:.2f} fps; hand count {len(truth['crossings'])} vehicles "
             f"(+ {len(truth.get('ambiguous', []))} a person cannot call) "
             f"(`{report['handcount']}`: method there). Detector: `OnnxDetector` conf 0.25, "
             "one thread; counter: `TrafficCounter` defaults. Time-space image with the "
             "hand count (yellow: a vehicle's front on the row, green: its rear leaving it, "
             "magenta: cases a person cannot call; time runs down, the line's pixels across) and "
             "the counter's crossings (red circles, first "
             f"model at full rate): `{stem}_slit.png`. Load average "
             f"{load['load_avg_start'][0]} → {load['load_avg_end'][0]}.")
    header = ("| model | fps | hand count | counted | matched | missed | extra | "
              "ambiguous counted | missed at frame | extra at frame | detect ms/frame | "
              "count ms/frame |")
    lines = [f"# Counting on real video vs a hand count: {truth['video']}", "", intro, "",
             header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fps']} | {r['hand_count']} | {r['counted']} | "
                     f"{r['matched']} | {r['missed']} | {r['extra']} | {r['ambiguous_counted']} | "
                     f"{r['missed_frames'] or '-'} | {r['extra_frames'] or '-'} | "
                     f"{r['detect_ms_per_frame']} | {r['count_ms_per_frame']} |")
    write_text_atomic(out / f"{stem}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
