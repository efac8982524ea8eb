"""Forward-pass latency of a model file: p50/p95/p99 and frames/s per batch size.

Model forward only, on a fixed seeded random batch, with one protocol for PyTorch and ONNX
Runtime so the formats compare: one runner per engine (:func:`_torch_runner`,
:func:`_onnx_runner`) makes the timed call for each batch size, :func:`measure_latency`
times it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from roadloop.errors import InvalidInputError, RoadloopError
from roadloop.evaluation.inputs import check_model_file
from roadloop.evaluation.results import LatencyStats

logger = logging.getLogger(__name__)


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import onnxruntime as ort
    import torch

    ok = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not ok:
        raise RoadloopError(
            "latency device 'cuda' asked, but torch CUDA or the ONNX Runtime "
            "CUDA provider is not available"
        )
    return "cuda" if ok else "cpu"


def _torch_runner(
    model_path: Path, imgsz: int, device: str, seed: int
) -> Callable[[int], Callable[[], Any] | None]:
    import torch
    from ultralytics import YOLO

    try:
        net = YOLO(str(model_path), task="detect").model
    except Exception as exc:
        raise InvalidInputError(model_path, f"Ultralytics cannot load the model ({exc})") from exc
    net = net.fuse(verbose=False) if hasattr(net, "fuse") else net
    net = net.float().to(device).eval()

    def make(batch: int) -> Callable[[], Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((batch, 3, imgsz, imgsz), generator=g).to(device)

        def run() -> Any:
            with torch.inference_mode():
                y = net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return y

        return run

    return make


def _onnx_runner(
    model_path: Path, imgsz: int | tuple[int, int], device: str, seed: int,
    threads: int | None,
) -> Callable[[int], Callable[[], Any] | None]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda"
        else ["CPUExecutionProvider"]
    )
    try:
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
    except Exception as exc:
        raise InvalidInputError(model_path, f"ONNX Runtime cannot load the model ({exc})") from exc
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    want = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    if any(isinstance(d, int) and d != w for d, w in zip(inp.shape[2:4], want, strict=True)):
        raise InvalidInputError(
            model_path, f"ONNX input is {inp.shape}, but imgsz={imgsz} was asked"
        )

    def make(batch: int) -> Callable[[], Any] | None:
        if isinstance(inp.shape[0], int) and inp.shape[0] != batch:
            logger.warning(
                "%s has a static batch of %s; skipping batch %d",
                model_path.name,
                inp.shape[0],
                batch,
            )
            return None
        x = np.random.default_rng(seed).random((batch, 3, *want)).astype(dtype)
        feed = {inp.name: x}
        return lambda: sess.run(None, feed)

    return make


def measure_latency(
    model_path: Path,
    *,
    imgsz: int | tuple[int, int],
    batch_sizes: Iterable[int] = (1, 4, 8),
    warmup: int = 10,
    runs: int = 100,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> list[LatencyStats]:
    """Forward-pass latency percentiles per batch size (``time.perf_counter``).

    Same protocol for every format: one fixed seeded random input per batch size,
    ``warmup`` untimed runs, then ``runs`` timed ones; no pre/post-processing or NMS.
    PyTorch: the Ultralytics model, fused, ``.eval()``, under ``torch.inference_mode()``,
    ``torch.set_num_threads(threads)`` for the duration. ONNX: an ONNX Runtime session with
    ``intra_op_num_threads=threads`` (CUDA provider when ``device`` resolves to cuda).
    ``threads=None`` leaves each runtime's default. An ONNX file with a static batch
    dimension is measured only at that batch size (others are skipped with a warning).
    ``imgsz`` is the side or, for an ONNX file with a rectangular input, its ``(h, w)``.
    """
    model_path = check_model_file(Path(model_path))
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be >= 1, got {sizes}")
    dev = _resolve_device(device)

    import torch

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if model_path.suffix.lower() == ".pt":
            if not isinstance(imgsz, int):
                raise ValueError(f"a PyTorch model is timed at a square imgsz, not {imgsz}")
            make = _torch_runner(model_path, imgsz, dev, seed)
        else:
            make = _onnx_runner(model_path, imgsz, dev, seed, threads)
        out: list[LatencyStats] = []
        for b in sizes:
            run = make(b)
            if run is None:
                continue
            for _ in range(warmup):
                run()
            times = np.empty(runs, dtype=np.float64)
            for i in range(runs):
                t0 = time.perf_counter()
                run()
                times[i] = (time.perf_counter() - t0) * 1000.0
            p50, p95, p99 = (float(v) for v in np.percentile(times, [50, 95, 99]))
            mean = float(times.mean())
            out.append(
                LatencyStats(
                    batch=b,
                    p50_ms=p50,
                    p95_ms=p95,
                    p99_ms=p99,
                    mean_ms=mean,
                    frames_per_s=b / (mean / 1000.0) if mean > 0 else float("inf"),
                    runs=runs,
                    warmup=warmup,
                    threads=threads,
                    device=dev,
                )
            )
            logger.info(
                "latency %s batch %d: p50 %.1f ms, p95 %.1f ms", model_path.name, b, p50, p95
            )
        return out
    finally:
        torch.set_num_threads(prev_threads)
