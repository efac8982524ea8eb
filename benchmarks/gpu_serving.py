"""GPU serving benchmark: the network alone vs the serving path end to end, vs the edge core
and Ultralytics' PyTorch predict, on one device.

For each precision (fp32/fp16) and batch size it measures, on the same decoded frames:

- ``network``: the detector alone on ONNX Runtime, input already on the device (IO binding,
  a letterboxed blob), output left there: the ceiling end to end is compared with.
- ``serving_direct``: ``ServingSession.run`` on one batch: the frames are copied into the
  page-locked staging buffer, copied to the device, letterboxed + detected + NMS-ed there,
  and turned into ``Detection`` objects.
- ``serving_batched``: the serving path as a server runs it: ``FrameBatcher`` fed by camera
  threads (each copies its own frames into the staging buffer), two sessions on CUDA so a
  batch's copy overlaps another's compute; per-frame latency from ``submit`` to result.
- ``edge_core``: ``edge_agent.OnnxDetector.detect_batch`` on the same execution provider
  (letterbox and NMS on the CPU): the edge core on CUDA, as it is today.
- ``ultralytics``: ``YOLO(pt).predict`` on a list of ``batch`` frames, same device and
  precision (``quantize="fp16"`` for fp16).

"End to end" starts from decoded BGR frames in host memory (what a camera's decoder hands
over) and ends with per-frame detections in Python. Video/JPEG decoding is excluded from
every engine alike and reported on its own (``decode`` in the JSON: ``cv2.imdecode`` of the
same frames as JPEG, one thread). Frames/s counts frames (batch × batches); P95 is per
batch for the synchronous engines and per frame for ``serving_batched``.

The host side gets the same CPU budget in every engine, ``--threads N`` (default
``DEFAULT_THREADS``): every ONNX Runtime session ``intra_op_num_threads=N`` (inter-op 1 for
the network and edge-core sessions; the serving sessions run sequentially, so no inter-op
pool), torch ``torch.set_num_threads(N)`` for Ultralytics (set after its first ``predict``,
whose device selection resets torch's threads on CPU, and held before every call). Both files
record the budget and the load average at the start and the end.

    python -m benchmarks.gpu_serving --onnx M.onnx --pt M.pt --video V.mp4   # on a GPU box
    python -m benchmarks.gpu_serving --smoke                                # CPU smoke test

Writes ``<out>/<name>.json`` and ``.md``; the name is ``gpu_serving`` on CUDA and
``gpu_serving_smoke_cpu`` on CPU, so a CPU run never overwrites GPU figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from roadloop.serving.batched import (
    FrameBatcher,
    ServingSession,
    select_providers,
)
from roadloop.serving.graph import (
    FRAMES_INPUT,
    MAX_CANDIDATES,
    RESIZE_MODES,
    build_serving_graph,
    to_fp16,
)
from roadloop.serving.nms import NMS_CHUNK

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONF, IOU = 0.25, 0.7
TARGET_RATIO = 0.70  # end to end / network alone
# Host CPU threads of every engine: what Ultralytics itself gives torch on CPU (cpu_count - 1,
# at most 8), given to ONNX Runtime too, so no engine has more of the CPU than another.
DEFAULT_THREADS = max(1, min(8, (os.cpu_count() or 2) - 1))
ENGINES = (
    "network",
    "serving_graph",
    "serving_direct",
    "serving_batched",
    "edge_core",
    "ultralytics",
)


# ---------------------------------------------------------------------------- helpers
def load_frames(video: Path, n: int) -> list[np.ndarray]:
    """``n`` frames spread over ``video``, decoded into memory before any timing."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {video}")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or n
    wanted = set(np.linspace(0, max(int(total * 0.95) - 1, 0), n).round().astype(int).tolist())
    frames, index = [], 0
    while len(frames) < len(wanted):
        ok, frame = cap.read()
        if not ok:
            break
        if index in wanted:
            frames.append(frame)
        index += 1
    cap.release()
    if not frames:
        raise ValueError(f"{video}: no frames decoded")
    return frames


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


def timed(fn, *, seconds: float, warmup_s: float, min_iters: int = 3) -> list[float]:
    """Call ``fn`` for ``warmup_s`` untimed, then for ``seconds``; the calls' durations."""
    end = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < end:
        fn()
    out: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(out) < min_iters:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _row(engine: str, precision: str, batch: int, lat: list[float], **extra) -> dict[str, Any]:
    total = sum(lat)
    return {
        "engine": engine,
        "precision": precision,
        "batch": batch,
        "frames_per_s": batch * len(lat) / total if total else float("nan"),
        "p50_ms": _pct(lat, 50),
        "p95_ms": _pct(lat, 95),
        "latency_per": "batch",
        "iterations": len(lat),
        **extra,
    }


def decode_cost(frames: list[np.ndarray], seconds: float) -> dict[str, Any]:
    """JPEG decode of these frames on one thread (excluded from every engine's timing)."""
    cv2.setNumThreads(1)
    blobs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1] for f in frames[:8]]
    i = [0]

    def one() -> None:
        cv2.imdecode(blobs[i[0] % len(blobs)], cv2.IMREAD_COLOR)
        i[0] += 1

    lat = timed(one, seconds=seconds, warmup_s=0.1)
    cv2.setNumThreads(-1)
    ms = float(np.mean(lat) * 1e3)
    return {
        "jpeg_quality": 90,
        "frame_hw": list(frames[0].shape[:2]),
        "ms_per_frame": ms,
        "frames_per_s_one_thread": 1e3 / ms,
    }


def _batch(frames: list[np.ndarray], b: int, offset: int) -> list[np.ndarray]:
    return [frames[(offset + j) % len(frames)] for j in range(b)]


# ---------------------------------------------------------------------------- engines
# Each engine's sessions are made once per precision and reused across batch sizes.
def network_session(path: Path, device: str, threads: int) -> ort.InferenceSession:
    choice = select_providers(device, "fp32")  # the fp16 file keeps fp32 I/O
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=choice.providers)


def _time_session(
    sess: ort.InferenceSession, device: str, name: str, array: np.ndarray, a
) -> list[float]:
    """Run ``sess`` on ``array`` repeatedly; on CUDA input and outputs stay on the device."""
    if device == "cuda":
        io = sess.io_binding()
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for out in sess.get_outputs():
            io.bind_output(out.name, "cuda")
        return timed(lambda: sess.run_with_iobinding(io), seconds=a.seconds, warmup_s=a.warmup)
    return timed(lambda: sess.run(None, {name: array}), seconds=a.seconds, warmup_s=a.warmup)


def bench_network(sess: ort.InferenceSession, device: str, b: int, hw, a) -> list[float]:
    blob = np.random.default_rng(0).random((b, 3, *hw), dtype=np.float32)
    return _time_session(sess, device, sess.get_inputs()[0].name, blob, a)


def bench_serving_graph(session: ServingSession, device: str, b: int, frames, a) -> list[float]:
    """The serving graph alone, frames already on the device: its own cost (letterbox, network,
    NMS), without the host copy, the transfers or the ``Detection`` objects."""
    return _time_session(session.session, device, FRAMES_INPUT, np.stack(_batch(frames, b, 0)), a)


def bench_serving_direct(session: ServingSession, b: int, frames, a) -> list[float]:
    staging = session.staging_buffer(b)
    k = [0]

    def one() -> None:
        for j, f in enumerate(_batch(frames, b, k[0])):
            np.copyto(staging[j], f)
        k[0] += b
        session.detections(session.run(staging), b)

    return timed(one, seconds=a.seconds, warmup_s=a.warmup)


def bench_serving_batched(sessions: list[ServingSession], b: int, frames, a) -> dict[str, Any]:
    cameras = max(2, min(a.cameras, 2 * b))
    depth = max(2, (2 * b * len(sessions)) // cameras + 1)  # frames in flight per camera
    done: list[tuple[float, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def camera(cam: int) -> None:
        pending: deque = deque()
        i = cam
        while not stop.is_set():
            t0 = time.perf_counter()
            fut = batcher.submit(f"cam{cam}", frames[i % len(frames)])
            i += cameras

            def _done(_f, t0=t0) -> None:
                t1 = time.perf_counter()
                with lock:
                    done.append((t0, t1))

            fut.add_done_callback(_done)
            pending.append(fut)
            while len(pending) >= depth:
                pending.popleft().result()
        for fut in pending:
            fut.result()

    with FrameBatcher(sessions, max_batch=b, max_wait_s=a.max_wait_ms / 1e3) as batcher:
        threads = [threading.Thread(target=camera, args=(c,), daemon=True) for c in range(cameras)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(a.warmup + a.seconds)
        stop.set()
        for t in threads:
            t.join()
        batches, frames_run = batcher.batches_run, batcher.frames_run
    w0, w1 = start + a.warmup, start + a.warmup + a.seconds
    lat = [t1 - t0 for t0, t1 in done if w0 <= t1 <= w1]  # frames completed in the window
    return {
        "engine": "serving_batched",
        "batch": b,
        "frames_per_s": len(lat) / a.seconds,
        "p50_ms": _pct(lat, 50),
        "p95_ms": _pct(lat, 95),
        "latency_per": "frame",
        "iterations": len(lat),
        "cameras": cameras,
        "sessions": len(sessions),
        "mean_batch": frames_run / max(batches, 1),
        "max_wait_ms": a.max_wait_ms,
        "batch_sizes_run": {str(k): v for k, v in sorted(batcher.batch_sizes_run.items())},
    }


def edge_detector(path: Path, device: str, max_batch: int, threads: int):
    from edge_agent.inference import OnnxDetector

    choice = select_providers(device, "fp32")
    providers = [p if isinstance(p, str) else p[0] for p in choice.providers]
    return OnnxDetector(
        path, conf_threshold=CONF, iou_threshold=IOU, providers=providers, max_batch_size=max_batch,
        intra_op_threads=threads, inter_op_threads=1,
    )


def bench_edge_core(det, b: int, frames, a) -> list[float]:
    k = [0]

    def one() -> None:
        det.detect_batch(_batch(frames, b, k[0]))
        k[0] += b

    return timed(one, seconds=a.seconds, warmup_s=a.warmup)


def pin_torch_threads(threads: int) -> int:
    """Give torch ``threads`` CPU threads (Ultralytics' host side); the count it then has."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def bench_ultralytics(model, imgsz: int, device: str, precision: str, b: int, frames, a):
    dev = 0 if device == "cuda" else "cpu"
    k = [0]
    # The first predict sets up the predictor, whose select_device resets torch's threads on
    # CPU: one untimed call first, then the budget, held before every call (torch's is global).
    model.predict(_batch(frames, b, 0), imgsz=imgsz, conf=CONF, iou=IOU, quantize=precision,
                  device=dev, verbose=False)
    pin_torch_threads(a.threads)

    def one() -> None:
        pin_torch_threads(a.threads)
        model.predict(
            _batch(frames, b, k[0]),
            imgsz=imgsz,
            conf=CONF,
            iou=IOU,
            quantize=precision,
            device=dev,
            verbose=False,
        )
        k[0] += b

    return timed(one, seconds=a.seconds, warmup_s=a.warmup)


# ---------------------------------------------------------------------------- run
def summarize(rows: list[dict[str, Any]], precisions, batches) -> list[dict[str, Any]]:
    out = []
    for precision in precisions:
        for b in batches:
            got = {r["engine"]: r for r in rows if r["precision"] == precision and r["batch"] == b}
            if not got:
                continue
            fps = {k: v["frames_per_s"] for k, v in got.items()}
            net = fps.get("network")

            def over(engine: str, base: float | None, fps=fps) -> float | None:
                return fps[engine] / base if base and engine in fps else None

            ratios = [r for r in (over("serving_batched", net), over("serving_direct", net)) if r]
            best = max(ratios, default=None)
            out.append(
                {
                    "precision": precision,
                    "batch": b,
                    "network_fps": net,
                    "serving_graph_fps": fps.get("serving_graph"),
                    "serving_direct_fps": fps.get("serving_direct"),
                    "serving_batched_fps": fps.get("serving_batched"),
                    "edge_core_fps": fps.get("edge_core"),
                    "ultralytics_fps": fps.get("ultralytics"),
                    "serving_graph_over_network": over("serving_graph", net),
                    "serving_direct_over_network": over("serving_direct", net),
                    "serving_batched_over_network": over("serving_batched", net),
                    "edge_core_over_network": over("edge_core", net),
                    "best_serving_over_network": best,
                    "meets_target": bool(best is not None and best >= TARGET_RATIO),
                    "serving_batched_over_ultralytics": over(
                        "serving_batched", fps.get("ultralytics")
                    ),
                }
            )
    return out


def run(a: argparse.Namespace, on_update=None) -> dict[str, Any]:
    """Every row; ``on_update(report)`` after each one, so a run cut short keeps its rows."""
    choice = select_providers(a.device, "fp32")
    device = choice.device
    precisions = [p for p in a.precisions.split(",") if p]
    if device == "cpu" and "fp16" in precisions:
        logger.warning("fp16 needs CUDA: dropping it on CPU (%s)", choice.reason)
        precisions = [p for p in precisions if p != "fp16"]
    batches = [int(v) for v in a.batches.split(",") if v]
    frames = load_frames(a.video, a.frames)
    frame_hw = frames[0].shape[:2]
    frames = [f for f in frames if f.shape[:2] == frame_hw]
    engines = [e for e in ENGINES if e in set(a.engines.split(","))]
    if a.pt is None and "ultralytics" in engines:
        engines.remove("ultralytics")
    work = Path(tempfile.mkdtemp(prefix="gpu_serving_"))
    load_start = list(os.getloadavg())
    import onnx

    det_model = onnx.load(str(a.onnx))
    dims = [d.dim_value for d in det_model.graph.input[0].type.tensor_type.shape.dim]
    static_batch = dims[0] if dims[0] > 0 else None
    input_hw = (dims[2], dims[3])
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    report: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "provider_reason": choice.reason,
        "machine": _machine(device),
        "settings": {
            "onnx": str(a.onnx),
            "pt": str(a.pt) if a.pt else None,
            "video": str(a.video),
            "frames_in_memory": len(frames),
            "frame_hw": list(frame_hw),
            "input_hw": list(input_hw),
            "precisions": precisions,
            "batches": batches,
            "engines": engines,
            "seconds": a.seconds,
            "warmup_s": a.warmup,
            "conf": CONF,
            "iou": IOU,
            "cameras": a.cameras,
            "sessions": a.sessions if device == "cuda" else 1,
            "max_wait_ms": a.max_wait_ms,
            "resize": a.resize,
            "max_candidates": a.max_candidates,
            "nms_chunk": a.nms_chunk,
            "threads": a.threads,
            "ort_intra_op_threads": a.threads,
            "ort_inter_op_threads": 1,
            "torch_threads": a.threads if "ultralytics" in engines else None,
        },
        # [start, latest]: the end is updated after every row, so a run cut short has one too
        "load_average_start_end": [load_start, load_start],
        "decode": decode_cost(frames, min(a.seconds, 1.0)),
        "results": rows,
        "summary": [],
        "target_ratio": TARGET_RATIO,
        "errors": errors,
        "complete": False,
    }

    for precision in precisions:
        detector = Path(a.onnx)
        if precision == "fp16":
            detector = work / "detector_fp16.onnx"
            onnx.save(to_fp16(onnx.load(str(a.onnx))), str(detector))
        graph = build_serving_graph(
            a.onnx,
            work / f"serving_{precision}.onnx",
            frame_hw=frame_hw,
            conf_threshold=CONF,
            iou_threshold=IOU,
            precision=precision,
            resize=a.resize,
            max_candidates=a.max_candidates,
            nms_chunk=a.nms_chunk,
        ).path
        made: dict[str, Any] = {}

        def get(kind: str, made=made, detector=detector, graph=graph):
            if kind not in made:
                if kind == "network":
                    made[kind] = network_session(detector, device, a.threads)
                elif kind == "serving":
                    n = a.sessions if device == "cuda" else 1
                    made[kind] = [ServingSession(graph, device=device, intra_op_threads=a.threads)
                                  for _ in range(n)]
                elif kind == "edge_core":
                    made[kind] = edge_detector(detector, device, max(batches), a.threads)
                else:
                    from ultralytics import YOLO

                    made[kind] = YOLO(str(a.pt), task="detect")
            return made[kind]

        for b in batches:
            if static_batch is not None and b != static_batch:
                errors.append(f"batch {b} skipped: the model's batch is fixed at {static_batch}")
                continue
            for engine in engines:
                label = f"{engine} {precision} b{b}"
                t0 = time.perf_counter()
                try:
                    if engine == "network":
                        lat = bench_network(get("network"), device, b, input_hw, a)
                    elif engine == "serving_graph":
                        lat = bench_serving_graph(get("serving")[0], device, b, frames, a)
                    elif engine == "serving_direct":
                        lat = bench_serving_direct(get("serving")[0], b, frames, a)
                    elif engine == "serving_batched":
                        out = bench_serving_batched(get("serving"), b, frames, a)
                    elif engine == "edge_core":
                        lat = bench_edge_core(get("edge_core"), b, frames, a)
                    else:
                        yolo = get("ultralytics")
                        lat = bench_ultralytics(
                            yolo, max(input_hw), device, precision, b, frames, a
                        )
                    if engine != "serving_batched":
                        out = _row(engine, precision, b, lat)
                    out["precision"] = precision
                    if engine == "ultralytics":  # what torch had after the row (the budget)
                        out["torch_threads"] = pin_torch_threads(a.threads)
                except Exception as exc:  # one engine failing must not lose the others' rows
                    logger.exception("%s failed", label)
                    errors.append(f"{label}: {type(exc).__name__}: {exc}")
                    continue
                rows.append(out)
                report["summary"] = summarize(rows, precisions, batches)
                report["load_average_start_end"][1] = list(os.getloadavg())
                if on_update is not None:
                    on_update(report)
                logger.info(
                    "%s: %.1f frames/s, p95 %.2f ms (%.0f s)",
                    label,
                    out["frames_per_s"],
                    out["p95_ms"],
                    time.perf_counter() - t0,
                )
        made.clear()  # free this precision's sessions before the next
    report["load_average_start_end"][1] = list(os.getloadavg())
    report["complete"] = True
    return report


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    if device == "cuda":
        try:
            import torch

            info["gpu"] = torch.cuda.get_device_name(0)
            info["torch"] = torch.__version__
        except Exception as exc:  # noqa: BLE001 - informative only
            info["gpu"] = f"unknown ({exc})"
    return info


def _graph_options(settings: dict[str, Any]) -> str:
    """The serving graph's options where they are not the defaults, for the report's header."""
    defaults = {"resize": "float", "max_candidates": MAX_CANDIDATES, "nms_chunk": NMS_CHUNK}
    changed = [f"{k}={settings[k]!r}" for k, v in defaults.items()
               if k in settings and settings[k] != v]
    return f" · serving graph built with {', '.join(changed)}" if changed else ""


def _budget_line(r: dict[str, Any]) -> list[str]:
    """The host CPU budget and the load average, where the report has them (older ones not)."""
    s = r["settings"]
    lines = []
    if s.get("threads") is not None:
        torch_part = (f", torch (Ultralytics' host side) {s['torch_threads']}"
                      if s.get("torch_threads") is not None else "")
        lines.append(f"Host CPU threads, the same for every engine: ONNX Runtime intra-op "
                     f"{s['ort_intra_op_threads']} (inter-op {s['ort_inter_op_threads']})"
                     f"{torch_part}; {r['machine'].get('cpu_count')} CPUs.")
    if r.get("load_average_start_end"):
        start, end = (" / ".join(f"{v:.2f}" for v in x) for x in r["load_average_start_end"])
        lines.append(f"Load average (1/5/15 min) at start {start}, at end {end}.")
    return ["", " ".join(lines)] if lines else []


def render_markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    m = r["machine"]
    lines = [
        f"# GPU serving: network alone vs end to end ({r['device']})",
        "",
        (
            f"{r['created']} · {m.get('gpu', 'CPU')} · onnxruntime {m['onnxruntime']} · "
            f"frames {s['frame_hw'][1]}×{s['frame_hw'][0]} from `{Path(s['video']).name}` "
            f"({s['frames_in_memory']} decoded into memory before timing) · model input "
            f"{s['input_hw'][0]}×{s['input_hw'][1]} · conf {s['conf']} · iou {s['iou']} · "
            f"{s['seconds']} s per row after {s['warmup_s']} s warm-up"
            + _graph_options(s)
        ),
        *_budget_line(r),
        "",
        (
            "End to end = decoded BGR frames in host memory → detections per frame in Python. "
            f"JPEG decode is excluded everywhere; alone it costs {r['decode']['ms_per_frame']:.2f} ms "
            "per frame on one thread "
            f"({r['decode']['frames_per_s_one_thread']:.0f} frames/s per core)."
        ),
        "",
        (
            "| precision | batch | network alone fps | serving graph fps (frames on device) | "
            "serving direct fps | serving batched fps | best serving / network | "
            "edge core / network | Ultralytics fps | batched × Ultralytics | ≥ 70 % |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, spec=".0f"):
        return "–" if v is None else format(v, spec)

    for x in r["summary"]:
        lines.append(
            f"| {x['precision']} | {x['batch']} | {f(x['network_fps'])} | "
            f"{f(x.get('serving_graph_fps'))} | {f(x['serving_direct_fps'])} | {f(x['serving_batched_fps'])} | "
            f"{f(x['best_serving_over_network'], '.0%')} | "
            f"{f(x['edge_core_over_network'], '.0%')} | {f(x['ultralytics_fps'])} | "
            f"{f(x['serving_batched_over_ultralytics'], '.2f')} | "
            f"{'yes' if x['meets_target'] else 'no'} |"
        )
    lines += [
        "",
        "| engine | precision | batch | frames/s | P50 ms | P95 ms | latency of |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["results"]:
        lines.append(
            f"| {x['engine']} | {x['precision']} | {x['batch']} | {x['frames_per_s']:.1f} | "
            f"{x['p50_ms']:.2f} | {x['p95_ms']:.2f} | {x['latency_per']} |"
        )
    lines += [
        "",
        (
            "At batch 1 `serving_batched` runs its sessions concurrently (two on CUDA) while "
            "`network` is one synchronous session, so a ratio above 100 % there says the network "
            "row is no ceiling at that batch, not that the serving path beats the network."
        ),
    ]
    if not r.get("complete"):
        lines += ["", "**Incomplete run**: the rows above are those measured before it stopped."]
    if r["errors"]:
        lines += ["", "Errors / skipped:", ""] + [f"- {e}" for e in r["errors"]]
    lines += [
        "",
        (
            "Engines: `network` = the detector alone on ONNX Runtime, input and output on the device; "
            "`serving_graph` = the serving graph alone, frames and outputs on the device "
            "(letterbox + network + NMS, not counted as end to end); "
            "`serving_direct` = one `ServingSession.run` per batch (copy into pinned staging, H2D, "
            "letterbox+network+NMS in one graph, D2H, `Detection` objects); `serving_batched` = "
            "`FrameBatcher` fed by camera threads, per-frame latency from submit to result; "
            "`edge_core` = `OnnxDetector.detect_batch` (letterbox and NMS on the CPU) on the same "
            "provider; `ultralytics` = `YOLO(pt).predict` on the same frames and device."
        ),
        "",
        "Command: `bash benchmarks/gpu_run.sh` (see docs/gpu.md).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--onnx", type=Path, help="detector ONNX (dynamic batch, static HxW)")
    p.add_argument("--pt", type=Path, help="the same model's Ultralytics checkpoint")
    p.add_argument("--video", type=Path, default=SHARED / "videos" / "highway_overpass.mp4")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--frames", type=int, default=64, help="distinct frames held in memory")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds per row first")
    p.add_argument("--cameras", type=int, default=32, help="camera threads feeding the batcher")
    p.add_argument("--sessions", type=int, default=2, help="serving sessions (CUDA streams)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="host CPU threads of every engine: ONNX Runtime intra-op (inter-op 1) "
                        "and torch for Ultralytics (default %(default)s)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU run: shared 320 model, batch 1, fp32, short rows",
    )
    p.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="float",
        help="how the serving graph scales the frames down (roadloop.serving.letterbox)",
    )
    p.add_argument("--max-candidates", type=int, default=MAX_CANDIDATES,
                   help="anchors per image that enter NMS")
    p.add_argument("--nms-chunk", type=int, default=NMS_CHUNK,
                   help="images per NonMaxSuppression row (when the batch is a multiple)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", help="output file stem (default by device)")
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.precisions, a.batches = "cpu", "fp32", "1"
        a.frames, a.seconds, a.warmup, a.cameras = 4, 0.5, 0.2, 2
        a.onnx = a.onnx or SHARED / "models" / "atl_v2_yolo11n_gpu_320.onnx"
        a.pt = a.pt or SHARED / "models" / "atl_v2_yolo11n_gpu.pt"
    if a.onnx is None:
        p.error("--onnx is required (or --smoke)")
    if a.threads < 1:
        p.error("--threads must be >= 1 (every engine gets the same budget)")
    return a


def write_report(report: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2)), (".md", render_markdown(report))):
        tmp = out / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"{name}{suffix}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    a = parse_args(argv)

    def save(report: dict[str, Any]) -> None:
        default = "gpu_serving" if report["device"] == "cuda" else "gpu_serving_smoke_cpu"
        write_report(report, a.out, a.name or default)

    report = run(a, on_update=save)
    save(report)
    print(render_markdown(report))
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
