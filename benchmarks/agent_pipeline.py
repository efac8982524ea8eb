"""Agent pipeline benchmark: decode → infer → NMS → count → track → quality → sample, fps.

Three engines run the *same* agent pipeline on the same frames of the shared videos, with
the same model (atl_v2 YOLO11n), image size (320) and thresholds (conf 0.25, IoU 0.7):

* ``onnx_fp32``   — ``edge_agent.FramePipeline`` on the exported fp32 ONNX;
* ``onnx_int8``   — the same on a static INT8 model made here with
  ``roadloop.models.quantize.quantize_int8`` from atl_v2 *train* frames;
* ``ultralytics`` — Ultralytics' PyTorch ``predict`` on the ``.pt`` checkpoint, its boxes
  then counted/sampled by the agent's own code (platform-only: the agent never imports it).

Decoding is part of every timed frame (``cv2.VideoCapture.read``): each frame is decoded
once and handed to every engine in rotating order (so background load on a shared machine
hits them alike), its decode time counted for each. Per-stage times are means per frame;
fps = frames / summed per-frame wall time.

Every engine gets the same CPU budget, ``--threads N`` (default 1): each ONNX Runtime
session ``intra_op_num_threads=N`` (inter-op 1), torch ``torch.set_num_threads(N)`` — set
after Ultralytics' first ``predict``, which resets torch to ``cpu_count - 1`` threads on CPU,
and held before every frame (as ``benchmarks.agent_speed`` does). Both files record the
budget and the load average at start and end. Above one thread, prefer
``benchmarks.agent_speed``: frame-by-frame interleaving lets one engine's idle, spinning
thread pool take cores from the next (benchmarks/README.md).

    python -m benchmarks.agent_pipeline --frames 60 --threads 1 --out benchmarks/results

Writes ``<out>/agent_pipeline.json`` and ``<out>/agent_pipeline.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from edge_agent.agent import FramePipeline, frame_quality
from edge_agent.counting import DensityTracker, count_per_class
from edge_agent.fsutil import file_sha256
from edge_agent.inference import Detection, OnnxDetector
from edge_agent.samplers import FrameSampler, SamplerConfig
from edge_agent.sources import Frame
from edge_agent.traffic import TrafficConfig, parse_traffic_section
from edge_agent.traffic.stage import TrafficStage

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONF, IOU, IMGSZ = 0.25, 0.7, 320
TARGET_INT8_VS_PYTORCH = 3.0
# overhead_ms: engine time outside its own pre/inference/post timers (Ultralytics' predict
# machinery and Results objects; for ONNX the few Python calls between the stages).
STAGES = (
    "decode_ms",
    "preprocess_ms",
    "inference_ms",
    "postprocess_ms",
    "overhead_ms",
    "count_ms",
    "track_ms",
    "quality_ms",
    "sample_ms",
)


@functools.cache
def bench_geometry(width: int, height: int) -> TrafficConfig:
    """What a typical camera counts with: one line across the road at 60 % of the height, a
    zone over the lower half, a homography for speeds (the tracking + counting stage)."""
    w, h = width, height
    return parse_traffic_section({
        "frame_size": [w, h],
        "lines": [{"name": "across", "start": [0, 0.6 * h], "end": [w, 0.6 * h]}],
        "zones": [{"name": "near", "polygon": [[0, h / 2], [w, h / 2], [w, h], [0, h]]}],
        "homography": {"image_points": [[0.3 * w, 0.3 * h], [0.7 * w, 0.3 * h], [w, h], [0, h]],
                       "world_points": [[0, 60], [14, 60], [14, 0], [0, 0]]},
    })


@dataclass
class EngineRun:
    name: str
    model: str
    model_sha256: str
    frames: int = 0
    wall_s: float = 0.0
    stage_sums: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    frame_ms: list[float] = field(default_factory=list)
    detections: int = 0
    sampled: int = 0

    def add(self, stages: dict[str, float], n_dets: int, sampled: bool) -> None:
        total = sum(stages[s] for s in STAGES)
        self.frames += 1
        self.wall_s += total / 1e3
        self.frame_ms.append(total)
        self.detections += n_dets
        self.sampled += int(sampled)
        for s in STAGES:
            self.stage_sums[s] += stages[s]

    def summary(self) -> dict[str, Any]:
        n = max(self.frames, 1)
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "frames": self.frames,
            "fps": self.frames / self.wall_s if self.wall_s else None,
            "ms_per_frame_mean": self.wall_s * 1e3 / n,
            "ms_per_frame_p50": statistics.median(self.frame_ms) if self.frame_ms else None,
            "ms_per_frame_p95": float(np.percentile(self.frame_ms, 95)) if self.frame_ms else None,
            "stages_ms_mean": {s: v / n for s, v in self.stage_sums.items()},
            "detections_per_frame": self.detections / n,
            "sampled": self.sampled,
        }


class _PostStages:
    """count → density → quality → sample, as ``FramePipeline`` does after ``detect``."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        self.density = DensityTracker(30.0)
        self.sampler = FrameSampler(SamplerConfig(hourly_budget=None))
        self.traffic = TrafficStage("bench")

    def __call__(self, image: np.ndarray, dets: list[Detection], now: float) -> tuple[dict, bool]:
        t0 = time.perf_counter()
        count_per_class(dets, self.class_names)
        _, changed = self.density.update(len(dets))
        t_count = time.perf_counter()
        frame = Frame(image, int(now), now, "bench", now / 25.0)
        traffic = self.traffic.process(dets, frame, bench_geometry(image.shape[1], image.shape[0]),
                                       1, self.class_names, "bench")
        self.traffic.commit(traffic, frame, None)
        t1 = time.perf_counter()
        b, _ = frame_quality(image)
        edge = changed or b < 40 or b > 220
        t2 = time.perf_counter()
        decision = self.sampler.decide(dets, now=now, edge_case=edge)
        t3 = time.perf_counter()
        return {
            "count_ms": (t_count - t0) * 1e3,
            "track_ms": (t1 - t_count) * 1e3,
            "quality_ms": (t2 - t1) * 1e3,
            "sample_ms": (t3 - t2) * 1e3,
        }, decision.sampled


def _onnx_engine(path: Path, threads: int) -> tuple[Callable, list[str]]:
    det = OnnxDetector(
        path,
        conf_threshold=CONF,
        iou_threshold=IOU,
        intra_op_threads=threads,
        inter_op_threads=1,
        providers=["CPUExecutionProvider"],
    )
    size: list[tuple[int, int]] = [(0, 0)]
    pipe = FramePipeline(det, capacity=30.0, sampler_config=SamplerConfig(hourly_budget=None),
                         traffic=TrafficStage("bench"),
                         geometry=lambda: (bench_geometry(*size[0]), 1))

    def step(image: np.ndarray, i: int) -> tuple[dict, int, bool]:
        size[0] = (image.shape[1], image.shape[0])
        r = pipe.process(Frame(image, i, float(i), "bench", i / 25.0))
        t = r.timings_ms
        stages = {
            k: t[k]
            for k in (
                "preprocess_ms",
                "inference_ms",
                "postprocess_ms",
                "count_ms",
                "track_ms",
                "quality_ms",
                "sample_ms",
            )
        }
        stages["overhead_ms"] = max(
            t["detect_ms"] - t["preprocess_ms"] - t["inference_ms"] - t["postprocess_ms"], 0.0
        )
        return stages, len(r.detections), r.decision.sampled

    return step, det.class_names


def _ultralytics_engine(pt: Path, config_dir: Path, threads: int) -> tuple[Callable, list[str]]:
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    try:
        from roadloop.models.training import configure_ultralytics

        configure_ultralytics(config_dir)
    except ImportError:  # pragma: no cover - training module absent
        pass
    import torch
    from ultralytics import YOLO

    model = YOLO(str(pt))
    names = [model.names[i] for i in sorted(model.names)]
    post = _PostStages(names)
    # Ultralytics' select_device (first predict) resets torch to cpu_count - 1 threads: set
    # the budget after it (as benchmarks.agent_speed does); run() checks that it held.
    model.predict(np.zeros((720, 1280, 3), np.uint8), imgsz=IMGSZ, device="cpu", verbose=False)
    torch.set_num_threads(threads)

    def step(image: np.ndarray, i: int) -> tuple[dict, int, bool]:
        if torch.get_num_threads() != threads:  # global in torch: hold the budget
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        res = model.predict(image, imgsz=IMGSZ, conf=CONF, iou=IOU, device="cpu", verbose=False)[0]
        boxes = res.boxes
        xyxy = boxes.xyxy.numpy().tolist()
        dets = [
            Detection(int(c), float(s), *b, class_name=names[int(c)])
            for b, s, c in zip(xyxy, boxes.conf.numpy().tolist(), boxes.cls.numpy().tolist())
        ]
        wall = (time.perf_counter() - t0) * 1e3
        sp = res.speed
        stages = {
            "preprocess_ms": sp["preprocess"],
            "inference_ms": sp["inference"],
            "postprocess_ms": sp["postprocess"],
        }
        stages["overhead_ms"] = max(wall - sum(stages.values()), 0.0)
        more, sampled = post(image, dets, float(i))
        stages.update(more)
        return stages, len(dets), sampled

    return step, names


def _make_int8(fp32: Path, train_images: Path, out_dir: Path) -> tuple[Path | None, str]:
    try:
        from roadloop.models.quantize import list_images, quantize_int8
    except ImportError as exc:
        return None, f"roadloop.models.quantize not importable ({exc})"
    images = list_images(train_images) if train_images.is_dir() else []
    if not images:
        return None, f"no atl_v2 train frames at {train_images}"
    out = out_dir / "atl_v2_yolo11n_320_int8.onnx"
    t0 = time.perf_counter()
    info = quantize_int8(fp32, out, images, imgsz=IMGSZ)
    return out, (
        f"quantize_int8 (default QuantConfig) from {info.calibration_frames} atl_v2 train frames "
        f"in {time.perf_counter() - t0:.0f}s; {info.quantized_nodes} Q/DQ nodes, "
        f"{info.excluded_nodes} nodes kept in float"
    )


RECT_HW = (192, 320)
"""What Ultralytics' predict letterboxes 16:9 frames to at imgsz 320 (no padding rows)."""


def _make_rect(pt: Path, train_images: Path, out_dir: Path) -> tuple[Path | None, str]:
    """The same checkpoint exported at 192x320 and quantized at that shape."""
    try:
        from ultralytics import YOLO

        from roadloop.models.quantize import list_images, quantize_int8
    except ImportError as exc:
        return None, f"rectangular row left out ({exc})"
    local = out_dir / "rect.pt"
    shutil.copy(pt, local)  # the export lands beside its checkpoint
    fp32 = Path(YOLO(str(local)).export(format="onnx", imgsz=RECT_HW, simplify=True, verbose=False))
    out = out_dir / "rect_int8.onnx"
    info = quantize_int8(fp32, out, list_images(train_images), imgsz=RECT_HW)
    return out, (
        f"{RECT_HW[0]}x{RECT_HW[1]} export of {pt.name} by Ultralytics, quantize_int8 at that "
        f"shape ({info.calibration_frames} calibration frames)"
    )


def run(
    *,
    frames_per_video: int,
    out_dir: Path,
    shared: Path,
    threads: int = 1,
    warmup: int = 5,
) -> dict[str, Any]:
    """``threads``: the CPU budget of every engine (ORT intra-op threads, torch threads)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (the same budget for every engine), got {threads}")
    models = shared / "models"
    fp32, pt = models / "atl_v2_yolo11n_320.onnx", models / "atl_v2_yolo11n_320.pt"
    videos = sorted((shared / "videos").glob("*.mp4"))
    if not (fp32.is_file() and pt.is_file() and videos):
        raise SystemExit(f"shared models/videos missing under {shared}")
    load_start = os.getloadavg()  # other processes share these cores
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        tmp_dir = Path(tmp)
        int8, int8_note = _make_int8(
            fp32, shared / "datasets" / "atl_v2" / "images" / "train", tmp_dir
        )
        engines: dict[str, tuple[Callable, EngineRun]] = {}
        step, _ = _onnx_engine(fp32, threads)
        engines["onnx_fp32"] = (step, EngineRun("onnx_fp32", fp32.name, file_sha256(fp32)))
        if int8 is not None:
            step, _ = _onnx_engine(int8, threads)
            engines["onnx_int8"] = (step, EngineRun("onnx_int8", int8.name, file_sha256(int8)))
        rect, rect_note = _make_rect(pt, shared / "datasets" / "atl_v2" / "images" / "train", tmp_dir)
        if rect is not None:
            step, _ = _onnx_engine(rect, threads)
            engines["onnx_int8_rect"] = (
                step, EngineRun("onnx_int8_rect", rect.name, file_sha256(rect)))
        step, _ = _ultralytics_engine(pt, tmp_dir / "ultralytics", threads)
        engines["ultralytics"] = (step, EngineRun("ultralytics", pt.name, file_sha256(pt)))

        # warm-up on the first video's first frame (not timed)
        cap = cv2.VideoCapture(str(videos[0]))
        ok, first = cap.read()
        cap.release()
        for step, _ in engines.values():
            for i in range(warmup):
                step(first, i)

        names = list(engines)
        total = len(videos) * frames_per_video
        k = 0
        with tqdm(total=total, desc="agent pipeline", unit="frame") as bar:
            for video in videos:
                cap = cv2.VideoCapture(str(video))
                for i in range(frames_per_video):
                    t0 = time.perf_counter()
                    ok, image = cap.read()
                    decode_ms = (time.perf_counter() - t0) * 1e3
                    if not ok:
                        break
                    # every engine gets this frame, in rotating order, so background load
                    # on a shared machine hits them alike; the one decode counts for each
                    for name in names[k % len(names) :] + names[: k % len(names)]:
                        step, rec = engines[name]
                        stages, n, sampled = step(image, i)
                        stages["decode_ms"] = decode_ms
                        rec.add(stages, n, sampled)
                    k += 1
                    bar.update(1)
                cap.release()
        import torch

        torch_threads = torch.get_num_threads()
        if torch_threads != threads:  # Ultralytics reset the budget behind the step's back
            raise RuntimeError(f"torch ran with {torch_threads} threads, not {threads}")
    load_end = os.getloadavg()

    results = {name: rec.summary() for name, (_, rec) in engines.items()}
    fps = {k: v["fps"] for k, v in results.items()}
    ratios = {"onnx_fp32_vs_ultralytics": fps["onnx_fp32"] / fps["ultralytics"]}
    if "onnx_int8" in fps:
        ratios["onnx_int8_vs_ultralytics"] = fps["onnx_int8"] / fps["ultralytics"]
        ratios["onnx_int8_vs_onnx_fp32"] = fps["onnx_int8"] / fps["onnx_fp32"]
    if "onnx_int8_rect" in fps:
        ratios["onnx_int8_rect_vs_ultralytics"] = fps["onnx_int8_rect"] / fps["ultralytics"]
    report = {
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "opencv": cv2.__version__,
            "threads": threads,
            "ort_intra_op_threads": threads,
            "ort_inter_op_threads": 1,
            "torch_threads": torch_threads,
            "load_average_1m_start_end": [round(load_start[0], 2), round(load_end[0], 2)],
            "load_average_start_end": [list(load_start), list(load_end)],
        },
        "setup": {
            "imgsz": IMGSZ,
            "conf": CONF,
            "iou": IOU,
            "videos": [v.name for v in videos],
            "frames_per_video": frames_per_video,
            "warmup_frames": warmup,
            "int8": int8_note,
            "int8_rect": rect_note,
            "pipeline": "decode → letterbox → network → NMS → per-class count + density → "
            "brightness/sharpness → samplers (JPEG encode/upload excluded)",
        },
        "engines": results,
        "ratios": ratios,
        "target": {
            "int8_vs_pytorch": TARGET_INT8_VS_PYTORCH,
            "met": ratios.get("onnx_int8_vs_ultralytics", 0.0) >= TARGET_INT8_VS_PYTORCH,
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "agent_pipeline.json", json.dumps(report, indent=2))
    _atomic_write(out_dir / "agent_pipeline.md", _markdown(report))
    return report


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Agent pipeline benchmark",
        "",
        (
            f"{r['created_at']} — {r['machine']['cpu_count']} CPU cores ({r['machine']['platform']}), "
            f"onnxruntime {r['machine']['onnxruntime']}. {_budget(r['machine'])}"
        ),
        "",
        (
            f"Pipeline: {r['setup']['pipeline']}. imgsz {r['setup']['imgsz']}, conf "
            f"{r['setup']['conf']}, IoU {r['setup']['iou']}; {r['setup']['frames_per_video']} "
            f"frames from each of {', '.join(r['setup']['videos'])} per engine (engines interleaved "
            "frame by frame)."
        ),
        f"INT8 model: {r['setup']['int8']}.",
        *([f"onnx_int8_rect: {r['setup']['int8_rect']}."] if r["setup"].get("int8_rect") else []),
        (
            "Load average (1/5/15 min) at start "
            f"{_loads(r['machine'], 0)}, at end {_loads(r['machine'], 1)} (other work shares "
            "these cores: compare ratios, not absolute times)."
        ),
        "",
        "| engine | fps | ms/frame mean | p50 | p95 | "
        + " | ".join(s.replace("_ms", "") for s in STAGES)
        + " | boxes/frame |",
        "|---|---|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for name, e in r["engines"].items():
        st = e["stages_ms_mean"]
        lines.append(
            f"| {name} | {e['fps']:.1f} | {e['ms_per_frame_mean']:.1f} | {e['ms_per_frame_p50']:.1f} "
            f"| {e['ms_per_frame_p95']:.1f} | "
            + " | ".join(f"{st[s]:.2f}" for s in STAGES)
            + f" | {e['detections_per_frame']:.1f} |"
        )
    lines += [
        "",
        "Ratios (frames/s): " + ", ".join(f"{k} **{v:.2f}×**" for k, v in r["ratios"].items()),
        "",
    ]
    met = r["target"]["met"]
    lines.append(
        f"Target INT8 ≥ {r['target']['int8_vs_pytorch']:.0f}× PyTorch: **{'met' if met else 'missed'}**."
    )
    if "onnx_int8_rect_vs_ultralytics" in r["ratios"]:
        rr = r["ratios"]["onnx_int8_rect_vs_ultralytics"]
        lines.append(
            f"With the 192x320 INT8 model (the input shape Ultralytics' predict uses for these "
            f"16:9 frames): {rr:.2f}× PyTorch, "
            f"{'meeting' if rr >= TARGET_INT8_VS_PYTORCH else 'still short of'} the target."
        )
    if not met and "onnx_int8" in r["engines"]:
        e8, pt = r["engines"]["onnx_int8"], r["engines"]["ultralytics"]
        share = {s: v / e8["ms_per_frame_mean"] for s, v in e8["stages_ms_mean"].items()}
        top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
        rest = e8["ms_per_frame_mean"] - e8["stages_ms_mean"]["inference_ms"]
        need = pt["ms_per_frame_mean"] / TARGET_INT8_VS_PYTORCH - rest
        lines += [
            "",
            f"Without the network, the INT8 pipeline still spends {rest:.1f} ms per frame "
            f"(decode, letterbox, NMS, quality, sampling); reaching "
            f"{TARGET_INT8_VS_PYTORCH:.0f}× PyTorch's {pt['ms_per_frame_mean']:.1f} ms would need "
            f"the INT8 network at {need:.1f} ms"
            + (
                " — impossible on this machine."
                if need <= 0
                else f" (it takes {e8['stages_ms_mean']['inference_ms']:.1f} ms)."
            ),
        ]
        lines += [
            "",
            "Where the INT8 pipeline's time goes: "
            + ", ".join(f"{k} {v:.0%}" for k, v in top)
            + ". The gap is mostly the network itself: the INT8 run is "
            f"{e8['stages_ms_mean']['inference_ms']:.1f} ms vs PyTorch's "
            f"{pt['stages_ms_mean']['inference_ms']:.1f} ms "
            f"({pt['stages_ms_mean']['inference_ms'] / max(e8['stages_ms_mean']['inference_ms'], 1e-9):.2f}×, "
            "the head kept in float for accuracy); the fixed per-frame work (decode, letterbox, "
            "quality, NMS) does not shrink with quantization and caps the end-to-end ratio.",
        ]
    return "\n".join(lines) + "\n"


def _budget(machine: dict[str, Any]) -> str:
    """The engines' CPU budget; reports from before ``--threads`` gave ORT all cores."""
    if "threads" not in machine:
        return (f"ORT threads {machine['ort_intra_op_threads']}, torch threads "
                f"{machine['torch_threads']} (before --threads: not the same budget).")
    return (f"Same CPU budget for every engine (--threads {machine['threads']}): ORT intra-op "
            f"threads {machine['ort_intra_op_threads']} (inter-op "
            f"{machine['ort_inter_op_threads']}), torch threads {machine['torch_threads']}.")


def _loads(machine: dict[str, Any], i: int) -> str:
    """The start (0) or end (1) load average as written; older reports kept the 1-min only."""
    full = machine.get("load_average_start_end")
    if full:
        return " / ".join(f"{v:.2f}" for v in full[i])
    return f"{machine['load_average_1m_start_end'][i]:.2f} (1 min only)"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=60, help="frames per video per engine")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--shared", type=Path, default=None, help="default: settings.shared_dir")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU budget of every engine: ORT intra-op threads (inter-op 1) and torch threads",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1 (every engine gets the same budget)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shared = args.shared
    if shared is None:
        from roadloop.settings import get_settings

        shared = get_settings().shared_dir
    report = run(
        frames_per_video=args.frames, out_dir=args.out, shared=shared, threads=args.threads
    )
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
