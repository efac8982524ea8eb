"""The exported-YOLO inference path cameras run: ONNX Runtime + numpy + OpenCV, nothing else.

It reproduces Ultralytics' ``predict`` on an exported (not NMS-fused) YOLO11 detection
model: the same letterbox (centre padding, grey 114), BGR→RGB, /255, the same decoding of
the ``(B, 4 + nc, N)`` output (cx, cy, w, h + class scores, no objectness), class-wise NMS
and scaling back through the letterbox. ``tests/test_edge_inference.py`` holds it to
Ultralytics' own ONNX predictions on real frames.

The platform may import this module; it must never import torch, ultralytics, dagster or
roadloop (a subprocess test checks), so the agent installs with ``pip install .[edge]``.
"""

from __future__ import annotations

import ast
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from edge_agent.boxes import nms
from edge_agent.errors import InvalidModelError
from edge_agent.fsutil import file_sha256

logger = logging.getLogger(__name__)

# Ultralytics' NMS constants (ultralytics/utils/nms.py): at most this many candidates enter NMS.
MAX_NMS_CANDIDATES = 30000
# Ultralytics' predict default IoU threshold (cfg/default.yaml ``iou: 0.7``).
DEFAULT_IOU_THRESHOLD = 0.7
DEFAULT_CONF_THRESHOLD = 0.25
# The largest input side a dynamic-size model may be run at (its ``imgsz`` metadata or the
# ``imgsz`` argument). 4096 px holds a 4K frame (3840 px) at native resolution, past any size
# Ultralytics exports (1280 for its P6 models); the float32 input blob alone is then 201 MB
# and the activations several GB, while a stray 100000 would ask for ~120 GB per frame.
MAX_INPUT_SIDE = 4096
DEFAULT_STRIDE = 32
# How often (seconds) one detector logs the output rows it dropped as invalid.
INVALID_ROWS_LOG_INTERVAL_S = 300.0

_ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object, box corners in pixels of the original frame.

    ``model_sha256`` is the content hash of the model file that produced it, so every
    prediction carries the model version it came from.
    """

    class_id: int
    confidence: float
    x1: float
    y1: float
    x2: float
    y2: float
    class_name: str = ""
    model_sha256: str = ""

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detections_from_arrays(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, names: Sequence[str],
    model_sha256: str,
) -> list[Detection]:
    """``Detection``s from (N, 4) frame-pixel corners, (N,) scores and (N,) class ids; a class
    id outside ``names`` is named by its number."""
    return [
        Detection(
            class_id=int(c),
            confidence=float(s),
            x1=float(b[0]),
            y1=float(b[1]),
            x2=float(b[2]),
            y2=float(b[3]),
            class_name=names[int(c)] if 0 <= int(c) < len(names) else str(int(c)),
            model_sha256=model_sha256,
        )
        for b, s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist())
    ]


@dataclass(frozen=True, slots=True)
class LetterboxMeta:
    """How one frame was letterboxed: enough to map boxes back onto it."""

    orig_shape: tuple[int, int]  # (height, width) of the original frame
    ratio: tuple[float, float]  # (width, height) scale actually applied, resized / original
    pad: tuple[int, int]  # (left, top) padding in pixels


@dataclass(frozen=True, slots=True)
class StageTimings:
    """Wall time of each stage of the last ``detect``/``detect_batch`` call, in milliseconds."""

    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float
    batch_size: int
    # Output rows of this call dropped as invalid (a non-finite box or score, a negative width
    # or height): the agent fails such a frame instead of trusting (and redacting by) the rest.
    invalid_rows: int = 0

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.inference_ms + self.postprocess_ms

    def to_dict(self) -> dict[str, float]:
        return {
            "preprocess_ms": self.preprocess_ms,
            "inference_ms": self.inference_ms,
            "postprocess_ms": self.postprocess_ms,
            "total_ms": self.total_ms,
            "batch_size": self.batch_size,
        }


def _letterbox_params(
    shape: tuple[int, int], new_shape: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resized (w, h) and (top, bottom, left, right) padding exactly as Ultralytics' LetterBox
    computes them with ``auto=False, scale_fill=False, scaleup=True, center=True``."""
    h, w = shape
    r = min(new_shape[0] / h, new_shape[1] / w)
    new_unpad = (max(round(w * r), 1), max(round(h * r), 1))
    dw = (new_shape[1] - new_unpad[0]) / 2
    dh = (new_shape[0] - new_unpad[1]) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return new_unpad, (top, bottom, left, right)


def letterbox(
    image_bgr: np.ndarray,
    new_shape: int | tuple[int, int],
    color: tuple[int, int, int] = (114, 114, 114),
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping aspect ratio, then pad to ``new_shape`` (an int or (height, width)).

    Matches Ultralytics' ``LetterBox(auto=False, center=True, scaleup=True)`` pixel for pixel
    (bilinear resize, padding split around the image). Returns ``(padded, (ratio_w, ratio_h),
    (pad_left, pad_top))`` where the ratios are the scale actually applied on each axis
    (resized size / original size, after rounding to whole pixels).
    """
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    h, w = image_bgr.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"cannot letterbox an empty image of shape {image_bgr.shape}")
    new_unpad, (top, bottom, left, right) = _letterbox_params((h, w), new_shape)
    img = image_bgr
    if (w, h) != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    ratio = (new_unpad[0] / w, new_unpad[1] / h)
    return img, ratio, (left, top)


def _default_providers() -> list[str]:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _usable_providers(requested: Sequence[str]) -> list[str]:
    """The requested execution providers this onnxruntime build has, in order (warns on the
    rest, so a config written for a GPU box still runs on a CPU-only one)."""
    available = set(ort.get_available_providers())
    usable = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        logger.warning("execution providers %s are not available here; using %s", missing, usable)
    if not usable:
        raise ValueError(
            f"none of the providers {list(requested)} is available; have {sorted(available)}"
        )
    return usable


def _literal(value: str | None) -> Any:
    """Parse a metadata value Ultralytics wrote with ``str()``; ``None`` when it is not a literal."""
    if value is None:
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _parse_names(value: str | None) -> list[str] | None:
    names = _literal(value)
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            return None
        if ids != list(range(len(ids))):
            return None
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None


def _parse_imgsz(value: str | None) -> Any:
    """The metadata's ``imgsz`` as written: an int, a 2-sequence, or whatever else it holds
    (``_checked_size`` refuses what is not a usable size); ``None`` when absent or not a
    literal."""
    imgsz = _literal(value)
    if isinstance(imgsz, (list, tuple)) and len(imgsz) == 2:
        return tuple(imgsz)
    return imgsz


def _is_side(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_size(path: Path, size: Any, stride: int, source: str) -> tuple[int, int]:
    """``size`` (an int or (height, width)) as a usable input size for a dynamic-size model,
    else ``InvalidModelError`` naming the file: each side a positive int (not a bool), a
    multiple of the model's stride (the network downsamples by it; anything else fails every
    frame or is silently cropped) and at most ``MAX_INPUT_SIDE``."""
    hw = (size, size) if _is_side(size) else size
    if not (isinstance(hw, tuple) and len(hw) == 2 and all(_is_side(v) for v in hw)):
        raise InvalidModelError(path, f"{source} {size!r} is not an int or [height, width] of ints")
    for v in hw:
        if not 0 < v <= MAX_INPUT_SIDE or v % stride:
            raise InvalidModelError(
                path,
                f"{source} {size!r}: each side must be a positive multiple of the stride "
                f"({stride}) and at most {MAX_INPUT_SIDE} px",
            )
    return (int(hw[0]), int(hw[1]))


def _static_dim(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    """Accept BGR (HxWx3), grey (HxW or HxWx1) and BGRA frames; anything else is an error."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"a frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"a frame must be uint8, got {frame.dtype}")
    if frame.size == 0:
        raise ValueError(f"empty frame of shape {frame.shape}")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    raise ValueError(f"a frame must be HxW, HxWx3 or HxWx4, got shape {frame.shape}")


class OnnxDetector:
    """A YOLO detection model exported to ONNX (fp32, fp16 or INT8 QDQ), static or dynamic batch.

    Input size and class names come from the metadata Ultralytics writes into the file
    (``imgsz``, ``names``); ``class_names`` overrides the names, ``imgsz`` supplies the size
    of a model whose height/width are dynamic (that size, from either, must be positive
    multiples of the stride and at most ``MAX_INPUT_SIDE``, else ``InvalidModelError`` at
    load). The IoU default is Ultralytics' predict default (0.7), so out of the box it
    returns what ``predict`` does. ``session_config`` passes ONNX Runtime session config
    entries through. Output rows with a non-finite box or score, or a negative width/height,
    are dropped as invalid (``invalid_rows_dropped``), zero-size ones silently; scores are
    bounded to [0, 1].
    """

    def __init__(
        self,
        model_path: Path | str,
        *,
        conf_threshold: float = DEFAULT_CONF_THRESHOLD,
        iou_threshold: float = DEFAULT_IOU_THRESHOLD,
        max_detections: int = 300,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        class_names: list[str] | None = None,
        imgsz: int | None = None,
        max_batch_size: int = 32,
        session_config: dict[str, str] | None = None,
    ) -> None:
        if not 0.0 <= conf_threshold <= 1.0:
            raise ValueError(f"conf_threshold must be in [0, 1], got {conf_threshold}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        if max_detections < 1 or max_batch_size < 1:
            raise ValueError("max_detections and max_batch_size must be >= 1")
        self.model_path = Path(model_path)
        self.conf_threshold = float(conf_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        self.max_batch_size = int(max_batch_size)
        self.last_timings: StageTimings | None = None
        # Output rows dropped as invalid (``_dropped_invalid``), and when that was last logged.
        self.invalid_rows_dropped = 0
        self._invalid_logged_at: float | None = None
        self._invalid_lock = threading.Lock()
        self._this_call = threading.local()  # .invalid: rows dropped by this thread's call

        if not self.model_path.is_file():
            raise InvalidModelError(self.model_path, "no such model file")
        self.model_sha256 = file_sha256(self.model_path)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            options.inter_op_num_threads = int(inter_op_threads)
        for key, value in (session_config or {}).items():
            # e.g. {"session.intra_op.allow_spinning": "0"} on a CPU shared with other work
            options.add_session_config_entry(key, str(value))
        wanted = _usable_providers(providers) if providers is not None else _default_providers()
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=wanted)
        except Exception as exc:  # ORT raises its own pybind exception types
            raise InvalidModelError(
                self.model_path, f"not a loadable ONNX model ({type(exc).__name__}: {exc})"
            ) from exc

        meta = self.session.get_modelmeta().custom_metadata_map or {}
        self.metadata: dict[str, str] = dict(meta)
        task = meta.get("task")
        if task is not None and task != "detect":
            raise InvalidModelError(
                self.model_path, f"task is {task!r}; only 'detect' models are supported"
            )

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InvalidModelError(self.model_path, f"expected one input, found {len(inputs)}")
        inp = inputs[0]
        self.input_name = inp.name
        if inp.type not in _ONNX_FLOAT_TYPES:
            raise InvalidModelError(self.model_path, f"input type {inp.type} is not float/float16")
        self.input_dtype = _ONNX_FLOAT_TYPES[inp.type]
        if len(inp.shape) != 4:
            raise InvalidModelError(
                self.model_path,
                f"input {inp.name!r} has rank {len(inp.shape)} {inp.shape}; expected NCHW (rank 4)",
            )
        channels = _static_dim(inp.shape[1])
        if channels is not None and channels != 3:
            raise InvalidModelError(
                self.model_path, f"input has {channels} channels; expected 3 (RGB)"
            )
        self.batch_size = _static_dim(inp.shape[0])  # None: dynamic batch
        stride = _literal(meta.get("stride"))
        # A stride that is not a positive int (absent, 0, a bool) is YOLO's 32.
        self.stride = (stride if _is_side(stride) and 0 < stride <= MAX_INPUT_SIDE
                       else DEFAULT_STRIDE)
        h, w = _static_dim(inp.shape[2]), _static_dim(inp.shape[3])
        if h is None or w is None:
            if imgsz is not None:
                h, w = _checked_size(self.model_path, imgsz, self.stride, "imgsz=")
            else:
                written = meta.get("imgsz")
                if written is None:
                    raise InvalidModelError(
                        self.model_path,
                        "input height/width are dynamic and the metadata has no 'imgsz'; "
                        "pass imgsz=",
                    )
                size = _parse_imgsz(written)
                h, w = _checked_size(self.model_path, written if size is None else size,
                                     self.stride, "metadata imgsz")
        elif imgsz is not None and imgsz != max(h, w):
            raise InvalidModelError(
                self.model_path, f"imgsz={imgsz} but the model's input is fixed at {h}x{w}"
            )
        # A rectangular input (e.g. 192x320 for 16:9 cameras, what Ultralytics' own predict
        # uses) spends no compute on padding; ``input_size`` is its long side, as ``imgsz``.
        self.input_hw: tuple[int, int] = (int(h), int(w))
        self.input_size = int(max(h, w))

        outputs = self.session.get_outputs()
        if not outputs:
            raise InvalidModelError(self.model_path, "model has no outputs")
        out = outputs[0]
        self.output_name = out.name
        if len(out.shape) != 3:
            raise InvalidModelError(
                self.model_path,
                f"output {out.name!r} has rank {len(out.shape)} {out.shape}; expected (B, 4+nc, N)",
            )
        self.end2end = meta.get("end2end") == "True" or _static_dim(out.shape[2]) == 6
        meta_names = _parse_names(meta.get("names"))
        channels_out = _static_dim(out.shape[1])
        if self.end2end:
            nc = len(class_names or meta_names or [])
        elif channels_out is not None:
            if channels_out < 5:
                raise InvalidModelError(
                    self.model_path, f"output has {channels_out} channels; expected 4 + classes"
                )
            nc = channels_out - 4
        else:
            nc = len(class_names or meta_names or [])
        names = class_names if class_names is not None else meta_names
        if names is None:
            names = [f"class{i}" for i in range(nc)]
        if nc and len(names) != nc:
            raise InvalidModelError(
                self.model_path,
                f"model predicts {nc} classes but {len(names)} class names were given",
            )
        self.class_names: list[str] = list(names)
        self.num_classes = nc or len(self.class_names)
        logger.info(
            "loaded %s (sha256 %s…, %dx%d, %s batch, %d classes, providers %s)",
            self.model_path.name,
            self.model_sha256[:12],
            self.input_hw[0],
            self.input_hw[1],
            "dynamic" if self.batch_size is None else f"static {self.batch_size}",
            self.num_classes,
            self.session.get_providers(),
        )

    # ------------------------------------------------------------------ properties
    @property
    def dynamic_batch(self) -> bool:
        return self.batch_size is None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def info(self) -> dict[str, Any]:
        """What a log line or a heartbeat should say about the loaded model."""
        return {
            "model_path": str(self.model_path),
            "model_sha256": self.model_sha256,
            "input_size": self.input_size,
            "input_hw": list(self.input_hw),
            "batch": "dynamic" if self.batch_size is None else self.batch_size,
            "input_dtype": np.dtype(self.input_dtype).name,
            "class_names": self.class_names,
            "providers": self.providers,
            "conf_threshold": self.conf_threshold,
            "iou_threshold": self.iou_threshold,
        }

    # ------------------------------------------------------------------ stages
    def preprocess(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxMeta]]:
        """Letterbox BGR uint8 frames into one NCHW RGB blob scaled to [0, 1]."""
        if len(frames) == 0:
            raise ValueError("preprocess needs at least one frame")
        padded, metas = [], []
        for frame in frames:
            bgr = _as_bgr(frame)
            img, ratio, pad = letterbox(bgr, self.input_hw)
            padded.append(img)
            metas.append(LetterboxMeta(orig_shape=bgr.shape[:2], ratio=ratio, pad=pad))
        batch = padded[0][None] if len(padded) == 1 else np.stack(padded)
        blob = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
        blob /= 255.0
        if self.input_dtype != np.float32:
            blob = blob.astype(self.input_dtype)
        return blob, metas

    def infer(self, blob: np.ndarray) -> np.ndarray:
        """Run the network on a preprocessed blob; returns the raw first output."""
        return self.session.run([self.output_name], {self.input_name: blob})[0]

    def postprocess(self, raw: np.ndarray, metas: Sequence[LetterboxMeta]) -> list[list[Detection]]:
        """Decode raw outputs into per-frame detections in original-frame pixels."""
        raw = np.asarray(raw)
        if raw.ndim != 3 or raw.shape[0] < len(metas):
            raise ValueError(f"raw output of shape {raw.shape} does not cover {len(metas)} frames")
        results = []
        for pred, meta in zip(raw, metas):
            pred = pred.astype(np.float32, copy=False)
            if self.end2end:
                boxes, scores, classes = self._decode_end2end(pred)
            else:
                boxes, scores, classes = self._decode_dense(pred)
            results.append(self._to_detections(boxes, scores, classes, meta))
        return results

    def _dropped_invalid(self, count: int) -> None:
        """Count output rows dropped as invalid (a non-finite box or score, or a box with a
        negative width or height); logged when first seen and then at most every
        ``INVALID_ROWS_LOG_INTERVAL_S`` per detector, never once per frame."""
        if not count:
            return
        self._this_call.invalid = getattr(self._this_call, "invalid", 0) + count
        with self._invalid_lock:
            self.invalid_rows_dropped += count
            now = time.monotonic()
            due = (self._invalid_logged_at is None
                   or now - self._invalid_logged_at >= INVALID_ROWS_LOG_INTERVAL_S)
            if due:
                self._invalid_logged_at = now
            total = self.invalid_rows_dropped
        if due:
            logger.warning(
                "model %s (sha256 %s…) output rows with a non-finite box or score, or a "
                "negative width/height: dropped, %d so far (logged at most every %.0f s)",
                self.model_path.name, self.model_sha256[:12], total,
                INVALID_ROWS_LOG_INTERVAL_S,
            )

    def _decode_dense(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(4 + nc, N) → NMS-ed xyxy boxes in letterbox pixels, scores in [0, 1], class ids.

        A row with a non-finite box or class score, or a width/height < 0, is dropped and
        counted as invalid (NaN boxes and reversed corners must not reach counting or
        redaction); a zero-size row is dropped too, not counted."""
        nc = pred.shape[0] - 4
        class_scores = pred[4 : 4 + nc]
        best = class_scores.max(axis=0)  # NaN when any of the row's scores is NaN
        keep = best > self.conf_threshold  # +inf passes here, NaN and -inf do not
        bad = int(np.count_nonzero(~np.isfinite(best) & ~keep))
        if not keep.any():
            self._dropped_invalid(bad)
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        cand = pred[:, keep]
        scores = best[keep]
        finite = np.isfinite(cand).all(axis=0)
        # A negative size is garbage; a zero one can be a quantized model's honest answer for
        # a tiny object (DFL distances that all rounded to 0): dropped, not counted as invalid.
        sized = finite & (cand[2] >= 0) & (cand[3] >= 0)
        valid = sized & (cand[2] > 0) & (cand[3] > 0)
        if not valid.all():
            bad += int(np.count_nonzero(~sized))
            cand, scores = cand[:, valid], scores[valid]
        self._dropped_invalid(bad)
        classes = cand[4 : 4 + nc].argmax(axis=0)
        xy, half_wh = cand[0:2].T, cand[2:4].T / 2
        boxes = np.concatenate((xy - half_wh, xy + half_wh), axis=1)
        if len(scores) > MAX_NMS_CANDIDATES:
            top = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
            boxes, scores, classes = boxes[top], scores[top], classes[top]
        kept = nms(
            boxes, scores, self.iou_threshold, class_ids=classes, max_det=self.max_detections
        )
        return boxes[kept], np.clip(scores[kept], 0.0, 1.0), classes[kept]

    def _decode_end2end(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 6) rows of x1, y1, x2, y2, score, class from an NMS-fused export; rows with a
        non-finite value or x2 < x1 / y2 < y1 are dropped and counted as invalid, zero-size
        ones dropped; scores in [0, 1]."""
        keep = pred[:, 4] > self.conf_threshold
        rows = pred[keep]
        sized = np.isfinite(rows).all(axis=1) & (rows[:, 2] >= rows[:, 0]) \
            & (rows[:, 3] >= rows[:, 1])
        valid = sized & (rows[:, 2] > rows[:, 0]) & (rows[:, 3] > rows[:, 1])
        bad = int(np.count_nonzero(~sized))  # a zero-size row is dropped, not invalid
        bad += int(np.count_nonzero(~np.isfinite(pred[:, 4]) & ~keep))  # NaN, -inf scores
        self._dropped_invalid(bad)
        rows = rows[valid][: self.max_detections]
        return rows[:, :4].copy(), np.clip(rows[:, 4], 0.0, 1.0), rows[:, 5].astype(np.int64)

    def _to_detections(
        self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, meta: LetterboxMeta
    ) -> list[Detection]:
        if not len(scores):
            return []
        h, w = meta.orig_shape
        boxes = boxes.copy()
        boxes[:, [0, 2]] -= meta.pad[0]
        boxes[:, [1, 3]] -= meta.pad[1]
        boxes[:, [0, 2]] /= meta.ratio[0]
        boxes[:, [1, 3]] /= meta.ratio[1]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return detections_from_arrays(boxes, scores, classes, self.class_names,
                                      self.model_sha256)

    # ------------------------------------------------------------------ public entry points
    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        """Detections on one BGR frame (as ``cv2.imread``/``VideoCapture.read`` return it)."""
        return self.detect_batch([frame_bgr])[0]

    def detect_timed(self, frame_bgr: np.ndarray) -> tuple[list[Detection], StageTimings]:
        """``detect`` with this call's stage times returned instead of kept in
        ``last_timings``: safe to call from several threads at once (ONNX Runtime runs
        concurrent ``run`` calls on one session)."""
        results, timings = self._detect_batch_timed([frame_bgr])
        return results[0], timings

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per frame; uses the batch dimension when the model's is dynamic (or > 1)."""
        results, self.last_timings = self._detect_batch_timed(frames)
        return results

    def _detect_batch_timed(
        self, frames: Sequence[np.ndarray]
    ) -> tuple[list[list[Detection]], StageTimings]:
        frames = list(frames)
        if not frames:
            return [], StageTimings(0.0, 0.0, 0.0, 0)
        self._this_call.invalid = 0
        chunk = self.max_batch_size if self.batch_size is None else self.batch_size
        t_pre = t_inf = t_post = 0.0
        results: list[list[Detection]] = []
        for start in range(0, len(frames), chunk):
            part = frames[start : start + chunk]
            t0 = time.perf_counter()
            blob, metas = self.preprocess(part)
            if self.batch_size is not None and blob.shape[0] < self.batch_size:
                fill = np.zeros(
                    (self.batch_size - blob.shape[0], *blob.shape[1:]), dtype=blob.dtype
                )
                blob = np.concatenate((blob, fill))
            t1 = time.perf_counter()
            raw = self.infer(blob)
            t2 = time.perf_counter()
            results.extend(self.postprocess(raw, metas))
            t3 = time.perf_counter()
            t_pre += t1 - t0
            t_inf += t2 - t1
            t_post += t3 - t2
        return results, StageTimings(t_pre * 1e3, t_inf * 1e3, t_post * 1e3, len(frames),
                                     self._this_call.invalid)

    def __repr__(self) -> str:
        return (
            f"OnnxDetector({os.fspath(self.model_path)!r}, sha256={self.model_sha256[:12]}, "
            f"input={self.input_hw[0]}x{self.input_hw[1]}, classes={self.class_names})"
        )
