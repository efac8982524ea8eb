"""The edge agent against Ultralytics' PyTorch predict at the *same* thread budget.

For each thread count ``n`` (a subprocess each, so ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
are set before torch loads): torch gets ``torch.set_num_threads(n)``, every ONNX Runtime
session ``intra_op_num_threads=n``. All engines use the gpu checkpoint
(``atl_v2_yolo11n_gpu.pt``) at imgsz 320, conf 0.25, IoU 0.7, and process *every* frame.

* serial rows: decode then infer on one thread; engines take turns in blocks of 25 frames
  (the same decoded frames, rotating order, so background load hits all alike), each frame's
  decode time counted for each; the ONNX rows are the agent's own
  ``FramePipeline`` (letterbox → network → NMS → count → track → quality → samplers), the
  PyTorch row is ``YOLO.predict`` followed by the same count/track/quality/sampler code;
* overlap rows (``n >= 2``): the agent's real loop, ``LatestFrameReader`` decoding on its
  own thread while the frame loop infers, against PyTorch given the same reader thread;
  engines alternate in blocks of frames, frames/s = frames / wall time. ``*_workers`` rows
  run the agent's ``--workers n`` (``FrameWorkers``: n frames measured at once, one intra-op
  thread each, finished in order), and ``pytorch_workers`` gives PyTorch the same scheme
  (n Ultralytics models, one torch thread each), so the engines' own ratio stays visible.

Levers measured as variants of the agent row: square vs 192×320 INT8 (exported and
quantized here with the platform's ``export_onnx``/``quantize_int8``), QOperator and
per-tensor quantization, ``session.intra_op.allow_spinning`` off, parallel execution mode.
Memory: resident set size of an agent-only process (no torch) with one model and while a
second is loaded for a swap (``ModelSlot.swap`` keeps the previous one loaded).
Accuracy: ``evaluate_onnx_at_shape`` on atl_v2 val.

    python -m benchmarks.agent_speed --frames 100 --out benchmarks/results

Writes ``<out>/agent_speed.json`` and ``<out>/agent_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from roadloop.fsutil import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
GPU_PT = "atl_v2_yolo11n_gpu.pt"
GPU_320 = "atl_v2_yolo11n_gpu_320.onnx"
RECT_HW = (192, 320)
TARGET = 3.0
BLOCK = 25  # frames an engine runs before the next takes over
OVERLAP_ENGINES = ("pytorch", "int8_rect", "int8_rect_nospin", "int8_square")
# Run again as the agent's ``--workers N`` (N = the thread budget) in the overlap table.
WORKER_VARIANTS = ("int8_rect", "int8_rect_per_tensor")
MAX_MAP_LOSS = 0.015

# name → (model key, session_config, parallel execution)
VARIANTS: dict[str, tuple[str, dict[str, str], bool]] = {
    "int8_square": ("int8_square", {}, False),
    "int8_rect": ("int8_rect", {}, False),
    "int8_rect_nospin": ("int8_rect", {"session.intra_op.allow_spinning": "0"}, False),
    "int8_rect_parallel": ("int8_rect", {}, True),
    "int8_rect_qoperator": ("int8_rect_qop", {}, False),
    "int8_rect_per_tensor": ("int8_rect_pt", {}, False),
    "fp32_rect": ("fp32_rect", {}, False),
}


def rss_kib() -> dict[str, int]:
    """VmRSS / VmHWM of this process in KiB (Linux ``/proc/self/status``)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# --------------------------------------------------------------------------- models
def make_models(shared: Path, work: Path) -> dict[str, Any]:
    """The ONNX files every run shares, made with the platform's own functions."""
    from roadloop.models.export import export_onnx
    from roadloop.models.quantize import QuantConfig, list_images, quantize_int8

    models = shared / "models"
    train = list_images(shared / "datasets" / "atl_v2" / "images" / "train")
    paths = {"fp32_square": models / GPU_320, "fp32_rect": work / "gpu_192x320.onnx"}
    notes = {}
    if not paths["fp32_rect"].is_file():
        export_onnx(models / GPU_PT, paths["fp32_rect"], imgsz=RECT_HW, dynamic_batch=False)
    for key, src, hw, cfg in (
        ("int8_square", paths["fp32_square"], 320, QuantConfig()),
        ("int8_rect", paths["fp32_rect"], RECT_HW, QuantConfig()),
        ("int8_rect_qop", paths["fp32_rect"], RECT_HW, QuantConfig(quant_format="QOperator")),
        ("int8_rect_pt", paths["fp32_rect"], RECT_HW, QuantConfig(per_channel=False)),
    ):
        out = work / f"{key}.onnx"
        if not out.is_file():
            t0 = time.perf_counter()
            info = quantize_int8(src, out, train, imgsz=hw, config=cfg)
            notes[key] = (f"{info.quantized_nodes} Q nodes, {info.excluded_nodes} kept in float, "
                          f"{info.calibration_frames} calibration frames, "
                          f"{time.perf_counter() - t0:.0f}s")
        paths[key] = out
    return {"paths": {k: str(v) for k, v in paths.items()}, "notes": notes}


def accuracy(paths: dict[str, str], shared: Path) -> dict[str, dict[str, float]]:
    from roadloop.evaluation.shape_accuracy import evaluate_onnx_at_shape

    data = shared / "datasets" / "atl_v2" / "data.yaml"
    out = {}
    for key, p in paths.items():
        m = evaluate_onnx_at_shape(Path(p), data, split="val", threads=1)
        out[key] = {"map50": m.map50, "map50_95": m.map50_95}
    return out


# --------------------------------------------------------------------------- engines
def _agent_engine(path: str, threads: int, config: dict[str, str], parallel: bool):
    import onnxruntime as ort

    from benchmarks.agent_pipeline import CONF, IOU, bench_geometry
    from edge_agent.agent import FramePipeline
    from edge_agent.inference import OnnxDetector
    from edge_agent.samplers import SamplerConfig
    from edge_agent.sources import Frame
    from edge_agent.traffic.stage import TrafficStage

    det = OnnxDetector(path, conf_threshold=CONF, iou_threshold=IOU, intra_op_threads=threads,
                       providers=["CPUExecutionProvider"], session_config=config)
    if parallel:  # the detector has no switch for it: same options, parallel mode
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        det.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    size = [(0, 0)]
    pipe = FramePipeline(det, capacity=30.0, sampler_config=SamplerConfig(hourly_budget=None),
                         traffic=TrafficStage("bench"),
                         geometry=lambda: (bench_geometry(*size[0]), 1))

    def step(image, i: int) -> dict[str, float]:
        size[0] = (image.shape[1], image.shape[0])
        r = pipe.process(Frame(image, i, float(i), "bench", i / 25.0))
        return dict(r.timings_ms)

    return step


def _torch_engine(threads: int, shared: Path, cfg_dir: Path):
    import torch

    from benchmarks.agent_pipeline import CONF, IMGSZ, IOU, _PostStages
    from edge_agent.inference import Detection

    os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    from roadloop.models.training import configure_ultralytics

    configure_ultralytics(cfg_dir)
    from ultralytics import YOLO

    model = YOLO(str(shared / "models" / GPU_PT))
    names = [model.names[i] for i in sorted(model.names)]
    post = _PostStages(names)
    import numpy as np

    # Ultralytics' select_device (first predict) resets torch to cpu_count - 1 threads: set
    # the budget after it; run_threads checks it held.
    model.predict(np.zeros((720, 1280, 3), np.uint8), imgsz=IMGSZ, device="cpu", verbose=False)
    torch.set_num_threads(threads)

    def step(image, i: int) -> dict[str, float]:
        if torch.get_num_threads() != threads:  # pytorch_workers' blocks set 1 (it is global)
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        res = model.predict(image, imgsz=IMGSZ, conf=CONF, iou=IOU, device="cpu",
                            verbose=False)[0]
        b = res.boxes
        dets = [Detection(int(c), float(s), *xy, class_name=names[int(c)])
                for xy, s, c in zip(b.xyxy.numpy().tolist(), b.conf.numpy().tolist(),
                                    b.cls.numpy().tolist())]
        t1 = time.perf_counter()
        more, _ = post(image, dets, float(i))
        return {"detect_ms": (t1 - t0) * 1e3, "inference_ms": res.speed["inference"], **more}

    return step


def _stats(ms: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(ms)
    return {"frames": len(a), "fps": 1e3 / a.mean(), "ms_mean": float(a.mean()),
            "ms_p50": float(np.median(a)), "ms_p95": float(np.percentile(a, 95))}


def _serial(engines: dict[str, Callable], videos: list[Path], frames: int,
            block: int = BLOCK) -> dict[str, Any]:
    """Decode then infer on one thread. A block of frames is decoded once (its per-frame
    decode time counted for every engine), then each engine runs the whole block, in
    rotating order: frame-by-frame interleaving would let one engine's idle thread pool
    (ORT's and OpenMP's spin-waiting workers) steal the cores from the next engine."""
    import cv2

    total = {k: [] for k in engines}
    stages: dict[str, dict[str, float]] = {k: {} for k in engines}
    names, b = list(engines), 0
    for video in videos:
        cap = cv2.VideoCapture(str(video))
        for start in range(0, frames, block):
            images, decode = [], []
            for _ in range(min(block, frames - start)):
                t0 = time.perf_counter()
                ok, image = cap.read()
                if not ok:
                    break
                decode.append((time.perf_counter() - t0) * 1e3)
                images.append(image)
            for name in names[b % len(names):] + names[: b % len(names)]:
                for i, (image, dec) in enumerate(zip(images, decode)):
                    t1 = time.perf_counter()
                    st = engines[name](image, start + i)
                    total[name].append(dec + (time.perf_counter() - t1) * 1e3)
                    st["decode_ms"] = dec
                    for s, v in st.items():
                        stages[name][s] = stages[name].get(s, 0.0) + v
            b += 1
        cap.release()
    out = {}
    for name in names:
        n = len(total[name])
        out[name] = {**_stats(total[name]),
                     "stages_ms_mean": {s: v / n for s, v in stages[name].items()}}
    return out


def _block_of(step: Callable) -> Callable:
    """A per-frame engine as a block runner: frames from the reader, one after the other."""

    def run_block(reader, n: int) -> int:
        done = 0
        for i in range(n):
            f = reader.get()
            if f is None:
                break
            step(f.image, i)
            done += 1
        return done

    return run_block


def _in_order_blocks(pool, finish: Callable[[Any, Any, int], None]) -> Callable:
    """A block runner keeping ``pool.workers`` frames in flight on ``pool``
    (``edge_agent.frame_workers.FrameWorkers``) and handing each to ``finish(frame,
    measurement, i)`` in frame order (``i``: its place in the block), as the agent's loop
    does with ``--workers``."""

    def finish_oldest(i: int) -> None:
        m = pool.pop()
        if m.error is not None:
            raise m.error
        finish(m.frame, m.measurement, i)

    def run_block(reader, n: int) -> int:
        done = 0
        for _ in range(n):
            f = reader.get()
            if f is None:
                break
            if pool.full:
                finish_oldest(done)
                done += 1
            pool.submit(f)
        while len(pool):
            finish_oldest(done)
            done += 1
        return done

    return run_block


def _agent_workers_engine(path: str, workers: int, config: dict[str, str]) -> Callable:
    """The agent's frame loop with ``--workers N``: ``FramePipeline.measure`` on N threads
    (ORT one intra-op thread each, one shared session), ``finish`` in frame order."""
    from benchmarks.agent_pipeline import CONF, IOU, bench_geometry
    from edge_agent.frame_workers import FrameWorkers
    from edge_agent.inference import OnnxDetector
    from edge_agent.pipeline import FramePipeline
    from edge_agent.samplers import SamplerConfig
    from edge_agent.traffic.stage import TrafficStage

    det = OnnxDetector(path, conf_threshold=CONF, iou_threshold=IOU, intra_op_threads=1,
                       providers=["CPUExecutionProvider"], session_config=config)
    size = [(0, 0)]
    pipe = FramePipeline(det, capacity=30.0, sampler_config=SamplerConfig(hourly_budget=None),
                         traffic=TrafficStage("bench"),
                         geometry=lambda: (bench_geometry(*size[0]), 1))
    def finish(frame, measurement, _: int) -> None:
        size[0] = (frame.image.shape[1], frame.image.shape[0])
        pipe.finish(frame, measurement)

    return _in_order_blocks(FrameWorkers(pipe.measure, workers), finish)


def _torch_workers_engine(workers: int, shared: Path, cfg_dir: Path) -> Callable:
    """PyTorch given the agent's scheme: ``workers`` Ultralytics models, each predicting on
    its own thread with one torch thread, the post stages in frame order."""
    import numpy as np
    import torch

    from benchmarks.agent_pipeline import CONF, IMGSZ, IOU, _PostStages
    from edge_agent.frame_workers import FrameWorkers
    from edge_agent.inference import Detection

    os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    from roadloop.models.training import configure_ultralytics

    configure_ultralytics(cfg_dir)
    from ultralytics import YOLO

    models = [YOLO(str(shared / "models" / GPU_PT)) for _ in range(workers)]
    for m in models:  # Ultralytics' first predict sets up the predictor (and torch's threads)
        m.predict(np.zeros((720, 1280, 3), np.uint8), imgsz=IMGSZ, device="cpu", verbose=False)
    names = [models[0].names[i] for i in sorted(models[0].names)]
    post = _PostStages(names)
    free = list(models)
    lock = threading.Lock()

    def predict(image):
        if torch.get_num_threads() != 1:  # global in torch: the other rows set theirs back
            torch.set_num_threads(1)
        with lock:
            model = free.pop()
        try:
            res = model.predict(image, imgsz=IMGSZ, conf=CONF, iou=IOU, device="cpu",
                                verbose=False)[0]
        finally:
            with lock:
                free.append(model)
        b = res.boxes
        return [Detection(int(c), float(s), *xy, class_name=names[int(c)])
                for xy, s, c in zip(b.xyxy.numpy().tolist(), b.conf.numpy().tolist(),
                                    b.cls.numpy().tolist())]

    def finish(frame, dets, i: int) -> None:
        post(frame.image, dets, float(i))

    return _in_order_blocks(FrameWorkers(lambda frame: predict(frame.image), workers), finish)


def _overlap(runners: dict[str, Callable], videos: list[Path], frames: int,
             block: int = BLOCK) -> dict[str, Any]:
    """The agent's reader thread (decode) beside the frame loop; engines alternate by block."""
    from edge_agent.sources import LatestFrameReader, VideoFileSource

    wall = {k: 0.0 for k in runners}
    count = {k: 0 for k in runners}
    for video in videos:
        for start in range(0, frames, block):
            for name, run_block in runners.items():
                reader = LatestFrameReader(VideoFileSource(video, realtime=False),
                                           drop_stale=False).start()
                # skip to this block without timing it
                for _ in range(start):
                    reader.get()
                t0 = time.perf_counter()
                count[name] += run_block(reader, min(block, frames - start))
                wall[name] += time.perf_counter() - t0
                reader.stop()
    return {k: {"frames": count[k], "fps": count[k] / wall[k] if wall[k] else None}
            for k in runners}


def run_threads(threads: int, frames: int, shared: Path, models: dict[str, str],
                variants: list[str], overlap: bool) -> dict[str, Any]:
    import cv2

    from edge_agent.sources import LatestFrameReader, VideoFileSource

    videos = sorted((shared / "videos").glob("*.mp4"))
    load0 = os.getloadavg()
    engines: dict[str, Callable] = {}
    with tempfile.TemporaryDirectory(prefix="agent-speed-") as tmp:
        engines["pytorch"] = _torch_engine(threads, shared, Path(tmp) / "ultralytics")
        for v in variants:
            key, config, parallel = VARIANTS[v]
            engines[v] = _agent_engine(models[key], threads, config, parallel)
        cap = cv2.VideoCapture(str(videos[0]))
        _, first = cap.read()
        cap.release()
        for step in engines.values():
            for i in range(5):
                step(first, i)
        serial = _serial(engines, videos, frames)
        import torch

        if torch.get_num_threads() != threads:  # Ultralytics did not reset the budget
            raise RuntimeError(f"torch ran with {torch.get_num_threads()} threads, not {threads}")
        ov = None
        if overlap:
            runners = {k: _block_of(engines[k]) for k in OVERLAP_ENGINES if k in engines}
            runners["pytorch_workers"] = _torch_workers_engine(
                threads, shared, Path(tmp) / "ultralytics-workers")
            for v in WORKER_VARIANTS:
                if v in variants:
                    key, config, _ = VARIANTS[v]
                    runners[f"{v}_workers"] = _agent_workers_engine(models[key], threads, config)
            for run_block in runners.values():  # warm-up, as the serial engines had
                reader = LatestFrameReader(VideoFileSource(videos[0], realtime=False),
                                           drop_stale=False).start()
                run_block(reader, 5)
                reader.stop()
            ov = _overlap(runners, videos, frames)
    return {
        "threads": threads,
        "torch_threads": threads,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "load_average_start_end": [list(load0), list(os.getloadavg())],
        "serial": serial,
        "overlap": ov,
        "ratio_vs_pytorch": {k: v["fps"] / serial["pytorch"]["fps"]
                             for k, v in serial.items() if k != "pytorch"},
        "overlap_ratio_vs_pytorch": (
            {k: v["fps"] / ov["pytorch"]["fps"] for k, v in ov.items()
             if not k.startswith("pytorch")} if ov else None),
        "overlap_ratio_vs_pytorch_workers": (
            {k: v["fps"] / ov["pytorch_workers"]["fps"] for k, v in ov.items()
             if not k.startswith("pytorch")} if ov else None),
    }


def run_memory(model: str, second: str, threads: int, shared: Path) -> dict[str, Any]:
    """RSS of an agent-only process: model loaded and run, then a second loaded beside it
    and swapped in (the previous stays loaded, as ``ModelUpdater`` keeps it)."""
    import cv2

    from edge_agent.agent import FramePipeline
    from edge_agent.inference import OnnxDetector
    from edge_agent.model_slot import LoadedModel, ModelSlot

    base = rss_kib()
    video = min((shared / "videos").glob("*.mp4"))
    cap = cv2.VideoCapture(str(video))
    frames = [cap.read()[1] for _ in range(20)]
    cap.release()
    from edge_agent.sources import Frame

    det = OnnxDetector(model, intra_op_threads=threads, providers=["CPUExecutionProvider"])
    slot = ModelSlot(det)
    pipe = FramePipeline(slot)
    for i, f in enumerate(frames):
        pipe.process(Frame(f, i, float(i), "m", i / 25.0))
    one = rss_kib()
    det2 = OnnxDetector(second, intra_op_threads=threads, providers=["CPUExecutionProvider"])
    det2.detect(frames[0])  # the updater's smoke inference
    previous = slot.swap(LoadedModel.from_detector(det2))  # kept loaded, as the updater does
    for i, f in enumerate(frames):
        pipe.process(Frame(f, i, float(i), "m", i / 25.0))
    two = rss_kib()
    assert previous.detector is det
    return {"model": Path(model).name, "second": Path(second).name,
            "rss_mib_before_model": base["VmRSS"] / 1024,
            "rss_mib_one_model": one["VmRSS"] / 1024,
            "rss_mib_after_swap_two_loaded": two["VmRSS"] / 1024,
            "peak_rss_mib": two["VmHWM"] / 1024}


def run_torch_memory(threads: int, shared: Path) -> dict[str, Any]:
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        step = _torch_engine(threads, shared, Path(tmp))
        cap = cv2.VideoCapture(str(min((shared / "videos").glob("*.mp4"))))
        for i in range(20):
            step(cap.read()[1], i)
        cap.release()
    m = rss_kib()
    return {"rss_mib_one_model": m["VmRSS"] / 1024, "peak_rss_mib": m["VmHWM"] / 1024}


# --------------------------------------------------------------------------- driver
def _child(args: list[str], threads: int, out: Path, reuse: bool) -> dict[str, Any]:
    """One measurement in a fresh process (thread env set before torch loads); its result is
    kept at ``out`` so ``--reuse`` can pick up after an interrupted run."""
    if not (reuse and out.is_file()):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-m", "benchmarks.agent_speed", "--child-out", str(out),
                        *args], env=env, check=True, cwd=REPO)
    return json.loads(out.read_text())


def run(*, frames: int, threads: list[int], shared: Path, out_dir: Path, work: Path,
        variants: list[str], reuse: bool = False) -> dict[str, Any]:
    import onnxruntime as ort

    work.mkdir(parents=True, exist_ok=True)
    models = make_models(shared, work)
    paths = models["paths"]
    common = ["--shared", str(shared), "--models-json", json.dumps(paths)]
    per_threads = {
        str(n): _child([*common, "--child", "speed", "--frames", str(frames), "--threads", str(n),
                        "--variants", ",".join(variants)], n, work / f"speed-{n}.json", reuse)
        for n in threads
    }
    mem_threads = max(threads)
    memory = {
        "agent": _child([*common, "--child", "memory", "--threads", str(mem_threads)],
                        mem_threads, work / "memory-agent.json", reuse),
        "pytorch": _child([*common, "--child", "torch_memory", "--threads", str(mem_threads)],
                          mem_threads, work / "memory-pytorch.json", reuse),
    }
    acc = accuracy({k: v for k, v in paths.items()}, shared)
    report = {
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "onnxruntime": ort.__version__},
        "setup": {"checkpoint": GPU_PT, "imgsz": 320, "rect_hw": list(RECT_HW),
                  "frames_per_video": frames, "models": paths, "quantize": models["notes"]},
        "threads": per_threads,
        "memory": memory,
        "accuracy_val": acc,
        "target": {"ratio": TARGET, "max_map50_95_loss": MAX_MAP_LOSS},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "agent_speed.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / "agent_speed.md", markdown(report))
    return report


def _verdict(t: dict[str, Any], acc: dict[str, dict[str, float]]) -> list[str]:
    """Best agent row against the target, and where its time goes."""
    ratios = t["ratio_vs_pytorch"]
    best = max((k for k in ratios if k.startswith("int8")), key=ratios.get)
    key = VARIANTS[best][0]
    ref = "fp32_square" if key == "int8_square" else "fp32_rect"
    loss = (acc[ref]["map50_95"] - acc[key]["map50_95"]) * 100 if key in acc else None
    st = t["serial"][best]["stages_ms_mean"]
    parts = {
        "decode": st.get("decode_ms", 0.0),
        "letterbox": st.get("preprocess_ms", 0.0),
        "network": st.get("inference_ms", 0.0),
        "NMS": st.get("postprocess_ms", 0.0),
        "count+track": st.get("count_ms", 0.0) + st.get("track_ms", 0.0),
        "quality": st.get("quality_ms", 0.0),
        "samplers": st.get("sample_ms", 0.0),
    }
    total = t["serial"][best]["ms_mean"]
    pt = t["serial"]["pytorch"]["ms_mean"]
    fixed = total - parts["network"]
    out = [
        f"Best agent row, serial: **{best} {ratios[best]:.2f}× PyTorch** "
        f"(target {TARGET:.0f}×: {'met' if ratios[best] >= TARGET else 'missed'}; "
        + (f"{loss:.2f} pt mAP50-95 below its fp32 export" if loss is not None else "")
        + "). Where its "
        f"{total:.1f} ms go: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        + f" ms. At {TARGET:.0f}× PyTorch's {pt:.1f} ms the whole frame would have "
        f"{pt / TARGET:.1f} ms; the work besides the network alone takes {fixed:.1f} ms.",
    ]
    if t.get("overlap_ratio_vs_pytorch"):
        orr = t["overlap_ratio_vs_pytorch"]
        ob = max(orr, key=orr.get)
        rw = t.get("overlap_ratio_vs_pytorch_workers") or {}
        out.append(f"Best overlapped: **{ob} {orr[ob]:.2f}×** PyTorch with the same reader "
                   f"thread (target {TARGET:.0f}×: "
                   f"{'met' if orr[ob] >= TARGET else 'missed'})"
                   + (f"; {rw[ob]:.2f}× PyTorch given the same workers" if ob in rw else "")
                   + ".")
    return out


def markdown(r: dict[str, Any]) -> str:
    acc = r["accuracy_val"]
    fp32 = {"int8_square": "fp32_square"}
    model_of = {v: key for v, (key, _, _) in VARIANTS.items()}
    lines = [
        "# Edge agent vs PyTorch at the same thread budget",
        "",
        (f"{r['created_at']}: {r['machine']['cpu_count']} CPU cores ({r['machine']['platform']}),"
        f" onnxruntime {r['machine']['onnxruntime']}; checkpoint {r['setup']['checkpoint']},"
        f" imgsz 320, {r['setup']['frames_per_video']} frames from each shared video per engine,"
        " every frame processed. Regenerate: `python -m benchmarks.agent_speed`."),
        "",
    ]
    for n, t in r["threads"].items():
        la = t["load_average_start_end"]
        lines += [
            (f"## {n} thread(s): torch.set_num_threads({t['torch_threads']}) + OMP/MKL={n}, "
            f"ORT intra_op_num_threads={n}"),
            "",
            (f"Load average (1/5/15 min) at start {[round(x, 2) for x in la[0]]}, end "
            f"{[round(x, 2) for x in la[1]]}: other work shared these cores; engines "
            "alternating in blocks of 25 frames, compare ratios."),
            "",
            ("| engine | fps | ms/frame | p50 | p95 | network | × PyTorch | val mAP50-95 "
            "| Δ vs fp32 |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, e in t["serial"].items():
            key = model_of.get(name)
            a = acc.get(key, {}).get("map50_95") if key else None
            ref = acc.get(fp32.get(key, "fp32_rect"), {}).get("map50_95") if key else None
            ratio = t["ratio_vs_pytorch"].get(name)
            lines.append(
                f"| {name} | {e['fps']:.1f} | {e['ms_mean']:.1f} | {e['ms_p50']:.1f} | "
                f"{e['ms_p95']:.1f} | {e['stages_ms_mean'].get('inference_ms', 0):.1f} | "
                + (f"**{ratio:.2f}×**" if ratio else "1") + " | "
                + (f"{a:.4f}" if a is not None else "") + " | "
                + (f"{(a - ref) * 100:+.2f} pt" if a is not None and ref is not None else "")
                + " |")
        if t.get("overlap"):
            ov, rr = t["overlap"], t["overlap_ratio_vs_pytorch"]
            rw = t.get("overlap_ratio_vs_pytorch_workers") or {}
            lines += ["", ("Decode overlapped with inference (the agent's `LatestFrameReader` "
                      "thread; PyTorch given the same reader thread), engines alternating in "
                      f"blocks of 25 frames. `*_workers` rows keep {n} frames in flight on {n} "
                      "threads with one intra-op thread each and finish them in frame order: "
                      f"the agent's `--workers {n}` (`FramePipeline.measure` on the workers), "
                      f"and PyTorch given the same scheme ({n} Ultralytics models, one torch "
                      "thread each):"), "",
                      ("| engine | fps | × PyTorch (overlapped) | × PyTorch with workers "
                       "| × PyTorch (serial) |"),
                      "|---|---|---|---|---|"]
            for k, v in ov.items():
                s = v["fps"] / t["serial"]["pytorch"]["fps"]
                lines.append(f"| {k} | {v['fps']:.1f} | "
                             + (f"**{rr[k]:.2f}×**" if k in rr else "1") + " | "
                             + (f"{rw[k]:.2f}×" if k in rw else "") + f" | {s:.2f}× |")
        lines += ["", *_verdict(t, acc), ""]
    m = r["memory"]
    a = m["agent"]
    lines += [
        "## Memory (resident set size)",
        "",
        (f"Agent-only process (edge_agent + onnxruntime, no torch), {a['model']}: "
        f"{a['rss_mib_before_model']:.0f} MiB before loading, "
        f"**{a['rss_mib_one_model']:.0f} MiB** with the model serving, "
        f"**{a['rss_mib_after_swap_two_loaded']:.0f} MiB** after a swap to {a['second']} "
        f"with the previous one kept loaded (peak {a['peak_rss_mib']:.0f} MiB). "
        f"Ultralytics PyTorch process with the .pt loaded and predicting: "
        f"{m['pytorch']['rss_mib_one_model']:.0f} MiB (peak {m['pytorch']['peak_rss_mib']:.0f})."),
        "",
        "## Accuracy (atl_v2 val, `evaluate_onnx_at_shape`)",
        "",
        "| model | mAP50 | mAP50-95 |",
        "|---|---|---|",
        *[f"| {k} | {v['map50']:.4f} | {v['map50_95']:.4f} |" for k, v in acc.items()],
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=100, help="frames per video per engine")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "agent-speed")
    p.add_argument("--shared", type=Path, default=None)
    p.add_argument("--child", choices=("speed", "memory", "torch_memory"), default=None)
    p.add_argument("--child-out", type=Path, default=None)
    p.add_argument("--models-json", default=None)
    p.add_argument("--reuse", action="store_true",
                   help="keep the per-child results already in --work (resume a run)")
    a = p.parse_args(argv)
    shared = a.shared
    if shared is None:
        from roadloop.settings import get_settings

        shared = get_settings().shared_dir
    threads = [int(x) for x in a.threads.split(",")]
    variants = [v for v in a.variants.split(",") if v]
    if a.child:
        models = json.loads(a.models_json)
        if a.child == "speed":
            res = run_threads(threads[0], a.frames, shared, models, variants,
                              overlap=threads[0] >= 2)
        elif a.child == "memory":
            res = run_memory(models["int8_rect"], models["int8_square"], threads[0], shared)
        else:
            res = run_torch_memory(threads[0], shared)
        a.child_out.write_text(json.dumps(res))
        return 0
    report = run(frames=a.frames, threads=threads, shared=shared, out_dir=a.out, work=a.work,
                 variants=variants, reuse=a.reuse)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
