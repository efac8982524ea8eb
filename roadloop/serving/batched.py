"""Serve many cameras from one GPU: batch their frames, run the serving graph, hand back
per-camera detections.

- :func:`select_providers` picks the execution provider: CUDA when this onnxruntime build
  has it (``pip install .[gpu]``), else CPU, and says why. fp16 graphs need CUDA: asking for
  them on CPU raises :class:`ServingConfigError` (ONNX Runtime's CPU kernels for fp16 are
  few and slow, so silently running them there would mislead).
- :class:`ServingSession` runs one serving graph (``roadloop.serving.graph``) on a batch of
  uint8 frames. On CUDA it binds the frames in place (IO binding, no extra host copy) from a
  page-locked staging buffer, so the host→device copy runs at full bus speed.
- :class:`FrameBatcher` takes frames from any number of camera threads. Each producer copies
  its frame straight into a slot of the next batch's staging buffer (the one copy a batch
  needs anyway, done in parallel by the producers); a runner thread per session runs a
  batch when it is full or when its oldest frame has waited ``max_wait_s``. Two sessions
  (each with its own CUDA stream) let one batch's copy overlap another's compute. A partial
  batch runs at the next size of :func:`batch_buckets` (powers of two up to ``max_batch``),
  and on CUDA each size runs once before the first camera's frame: cuDNN picks convolution
  algorithms per input shape, which takes seconds, so a batch of a size not seen before
  would stall every camera in it (on an H100, the first benchmark run's batched fp16 row at
  32 completed no frame in its 3 s window).
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

import numpy as np
import onnxruntime as ort

from edge_agent.inference import Detection, _parse_names, detections_from_arrays
from roadloop.errors import RoadloopError
from roadloop.serving.graph import FRAMES_INPUT, OUTPUTS

logger = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


class ServingConfigError(RoadloopError, ValueError):
    """The requested device/precision cannot run here (e.g. fp16 without CUDA)."""


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    device: Literal["cuda", "cpu"]
    precision: Literal["fp32", "fp16"]
    providers: list  # what InferenceSession(providers=...) takes
    reason: str


def select_providers(
    device: Device = "auto",
    precision: str = "fp32",
    *,
    device_id: int = 0,
    available: Sequence[str] | None = None,
) -> ProviderChoice:
    """CUDA (then CPU as ONNX Runtime's fallback for any unsupported node) or CPU alone."""
    if precision not in ("fp32", "fp16"):
        raise ServingConfigError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if device not in ("auto", "cuda", "cpu"):
        raise ServingConfigError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    have = list(ort.get_available_providers() if available is None else available)
    has_cuda = CUDA_EP in have
    if device == "cuda" and not has_cuda:
        raise ServingConfigError(
            f"device='cuda' but this onnxruntime ({ort.__version__}) has no {CUDA_EP} "
            f"(providers: {have}); install the [gpu] extra (onnxruntime-gpu) on a CUDA machine"
        )
    if device == "cuda" or (device == "auto" and has_cuda):
        cuda = (CUDA_EP, {"device_id": int(device_id)})
        return ProviderChoice("cuda", precision, [cuda, CPU_EP], f"{CUDA_EP} is available")
    why = "device='cpu' requested" if device == "cpu" else f"no {CUDA_EP} here (providers: {have})"
    if precision == "fp16":
        raise ServingConfigError(
            f"fp16 serving needs the CUDA execution provider, but {why}; "
            "build/run the fp32 graph on CPU"
        )
    logger.info("serving on CPU: %s", why)
    return ProviderChoice("cpu", precision, [CPU_EP], why)


def _pinned_empty(shape: tuple[int, ...], dtype=np.uint8) -> tuple[np.ndarray, bool]:
    """A page-locked host array (cudaHostAlloc) when the CUDA runtime is loadable, else plain."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        ptr = ctypes.c_void_p()
        if cudart.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), 0) != 0:
            break
        # Never freed: staging buffers live as long as the server (the OS reclaims it at exit).
        buf = (ctypes.c_uint8 * nbytes).from_address(ptr.value)
        return np.frombuffer(buf, dtype=dtype).reshape(shape), True
    return np.zeros(shape, dtype), False


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a dynamic-batch graph runs at: powers of two below ``max_batch``, and
    ``max_batch``. A partial batch is padded up to the next one (at most twice the work, in
    exchange for a handful of shapes that can all be warmed up ahead)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return [*sizes, max_batch]


class ServingSession:
    """One serving graph loaded on the chosen provider; ``run`` takes a uint8 NHWC batch."""

    def __init__(
        self,
        graph_path: Path | str,
        *,
        device: Device = "auto",
        device_id: int = 0,
        intra_op_threads: int | None = None,
        io_binding: bool | None = None,
    ) -> None:
        self.graph_path = Path(graph_path)
        import onnx  # the metadata first: an fp16 graph must not be loaded on CPU

        model = onnx.load(str(self.graph_path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        if meta.get("serving_graph") != "1":
            raise ServingConfigError(
                f"{self.graph_path} is not a serving graph (build_serving_graph)"
            )
        self.precision = meta.get("serving_precision", "fp32")
        self.choice = select_providers(device, self.precision, device_id=device_id)
        if self.choice.device == "cuda" and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the nvidia-* wheels, where the machine has them there
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - a system CUDA install may serve instead
                logger.debug("onnxruntime.preload_dlls: %s", exc)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 2  # warnings show nodes placed off the requested provider
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        self.session = ort.InferenceSession(
            str(self.graph_path), options, providers=self.choice.providers
        )
        if self.choice.device == "cuda" and self.session.get_providers()[0] != CUDA_EP:
            # onnxruntime-gpu lists CUDA even where no GPU or CUDA library is usable, and then
            # quietly runs on CPU: say so, and refuse unless the caller left the choice to us.
            why = (
                f"{CUDA_EP} did not initialise (session providers "
                f"{self.session.get_providers()}): no GPU, or CUDA 13 / cuDNN 9 not loadable"
            )
            if device == "cuda" or self.precision == "fp16":
                raise ServingConfigError(why)
            logger.warning("serving on CPU: %s", why)
            self.choice = ProviderChoice("cpu", "fp32", [CPU_EP], why)
            self.session = ort.InferenceSession(
                str(self.graph_path), options, providers=self.choice.providers
            )
        if self.choice.device == "cuda" and meta.get("serving_resize") == "uint8_first":
            # Measured on an H200 (onnxruntime-gpu 1.31.1): the CUDA kernel of a bilinear
            # Resize casts each interpolation weight to the tensor's type before multiplying,
            # so on uint8 every weight below 1 becomes 0 and the frames come out nearly black.
            raise ServingConfigError(
                f"{self.graph_path} resizes uint8 frames (resize='uint8_first'), which ONNX "
                "Runtime's CUDA Resize gets wrong (its uint8 bilinear weights truncate to 0): "
                "build the graph for a GPU with resize='float' or 'separable'"
            )
        self.frame_hw: tuple[int, int] = tuple(json.loads(meta["serving_frame_hw"]))
        dim0 = self.session.get_inputs()[0].shape[0]
        self.batch: int | None = dim0 if isinstance(dim0, int) and dim0 > 0 else None
        self.class_names: list[str] = _parse_names(meta.get("names")) or []
        self.model_sha256 = meta.get("serving_source_sha256", "")
        # IO binding pays on CUDA (frames bound in place, outputs copied once); None: there only.
        self.io_binding = self.choice.device == "cuda" if io_binding is None else bool(io_binding)
        self._binding = self.session.io_binding() if self.io_binding else None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def staging_buffer(self, batch: int) -> np.ndarray:
        """A ``[batch, H, W, 3]`` uint8 buffer to fill with frames: page-locked on CUDA."""
        shape = (int(batch), *self.frame_hw, 3)
        if self.choice.device == "cuda":
            arr, pinned = _pinned_empty(shape)
            if not pinned:
                logger.warning("no CUDA runtime for page-locked memory; staging in pageable memory")
            return arr
        return np.zeros(shape, np.uint8)

    def run(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``frames`` uint8 ``[b, H, W, 3]`` (C-contiguous) → boxes, scores, classes, count."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*self.frame_hw, 3):
            raise ValueError(
                f"frames must be uint8 [b, {self.frame_hw[0]}, {self.frame_hw[1]}, 3], "
                f"got {frames.dtype} {frames.shape}"
            )
        if self.batch is not None and frames.shape[0] != self.batch:
            raise ValueError(f"this graph takes batches of exactly {self.batch}")
        frames = np.ascontiguousarray(frames)
        if self._binding is None:
            return tuple(self.session.run(list(OUTPUTS), {FRAMES_INPUT: frames}))  # type: ignore[return-value]
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        # In place: ONNX Runtime copies host→device itself, at bus speed from pinned memory.
        io.bind_input(FRAMES_INPUT, "cpu", 0, np.uint8, list(frames.shape), frames.ctypes.data)
        for name in OUTPUTS:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        return tuple(io.copy_outputs_to_cpu())  # type: ignore[return-value]

    def warm_up(self, batch_sizes: Sequence[int], buf: np.ndarray | None = None) -> list[int]:
        """Run each batch size once (dark frames), so that shape-dependent set-up on the device
        (cuDNN's algorithm search) happens before any camera waits on it. ``buf``: a staging
        buffer of at least the largest size to use (page-locked memory is never freed, so a
        batcher lends one of its own rather than have a new one allocated here)."""
        sizes = [self.batch] if self.batch is not None else sorted(set(batch_sizes))
        if buf is None or len(buf) < max(sizes):
            buf = self.staging_buffer(max(sizes))
        buf[...] = 0
        for n in sizes:
            self.run(buf[:n])
        return sizes

    def detections(
        self, outputs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], n: int | None = None
    ) -> list[list[Detection]]:
        """The first ``n`` images' outputs as :class:`edge_agent.inference.Detection` lists."""
        boxes, scores, classes, count = outputs
        n = len(count) if n is None else n
        return [
            detections_from_arrays(
                boxes[i, :k], scores[i, :k], classes[i, :k], self.class_names, self.model_sha256
            )
            for i, k in enumerate(int(c) for c in count[:n])
        ]

    def detect(self, frames: Sequence[np.ndarray] | np.ndarray) -> list[list[Detection]]:
        """Detections per frame, batching at this graph's batch size (if static)."""
        frames = np.stack(list(frames)) if not isinstance(frames, np.ndarray) else frames
        n = len(frames)
        if self.batch is None:
            return self.detections(self.run(frames), n)
        out: list[list[Detection]] = []
        for start in range(0, n, self.batch):
            part = frames[start : start + self.batch]
            buf = np.zeros((self.batch, *part.shape[1:]), np.uint8)
            buf[: len(part)] = part
            out += self.detections(self.run(buf), len(part))
        return out


class _Batch:
    __slots__ = ("buf", "filled", "futures", "opened", "reserved")

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf
        self.reserved = 0
        self.filled = 0
        self.futures: list[Future] = []
        self.opened = time.perf_counter()


class FrameBatcher:
    """Frames from many cameras → batches of up to ``max_batch`` → detections per frame.

    ``submit`` returns a ``Future`` of that frame's ``list[Detection]``. A batch runs when it
    holds ``max_batch`` frames or its first frame has waited ``max_wait_s``, padded up to the
    next of :func:`batch_buckets`. ``sessions`` are :class:`ServingSession` objects on the
    same graph, one runner thread each. ``warm_up`` runs every bucket size on every session
    first (default: where a session runs on CUDA).
    """

    def __init__(
        self,
        sessions: Sequence[ServingSession],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        warm_up: bool | None = None,
    ) -> None:
        if not sessions:
            raise ValueError("FrameBatcher needs at least one ServingSession")
        first = sessions[0]
        if first.batch is not None:
            max_batch = first.batch
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.sessions = list(sessions)
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.frame_hw = first.frame_hw
        self.buckets = (
            [self.max_batch] if first.batch is not None else batch_buckets(self.max_batch)
        )
        self.batch_sizes_run: dict[int, int] = {}  # size run → batches
        # One staging buffer per runner, plus one filling and one spare.
        self._free: deque[np.ndarray] = deque(
            first.staging_buffer(self.max_batch) for _ in range(len(self.sessions) + 2)
        )
        if warm_up is None:
            warm_up = any(s.choice.device == "cuda" for s in self.sessions)
        if warm_up:
            t0 = time.perf_counter()
            for s in self.sessions:
                s.warm_up(self.buckets, self._free[0])
            logger.info(
                "warmed up batch sizes %s on %d session(s) in %.1f s",
                self.buckets,
                len(self.sessions),
                time.perf_counter() - t0,
            )
        self._cond = threading.Condition()
        self._open: _Batch | None = None
        self._ready: deque[_Batch] = deque()
        self._closed = False
        self.batches_run = 0
        self.frames_run = 0
        self._threads = [
            threading.Thread(
                target=self._runner, args=(s,), name=f"serving-runner-{i}", daemon=True
            )
            for i, s in enumerate(self.sessions)
        ]
        for t in self._threads:
            t.start()

    def submit(self, camera_id: str, frame: np.ndarray) -> Future:
        """Queue one BGR uint8 frame of the graph's resolution; blocks while all buffers are busy."""
        if frame.dtype != np.uint8 or frame.shape != (*self.frame_hw, 3):
            raise ValueError(
                f"frame must be uint8 {(*self.frame_hw, 3)}, got {frame.dtype} {frame.shape}"
            )
        fut: Future = Future()
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("FrameBatcher is closed")
                if self._open is None and self._free:
                    self._open = _Batch(self._free.popleft())
                if self._open is not None:
                    break
                self._cond.wait()
            batch = self._open
            slot = batch.reserved
            batch.reserved += 1
            batch.futures.append(fut)
            if batch.reserved == self.max_batch:
                self._seal(batch)
        np.copyto(batch.buf[slot], frame)  # outside the lock: producers copy in parallel
        with self._cond:
            batch.filled += 1
            self._cond.notify_all()
        return fut

    def _seal(self, batch: _Batch) -> None:
        self._ready.append(batch)
        if self._open is batch:
            self._open = None
        self._cond.notify_all()

    def _next_batch(self) -> _Batch | None:
        with self._cond:
            while True:
                if self._ready and self._ready[0].filled == self._ready[0].reserved:
                    return self._ready.popleft()
                batch = self._open
                if batch is not None and batch.reserved:
                    wait = batch.opened + self.max_wait_s - time.perf_counter()
                    if wait <= 0:
                        self._seal(batch)
                        continue
                else:
                    wait = None
                if self._closed and not self._ready and (batch is None or not batch.reserved):
                    return None
                self._cond.wait(wait)

    def _runner(self, session: ServingSession) -> None:
        while (batch := self._next_batch()) is not None:
            n = batch.reserved
            size = next(b for b in self.buckets if b >= n)  # slots past n: stale, ignored
            try:
                frames = batch.buf[:size]
                results = session.detections(session.run(frames), n)
            except Exception as exc:  # noqa: BLE001 - every waiting camera gets the error
                for fut in batch.futures:
                    fut.set_exception(exc)
            else:
                for fut, dets in zip(batch.futures, results):
                    fut.set_result(dets)
            with self._cond:
                self.batches_run += 1
                self.frames_run += n
                self.batch_sizes_run[size] = self.batch_sizes_run.get(size, 0) + 1
                self._free.append(batch.buf)
                self._cond.notify_all()

    def close(self) -> None:
        """Run what is queued, then stop the runner threads."""
        with self._cond:
            self._closed = True
            if self._open is not None and self._open.reserved:
                self._seal(self._open)
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
