"""Inference benchmark: Ultralytics PyTorch ``predict`` vs the edge core on ONNX fp32 and INT8.

Same model, same frames, same image size and thresholds, one process. Frames are decoded
from the shared videos into memory *before* timing (decode excluded for every engine);
each timed call is one frame end to end (letterbox → network → NMS → boxes in frame
pixels). Engines are interleaved frame by frame, in rotating order, so background load on
a shared machine hits all of them alike. Accuracy is Ultralytics ``val`` on the labelled
split for each model file (the edge core's parity with Ultralytics' ONNX predictions is
held by ``tests/test_edge_inference.py``).

    python -m benchmarks.inference --frames 100 --out benchmarks/results

Writes ``<out>/inference.json`` and ``<out>/inference.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from edge_agent import OnnxDetector, file_sha256

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONF, IOU = 0.25, 0.7  # Ultralytics predict defaults, used by every engine
TARGET_SPEEDUP = 2.0
TARGET_MAX_MAP_LOSS_PTS = 1.5  # mAP50-95 points (0.015 absolute)


# ---------------------------------------------------------------------------- inputs
def _default_paths() -> dict[str, Path]:
    from roadloop.settings import get_settings

    shared = get_settings().shared_dir
    return {
        "pt": shared / "models" / "atl_v2_yolo11n_320.pt",
        "onnx": shared / "models" / "atl_v2_yolo11n_320.onnx",
        "data": shared / "datasets" / "atl_v2" / "data.yaml",
        "videos": shared / "videos",
    }


def sample_video_frames(videos: list[Path], n: int) -> list[tuple[str, int, np.ndarray]]:
    """``n`` frames spread evenly over the videos (about n / len(videos) each), decoded now."""
    if not videos:
        raise FileNotFoundError("no videos to take benchmark frames from")
    out: list[tuple[str, int, np.ndarray]] = []
    per = [n // len(videos) + (1 if i < n % len(videos) else 0) for i in range(len(videos))]
    for video, k in zip(videos, per):
        cap = cv2.VideoCapture(str(video))
        if not cap.isOpened():
            raise ValueError(f"{video}: cannot open video")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 1
        # CAP_PROP_FRAME_COUNT can overshoot by a frame or two; stay clear of the end.
        last = max(int(total * 0.97) - 1, 0)
        wanted = set(np.linspace(0, last, k).round().astype(int).tolist()) if k else set()
        index = 0
        while wanted and index <= max(wanted):
            ok, frame = cap.read()
            if not ok:
                break
            if index in wanted:
                out.append((video.name, index, frame))
            index += 1
        cap.release()
    logger.info("decoded %d benchmark frames from %d videos", len(out), len(videos))
    return out


def dataset_view(data_yaml: Path, split: str, work: Path) -> Path:
    """A data YAML over symlinks to ``split``, so Ultralytics writes its label cache under
    ``work`` instead of into the (read-only by policy) shared dataset."""
    doc = yaml.safe_load(data_yaml.read_text())
    root = Path(doc.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    rel = Path(doc[split])
    images = root / rel
    labels = root / Path(str(rel).replace("images", "labels", 1))
    if not images.is_dir() or not labels.is_dir():
        raise FileNotFoundError(f"{data_yaml}: split {split!r} needs {images} and {labels}")
    view = work / f"data_{split}"
    shutil.rmtree(view, ignore_errors=True)
    # Per-file links in real folders: Ultralytics resolve()s the split folder, so a linked
    # folder would send its label cache back into the shared dataset.
    for src, kind in ((images, "images"), (labels, "labels")):
        dst = view / kind / split
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                (dst / f.name).symlink_to(f)
    view_yaml = view / "data.yaml"
    names = doc["names"]
    view_yaml.write_text(
        yaml.safe_dump(
            {
                "path": str(view),
                "train": f"images/{split}",
                "val": f"images/{split}",
                split: f"images/{split}",
                "names": names,
            }
        )
    )
    return view_yaml


# ---------------------------------------------------------------------------- engines
@dataclass
class Engine:
    name: str
    label: str
    model_path: Path
    run: Callable[[np.ndarray], list[tuple[int, float, tuple[float, float, float, float]]]]
    stages: Callable[[], dict[str, float] | None]
    times_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    detections: list[list[tuple[int, float, tuple[float, float, float, float]]]] = field(
        default_factory=list
    )


def _pytorch_engine(yolo_cls, pt: Path, imgsz: int, rect: bool = True) -> Engine:
    """Ultralytics predict. ``rect=True`` is its default: a .pt model gets the smallest
    stride-multiple letterbox (320x192 for 16:9), fewer pixels than a static 320x320 ONNX."""
    model = yolo_cls(str(pt), task="detect")
    last: dict[str, Any] = {}

    def run(frame: np.ndarray):
        r = model.predict(
            frame, imgsz=imgsz, conf=CONF, iou=IOU, rect=rect, device="cpu", verbose=False
        )[0]
        last["speed"] = dict(r.speed)
        b = r.boxes
        return [
            (int(c), float(s), tuple(map(float, xyxy)))
            for c, s, xyxy in zip(b.cls.tolist(), b.conf.tolist(), b.xyxy.tolist())
        ]

    def stages():
        s = last.get("speed")
        if not s:
            return None
        return {
            "preprocess_ms": s["preprocess"],
            "inference_ms": s["inference"],
            "postprocess_ms": s["postprocess"],
        }

    return Engine("pytorch", "Ultralytics predict, PyTorch (.pt)", pt, run, stages)


def _edge_engine(name: str, label: str, path: Path, imgsz: int, threads: int | None) -> Engine:
    det = OnnxDetector(path, conf_threshold=CONF, iou_threshold=IOU, intra_op_threads=threads)
    if det.input_size != imgsz:
        raise ValueError(f"{path}: model input is {det.input_size}px but --imgsz is {imgsz}")

    def run(frame: np.ndarray):
        return [(d.class_id, d.confidence, d.xyxy) for d in det.detect(frame)]

    def stages():
        t = det.last_timings
        if t is None:
            return None
        return {
            "preprocess_ms": t.preprocess_ms,
            "inference_ms": t.inference_ms,
            "postprocess_ms": t.postprocess_ms,
        }

    engine = Engine(name, label, path, run, stages)
    engine.detector = det  # type: ignore[attr-defined]
    return engine


def _pytorch_square_engine(yolo_cls, pt: Path, imgsz: int) -> Engine:
    e = _pytorch_engine(yolo_cls, pt, imgsz, rect=False)
    e.name = "pytorch_square"
    e.label = f"Ultralytics predict, PyTorch, square {imgsz}² input (reference)"
    return e


def _ultralytics_onnx_engine(yolo_cls, path: Path, imgsz: int) -> Engine:
    e = _pytorch_engine(yolo_cls, path, imgsz)
    e.name, e.label = "ultralytics_onnx_fp32", "Ultralytics predict, ONNX fp32 (reference)"
    return e


def time_engines(engines: list[Engine], frames: list[np.ndarray], warmup: int) -> None:
    """Run every engine on every frame, interleaved in rotating order; warm-up calls untimed."""
    for engine in engines:
        for frame in frames[:warmup]:
            engine.run(frame)
    k = len(engines)
    for i, frame in enumerate(tqdm(frames, desc="timing (all engines per frame)", unit="frame")):
        for j in range(k):
            engine = engines[(i + j) % k]
            t0 = time.perf_counter()
            dets = engine.run(frame)
            engine.times_ms.append((time.perf_counter() - t0) * 1e3)
            engine.detections.append(dets)
            for key, v in (engine.stages() or {}).items():
                engine.stage_ms.setdefault(key, []).append(v)


# ---------------------------------------------------------------------------- metrics
def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def agreement_f1(ref: list[list], other: list[list], iou: float = 0.5) -> float:
    """F1 of ``other``'s boxes against ``ref``'s (same class, IoU ≥ 0.5, greedy by score):
    how far a faster engine's answers drift from PyTorch's on unlabelled video frames."""
    tp = n_ref = n_other = 0
    for r, o in zip(ref, other):
        n_ref += len(r)
        n_other += len(o)
        if not r or not o:
            continue
        rb = np.array([x[2] for x in r])
        ob = np.array([x[2] for x in o])
        same = np.array([x[0] for x in r])[:, None] == np.array([x[0] for x in o])[None]
        m = _iou_matrix(rb, ob) * same
        used: list[int] = []
        for i in np.argsort([-x[1] for x in r]):
            cand = m[i].copy()
            cand[used] = -1.0
            j = int(np.argmax(cand))
            if cand[j] >= iou:
                used.append(j)
                tp += 1
    if n_ref + n_other == 0:
        return 1.0
    return 2 * tp / (n_ref + n_other)


def ultralytics_map(
    yolo_cls, model_path: Path, data_yaml: Path, split: str, imgsz: int, work: Path
) -> dict[str, float]:
    model = yolo_cls(str(model_path), task="detect")
    res = model.val(
        data=str(data_yaml),
        split=split,
        imgsz=imgsz,
        batch=1,
        device="cpu",
        workers=0,
        plots=False,
        verbose=False,
        save_json=False,
        project=str(work / "val"),
        name=model_path.stem,
        exist_ok=True,
    )
    return {"map50": float(res.box.map50), "map50_95": float(res.box.map)}


def _summary(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
    }


# ---------------------------------------------------------------------------- INT8
def _train_frames(data_yaml: Path) -> tuple[Path, list[Path]]:
    """The data YAML's train folder and its images: INT8 calibration frames (never scored)."""
    doc = yaml.safe_load(data_yaml.read_text())
    root = Path(doc.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    train_dir = root / doc["train"]
    return train_dir, sorted(
        p for p in train_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
    )


def resolve_int8(args: argparse.Namespace, onnx_path: Path, work: Path) -> tuple[Path | None, str]:
    """The INT8 model to benchmark and a note saying where it came from (or why it is absent)."""
    if args.model_int8:
        return Path(args.model_int8), f"given: {args.model_int8}"
    if args.no_int8:
        return None, "INT8 row skipped (--no-int8)"
    try:
        from roadloop.models.quantize import quantize_int8
    except ImportError as exc:
        return None, f"INT8 row left out: roadloop.models.quantize.quantize_int8 is not available ({exc})"
    train_dir, calib = _train_frames(args.data)
    out = work / f"{onnx_path.stem}_int8.onnx"
    logger.info(
        "quantizing %s to INT8 with roadloop.models.quantize (calibration: %s train frames)",
        onnx_path.name,
        len(calib),
    )
    t0 = time.perf_counter()
    info = quantize_int8(onnx_path, out, calib, imgsz=args.imgsz)
    note = (
        f"made by roadloop.models.quantize.quantize_int8 from {onnx_path.name} in {time.perf_counter() - t0:.0f} s, "
        f"calibrated on {info.calibration_frames} of {len(calib)} {train_dir.parent.parent.name} train frames, "
        f"{info.excluded_nodes} nodes kept in float, config {info.config.model_dump(exclude={'extra_options'})}"
    )
    return out, note


def rect_shape(frames: list[np.ndarray], imgsz: int, stride: int = 32) -> tuple[int, int] | None:
    """The (H, W) input Ultralytics' predict letterboxes these frames to (long side ``imgsz``,
    short side rounded up to the stride), or None when frames differ in it or it is square."""

    def one(h: int, w: int) -> tuple[int, int]:
        r = imgsz / max(h, w)
        return tuple(int(math.ceil(round(d * r) / stride) * stride) for d in (h, w))  # type: ignore[return-value]

    shapes = {one(*f.shape[:2]) for f in frames}
    if len(shapes) != 1:
        return None
    hw = shapes.pop()
    return None if hw[0] == hw[1] else hw


def make_rect_models(
    args: argparse.Namespace, yolo_cls, hw: tuple[int, int], work: Path
) -> tuple[Path, Path | None, str]:
    """fp32 and INT8 ONNX at a rectangular (H, W) input, from the same checkpoint."""
    from roadloop.models.quantize import quantize_int8

    pt = work / f"{args.model_pt.stem}_rect.pt"  # export writes beside its checkpoint
    shutil.copy(args.model_pt, pt)
    fp32 = Path(yolo_cls(str(pt)).export(format="onnx", imgsz=hw, simplify=True, verbose=False))
    if args.no_int8:
        return fp32, None, "rect INT8 skipped (--no-int8)"
    _, calib = _train_frames(args.data)
    int8 = work / f"{fp32.stem}_int8.onnx"
    info = quantize_int8(fp32, int8, calib, imgsz=hw)
    return fp32, int8, (
        f"{hw[0]}x{hw[1]} exported by Ultralytics from {args.model_pt.name}; INT8 by "
        f"roadloop.models.quantize.quantize_int8 ({info.calibration_frames} calibration frames, "
        f"{info.excluded_nodes} nodes kept in float)"
    )


# ---------------------------------------------------------------------------- report
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Inference benchmark: PyTorch vs edge core (ONNX fp32 / INT8)",
        "",
        (
            f"{report['created']} · {report['machine']['cpu']} ({report['machine']['cpu_count']} CPUs, "
            f"load avg {report['machine']['load_avg_start']}) · imgsz {s['imgsz']} · conf {s['conf']} · "
            f"iou {s['iou']} · {s['timed_frames']} timed frames from {', '.join(s['videos'])} "
            f"({s['warmup']} warm-up each) · accuracy: Ultralytics val on `{s['data']}` [{s['split']}]"
        ),
        "",
        (
            f"Timing: {s['timing']}. CPU threads: torch {report['machine']['torch_threads']} "
            f"(Ultralytics' choice), ONNX Runtime {report['machine']['ort_intra_op_threads']}."
        ),
        "",
        "| engine | frames/s | ms/frame mean (p50 / p90) | pre / infer / post ms | × PyTorch fps | mAP50 | mAP50-95 | Δ mAP50-95 vs PyTorch (pts) | agreement with PyTorch (F1) | agreement with edge fp32 (F1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        st = r["stages_ms"]
        stages = (
            " / ".join(
                _fmt(st.get(k), ".1f") for k in ("preprocess_ms", "inference_ms", "postprocess_ms")
            )
            if st
            else "–"
        )
        lat = r["latency_ms"]
        lines.append(
            f"| {r['label']} | {r['fps']:.1f} | {lat['mean']:.1f} ({lat['p50']:.1f} / {lat['p90']:.1f}) | {stages} | "
            f"{r['speedup_vs_pytorch']:.2f}× | {_fmt(r.get('map50'), '.3f')} | {_fmt(r.get('map50_95'), '.3f')} | "
            f"{_fmt(r.get('delta_map50_95_pts'), '+.2f')} | {_fmt(r.get('agreement_f1_vs_pytorch'), '.3f')} | "
            f"{_fmt(r.get('agreement_f1_vs_edge_fp32'), '.3f')} |"
        )
    lines += ["", "Models:", ""]
    for r in report["results"]:
        lines.append(f"- {r['name']}: `{r['model']}` (sha256 {r['model_sha256'][:12]}…)")
    lines += ["", f"INT8: {report['int8']['note']}", ""]
    if report.get("rect", {}).get("note"):
        lines += [f"Rectangular rows: {report['rect']['note']}", ""]
    t = report["target"]
    lines.append(
        f"Target (INT8 edge path ≥ {t['min_speedup']}× PyTorch frames/s at ≤ {t['max_map50_95_loss_pts']} pt "
        f"mAP50-95 loss): **{t['verdict']}**"
    )
    if t.get("detail"):
        lines += ["", t["detail"]]
    lines += [
        "",
        (
            "Stage times for PyTorch are Ultralytics' own `Results.speed`; for the edge rows, "
            "`OnnxDetector.last_timings`. Agreement F1 matches each engine's boxes on the video frames "
            "to PyTorch's (same class, IoU ≥ 0.5): it shows drift on unlabelled camera frames, where mAP "
            "cannot."
        ),
        "",
    ]
    return "\n".join(lines)


def _verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    target: dict[str, Any] = {
        "min_speedup": TARGET_SPEEDUP,
        "max_map50_95_loss_pts": TARGET_MAX_MAP_LOSS_PTS,
    }
    int8 = next((r for r in results if r["name"] == "edge_onnx_int8"), None)
    if int8 is None:
        target.update(verdict="not measured (no INT8 model)", met=None)
        return target
    speed_ok = int8["speedup_vs_pytorch"] >= TARGET_SPEEDUP
    loss = -(int8.get("delta_map50_95_pts") or 0.0) if int8.get("map50_95") is not None else None
    acc_ok = None if loss is None else loss <= TARGET_MAX_MAP_LOSS_PTS
    # Without mAP (--no-map) accuracy is not judged: the target is missed if the speed half
    # misses, otherwise not judged (None), never "missed" for a half that was not measured.
    met = False if not speed_ok else acc_ok
    st = int8["stages_ms"]
    total = sum(st.values()) or 1.0
    share = {k: round(100 * v / total, 1) for k, v in st.items()}
    target.update(
        met=met,
        speed_ok=speed_ok,
        accuracy_ok=acc_ok,
        int8_speedup=int8["speedup_vs_pytorch"],
        int8_map50_95_loss_pts=loss,
        int8_stage_share_pct=share,
        verdict=(
            f"not judged (mAP not measured): {int8['speedup_vs_pytorch']:.2f}× fps"
            if met is None else
            ("met" if met else "missed")
            + f" ({int8['speedup_vs_pytorch']:.2f}× fps, "
            + (f"{loss:.2f} pt mAP50-95 loss)" if loss is not None else "mAP not measured)")
        ),
    )
    if int8.get("speedup_vs_pytorch_square") is not None:
        target["int8_speedup_vs_pytorch_square_input"] = int8["speedup_vs_pytorch_square"]
    notes = []
    if int8.get("speedup_vs_pytorch_square") is not None:
        notes.append(
            "Against PyTorch on the same square input the INT8 "
            f"path is {int8['speedup_vs_pytorch_square']:.2f}× (Ultralytics' default predict "
            "letterboxes 16:9 frames to a smaller rectangle than the static ONNX input)."
        )
    rect = next((r for r in results if r["name"] == "edge_onnx_int8_rect"), None)
    if rect is not None:
        rloss = -(rect.get("delta_map50_95_pts") or 0.0) if rect.get("map50_95") is not None else None
        target["int8_rect_speedup"] = rect["speedup_vs_pytorch"]
        target["int8_rect_map50_95_loss_pts"] = rloss
        rect_met = (False if rect["speedup_vs_pytorch"] < TARGET_SPEEDUP
                    else None if rloss is None else rloss <= TARGET_MAX_MAP_LOSS_PTS)
        target["int8_rect_met"] = rect_met
        rect_word = "not judged (mAP not measured)" if rect_met is None else (
            "met" if rect_met else "missed")
        notes.append(
            f"With a rectangular input ({rect['label'].rsplit(', ', 1)[-1]}: the shape "
            "Ultralytics' predict itself uses for these 16:9 frames, no padding rows) the INT8 "
            f"edge path is {rect['speedup_vs_pytorch']:.2f}× PyTorch"
            + (f" at {rloss:.2f} pt mAP50-95 loss" if rloss is not None else " (mAP not measured)")
            + f": target {rect_word} that way."
        )
    if met is False:
        notes.append(
            "Where the INT8 edge path's time goes (share of its per-frame stages): "
            + ", ".join(f"{k.removesuffix('_ms')} {v}%" for k, v in share.items())
        )
    if notes:
        target["detail"] = " ".join(notes)
    return target


# ---------------------------------------------------------------------------- main
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    out_dir: Path = args.out
    work = out_dir / "work"  # git-ignored: INT8 model, val runs, dataset view
    work.mkdir(parents=True, exist_ok=True)

    from roadloop.models.training import configure_ultralytics

    configure_ultralytics(work / "ultralytics")
    import torch
    import ultralytics
    from ultralytics import YOLO

    for p, what in (
        (args.model_pt, "PyTorch checkpoint"),
        (args.model_onnx, "ONNX model"),
        (args.data, "data YAML"),
    ):
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: {what} not found")

    int8_path, int8_note = resolve_int8(args, args.model_onnx, work)
    videos = sorted(Path(args.videos).glob("*.mp4")) if args.videos else []
    frames_meta = sample_video_frames(videos, args.frames)
    frames = [f for _, _, f in frames_meta]

    engines = [_pytorch_engine(YOLO, args.model_pt, args.imgsz)]
    engines[0].run(frames[0])  # Ultralytics sets torch's CPU threads on its first predict
    torch_threads = torch.get_num_threads()
    # Same CPU budget for both runtimes unless told otherwise (0: ONNX Runtime's default).
    ort_threads = torch_threads if args.threads is None else (args.threads or None)
    args.threads = ort_threads
    engines.append(
        _edge_engine(
            "edge_onnx_fp32", "edge core, ONNX fp32", args.model_onnx, args.imgsz, args.threads
        )
    )
    if int8_path is not None:
        engines.append(
            _edge_engine(
                "edge_onnx_int8", "edge core, ONNX INT8", int8_path, args.imgsz, args.threads
            )
        )
    rect_note = None
    hw = None if args.no_rect else rect_shape(frames, args.imgsz)
    if hw is not None:
        rect_fp32, rect_int8, rect_note = make_rect_models(args, YOLO, hw, work)
        label = f"{hw[0]}x{hw[1]} input"
        engines.append(_edge_engine("edge_onnx_fp32_rect", f"edge core, ONNX fp32, {label}",
                                    rect_fp32, args.imgsz, args.threads))
        if rect_int8 is not None:
            engines.append(_edge_engine("edge_onnx_int8_rect", f"edge core, ONNX INT8, {label}",
                                        rect_int8, args.imgsz, args.threads))
    if args.references:
        engines.append(_pytorch_square_engine(YOLO, args.model_pt, args.imgsz))
        engines.append(_ultralytics_onnx_engine(YOLO, args.model_onnx, args.imgsz))

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    time_engines(engines, frames, args.warmup)

    maps: dict[str, dict[str, float]] = {}
    if not args.no_map:
        view = dataset_view(args.data, args.split, work)
        for e in tqdm(engines, desc=f"Ultralytics val [{args.split}]", unit="model"):
            key = str(e.model_path)
            if key not in maps:
                shape = e.detector.input_hw if e.name.endswith("_rect") else args.imgsz  # type: ignore[attr-defined]
                try:
                    maps[key] = ultralytics_map(YOLO, e.model_path, view, args.split, shape, work)
                except Exception as exc:  # noqa: BLE001 - one row's mAP, not the benchmark
                    logger.warning("no mAP for %s: %s", e.label, exc)

    ref = engines[0]
    fp32 = next(e for e in engines if e.name == "edge_onnx_fp32")
    square = next((e for e in engines if e.name == "pytorch_square"), None)
    square_fps = 1000.0 / statistics.fmean(square.times_ms) if square is not None else None
    ref_fps = 1000.0 / statistics.fmean(ref.times_ms)
    ref_map = maps.get(str(ref.model_path), {})
    results = []
    for e in engines:
        mean_ms = statistics.fmean(e.times_ms)
        m = maps.get(str(e.model_path), {})
        row: dict[str, Any] = {
            "name": e.name,
            "label": e.label,
            "model": str(e.model_path),
            "model_sha256": file_sha256(e.model_path),
            "fps": 1000.0 / mean_ms,
            "latency_ms": _summary(e.times_ms),
            "stages_ms": {k: statistics.fmean(v) for k, v in e.stage_ms.items()},
            "speedup_vs_pytorch": (1000.0 / mean_ms) / ref_fps,
            "speedup_vs_pytorch_square": (
                (1000.0 / mean_ms) / square_fps if square_fps is not None else None
            ),
            "detections_per_frame": statistics.fmean(len(d) for d in e.detections),
            "agreement_f1_vs_pytorch": agreement_f1(ref.detections, e.detections),
            "agreement_f1_vs_edge_fp32": (
                agreement_f1(fp32.detections, e.detections) if e.name.startswith("edge") else None
            ),
            "map50": m.get("map50"),
            "map50_95": m.get("map50_95"),
            "delta_map50_95_pts": (100 * (m["map50_95"] - ref_map["map50_95"]))
            if m and ref_map
            else None,
            "delta_map50_pts": (100 * (m["map50"] - ref_map["map50"])) if m and ref_map else None,
        }
        if hasattr(e, "detector"):
            row["providers"] = e.detector.providers  # type: ignore[attr-defined]
            h, w = e.detector.input_hw  # type: ignore[attr-defined]
            batch = "dynamic" if e.detector.dynamic_batch else e.detector.batch_size  # type: ignore[attr-defined]
            row["input"] = f"{batch}x3x{h}x{w}"
        results.append(row)

    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_start": round(load_start, 2) if load_start is not None else None,
            "load_avg_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_threads": torch_threads,
            "ultralytics": ultralytics.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "ort_intra_op_threads": ort_threads or "default (one per core)",
        },
        "settings": {
            "imgsz": args.imgsz,
            "conf": CONF,
            "iou": IOU,
            "timed_frames": len(frames),
            "warmup": args.warmup,
            "videos": [v.name for v in videos],
            "frame_sizes": sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames}),
            "data": str(args.data),
            "split": args.split,
            "timing": (
                "batch 1, one frame per call, end to end from a decoded BGR frame in memory to boxes in frame "
                "pixels (video decode excluded for all engines); engines interleaved per frame in rotating order"
            ),
        },
        "int8": {"path": str(int8_path) if int8_path else None, "note": int8_note},
        "rect": {"input_hw": list(hw) if hw else None, "note": rect_note},
        "results": results,
    }
    report["target"] = _verdict(results)
    _atomic_write(out_dir / "inference.json", json.dumps(report, indent=2) + "\n")
    _atomic_write(out_dir / "inference.md", render_markdown(report))
    logger.info("wrote %s and %s", out_dir / "inference.json", out_dir / "inference.md")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = _default_paths()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model-pt", type=Path, default=d["pt"], help="Ultralytics checkpoint (.pt)")
    p.add_argument(
        "--model-onnx", type=Path, default=d["onnx"], help="the same model exported to ONNX fp32"
    )
    p.add_argument(
        "--model-int8",
        type=Path,
        default=None,
        help="INT8 ONNX model; default: made with roadloop.models.quantize from the data's train frames",
    )
    p.add_argument("--no-int8", action="store_true", help="leave the INT8 row out")
    p.add_argument(
        "--no-rect",
        action="store_true",
        help="leave out the rows with a rectangular (e.g. 192x320) export of the checkpoint",
    )
    p.add_argument("--data", type=Path, default=d["data"], help="labelled dataset YAML for mAP")
    p.add_argument("--split", default="test", help="split of --data that val scores")
    p.add_argument(
        "--videos",
        type=Path,
        default=d["videos"],
        help="folder of .mp4 files to take timed frames from",
    )
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--frames", type=int, default=100, help="timed frames (spread over the videos)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads; default: as many as Ultralytics gives torch "
        "(cpu_count - 1), so both runtimes get the same CPU budget; 0: ONNX Runtime's default",
    )
    p.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="leave out the reference rows (PyTorch on a square input, Ultralytics predict on the ONNX)",
    )
    p.add_argument("--no-map", action="store_true", help="skip Ultralytics val")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    report = run_benchmark(args)
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
