"""Square vs rectangular INT8 models on the same 16:9 frames: accuracy and detector speed.

The atl_v2 frames are nearly all 16:9 already (1280×720 and smaller crops of it; 10 of 296
are 640×640): each val+test frame and 100 train frames (calibration) are cut to their centre
16:9 band (boxes clipped to it, a box keeping under half its area dropped), which leaves the
16:9 ones unchanged. The checkpoint is exported at 320×320 and
at 192×320 (``roadloop.models.export.export_onnx``), each quantized
(``roadloop.models.quantize.quantize_int8``, default config, calibrated on the 16:9 train
crops), scored by ``roadloop.evaluation.shape_accuracy`` (the edge detector at the model's own
shape) and gated per shape by ``check_int8_drop``. Speed: the edge detector
(letterbox → network → NMS) on 16:9 frames of a shared video, one ORT thread, both models
alternating frame by frame.

    python -m benchmarks.rect_shapes --out benchmarks/results

Writes ``<out>/rect_shapes.json`` and ``<out>/rect_shapes.md``, each with the load average
at the start and the end of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from edge_agent.inference import OnnxDetector
from roadloop.evaluation.gates import GateConfig
from roadloop.evaluation.inputs import label_path_for
from roadloop.evaluation.shape_accuracy import gate_int8_per_shape
from roadloop.fsutil import write_text_atomic
from roadloop.models.export import export_onnx, shape_label
from roadloop.models.quantize import list_images, pick_calibration_frames, quantize_int8
from roadloop.models.training import configure_ultralytics
from roadloop.settings import get_settings

SHAPES = ((320, 320), (192, 320))
THREADS = 1  # ONNX Runtime intra-op (and inter-op) threads of both detectors


def crop_16_9(images: list[Path], out: Path) -> None:
    """Centre 16:9 band of each frame into ``out/images`` + clipped YOLO labels."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for p in images:
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        ch = round(w * 9 / 16)
        y0 = (h - ch) // 2
        cv2.imwrite(str(out / "images" / p.name), img[y0:y0 + ch])
        rows = []
        lab = label_path_for(p)
        data = np.loadtxt(lab, ndmin=2) if lab.is_file() and lab.stat().st_size else np.zeros((0, 5))
        for c, cx, cy, bw, bh in data:
            x1, x2 = (cx - bw / 2) * w, (cx + bw / 2) * w
            y1, y2 = (cy - bh / 2) * h - y0, (cy + bh / 2) * h - y0
            ny1, ny2 = max(y1, 0), min(y2, ch)
            if ny2 <= ny1 or (ny2 - ny1) < 0.5 * (y2 - y1):
                continue
            rows.append(f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(ny1 + ny2) / 2 / ch:.6f} "
                        f"{(x2 - x1) / w:.6f} {(ny2 - ny1) / ch:.6f}")
        (out / "labels" / f"{p.stem}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))


def time_detectors(models: dict[str, Path], video: Path, frames: int) -> dict[str, dict]:
    dets = {k: OnnxDetector(p, intra_op_threads=THREADS, inter_op_threads=THREADS)
            for k, p in models.items()}
    cap = cv2.VideoCapture(str(video))
    times: dict[str, list[float]] = {k: [] for k in models}
    n = 0
    while n < frames:
        ok, frame = cap.read()
        if not ok:
            break
        if n == 0:
            for d in dets.values():  # warm-up
                d.detect(frame)
        keys = list(models)[n % 2:] + list(models)[:n % 2]  # alternate who goes first
        for k in keys:
            t0 = time.perf_counter()
            dets[k].detect(frame)
            times[k].append((time.perf_counter() - t0) * 1e3)
        n += 1
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return {k: {"median_ms": statistics.median(v), "mean_ms": statistics.fmean(v),
                "fps": 1e3 / statistics.fmean(v), "frames": len(v), "video": video.name,
                "frame_size": list(size)} for k, v in times.items()}


def run(pt: Path, out: Path, frames: int) -> dict:
    shared = get_settings().shared_dir
    ds = shared / "datasets" / "atl_v2"
    load_start = os.getloadavg()  # the CPU may be shared: the report says how busy it was
    with tempfile.TemporaryDirectory(prefix="rect-shapes-") as tmp_s:
        tmp = Path(tmp_s)
        configure_ultralytics(tmp / "ultralytics")
        ev = list_images(ds / "images" / "val") + list_images(ds / "images" / "test")
        crop_16_9(ev, tmp / "wide" / "eval")
        crop_16_9(pick_calibration_frames(list_images(ds / "images" / "train"), 100),
                  tmp / "wide" / "calib")
        names = yaml.safe_load((ds / "data.yaml").read_text())["names"]
        data_yaml = tmp / "wide" / "data.yaml"
        data_yaml.write_text(yaml.safe_dump({"path": str(tmp / "wide"), "train": "calib/images",
                                             "val": "eval/images", "test": "eval/images",
                                             "names": names}))
        calib = list_images(tmp / "wide" / "calib" / "images")
        staged = tmp / "model.pt"
        shutil.copy2(pt, staged)
        pairs = {}
        for hw in SHAPES:
            label = shape_label(hw)
            fp32 = export_onnx(staged, tmp / f"{label}.onnx", imgsz=hw).path
            int8 = quantize_int8(fp32, tmp / f"{label}.int8.onnx", calib, imgsz=hw).path
            pairs[label] = (fp32, int8)
        gated = gate_int8_per_shape(pairs, data_yaml, GateConfig(), split="test")
        videos = sorted((shared / "videos").glob("*.mp4"))
        speed = time_detectors({k: v[1] for k, v in pairs.items()}, videos[0], frames)
    load_end = os.getloadavg()
    report = {
        "checkpoint": pt.name,
        "eval_frames": len(ev),
        "cpu_count": os.cpu_count(),
        "ort_threads": {"intra_op": THREADS, "inter_op": THREADS},
        "load_average_start_end": [list(load_start), list(load_end)],
        "shapes": {
            label: {
                "fp32_map50_95": res.rows[0].metrics.map50_95,
                "int8_map50_95": res.rows[1].metrics.map50_95,
                "fp32_map50": res.rows[0].metrics.map50,
                "int8_map50": res.rows[1].metrics.map50,
                "gate": outcome.name, "gate_passed": outcome.passed,
                "gate_description": outcome.description,
                "int8_detector": speed[label],
            }
            for label, (outcome, res) in gated.items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "rect_shapes.json", json.dumps(report, indent=2))
    write_text_atomic(out / "rect_shapes.md", markdown(report))
    return report


def markdown(r: dict) -> str:
    lines = [
        "# Square vs rectangular INT8 on the same 16:9 frames", "",
        (f"Checkpoint `{r['checkpoint']}`; accuracy on the centre 16:9 band of "
         f"{r['eval_frames']} atl_v2 val+test frames (nearly all 1280×720 already), scored at "
         "each model's own shape by `roadloop.evaluation.shape_accuracy` (which reproduces "
         "Ultralytics `val` of the same ONNX at 320×320: atl_v2 val 0.200 / 0.082); "
         "speed of the edge detector (letterbox → network → NMS) on 16:9 video frames, one "
         "ONNX Runtime thread. Command: `python -m benchmarks.rect_shapes`."), "",
        ("| shape | fp32 mAP50-95 | INT8 mAP50-95 | INT8 mAP50 | INT8 gate | INT8 median ms | "
         "INT8 frames/s |"), "|---|---|---|---|---|---|---|",
    ]
    for label, s in r["shapes"].items():
        sp = s["int8_detector"]
        lines.append(f"| {label} | {s['fp32_map50_95']:.4f} | {s['int8_map50_95']:.4f} | "
                     f"{s['int8_map50']:.4f} | {'pass' if s['gate_passed'] else 'FAIL'} | "
                     f"{sp['median_ms']:.1f} | {sp['fps']:.1f} |")
    lines += ["", *[f"- {s['gate']}: {s['gate_description']}" for s in r["shapes"].values()], ""]
    if r.get("load_average_start_end"):
        start, end = (" / ".join(f"{v:.2f}" for v in x) for x in r["load_average_start_end"])
        lines += [(f"Load average (1/5/15 min) at start {start}, at end {end} "
                   f"({r.get('cpu_count', '?')} CPUs)."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pt", type=Path,
                    default=get_settings().shared_dir / "models" / "atl_v2_yolo11n_gpu.pt")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    print(markdown(run(a.pt, a.out, a.frames)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
