"""A "serving graph": one ONNX model that takes raw camera frames and returns final detections.

On a GPU the exported detector alone is fast; what holds end-to-end throughput down is the
per-frame work around it on the CPU (letterbox, float conversion, NMS). This module composes,
with ``onnx.compose``, three graphs into one, so that the whole path runs on the execution
provider that runs the network (CUDA for a GPU box):

``frames`` uint8 ``[B, H, W, 3]`` BGR at one fixed camera resolution (what OpenCV decodes)
→ Cast → NCHW → BGR→RGB → Resize (bilinear, half-pixel, as ``cv2.resize``) → Round → ÷255
→ Pad (grey 114/255, centred) (the default ``resize``; ``letterbox`` has the others) →
**the detector** (Ultralytics export, not NMS-fused, optionally converted to fp16 with fp32
I/O) → decode cx,cy,w,h → best class per anchor (as
Ultralytics' single-label NMS) → each image's best ``max_candidates`` anchors →
``NonMaxSuppression`` per (image, class), folded into few calls by coordinate offsets (see
``roadloop.serving.nms``) → top ``max_det`` per image → boxes mapped back through the
letterbox into frame pixels.

Outputs, fixed size so they can be pre-bound: ``boxes`` float ``[B, K, 4]`` (x1, y1, x2, y2
in frame pixels), ``scores`` float ``[B, K]`` (descending), ``classes`` int64 ``[B, K]`` and
``count`` int64 ``[B]``; rows at or past ``count`` are padding (score 0, class -1, box 0).

The letterbox geometry is the edge agent's (``edge_agent.inference``), so detections match
:class:`edge_agent.inference.OnnxDetector` on the same frames up to resize rounding. The
preprocessing graph is built by ``roadloop.serving.letterbox``, the postprocessing by
``roadloop.serving.nms``; this module checks the detector, composes the three and records
what the result expects in its metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from edge_agent.inference import (
    DEFAULT_CONF_THRESHOLD,
    DEFAULT_IOU_THRESHOLD,
    _parse_names,
)
from roadloop.errors import InvalidInputError
from roadloop.fsutil import atomic_path, sha256_file
from roadloop.serving.letterbox import (
    FRAMES_INPUT,
    PAD_VALUE,
    PRE_PREFIX,
    RESIZE_MODES,
    ResizeMode,
    preprocess_model,
)
from roadloop.serving.nms import MAX_CANDIDATES, NMS_CHUNK, POST_PREFIX, postprocess_model
from roadloop.serving.onnx_builder import dims

logger = logging.getLogger(__name__)

__all__ = [  # the preprocessing's and NMS's names that callers of the whole graph use too
    "FRAMES_INPUT",
    "MAX_CANDIDATES",
    "OUTPUTS",
    "PAD_VALUE",
    "RESIZE_MODES",
    "ResizeMode",
    "ServingGraphInfo",
    "build_serving_graph",
    "to_fp16",
]

Precision = Literal["fp32", "fp16"]
OUTPUTS = ("boxes", "scores", "classes", "count")
MIN_OPSET = 13  # Unsqueeze/ReduceSum take axes as inputs from 13 on


@dataclass(frozen=True, slots=True)
class ServingGraphInfo:
    """What a built serving graph expects and returns (a dataclass, not pydantic: a GPU
    serving box needs only onnx, onnxruntime, numpy and OpenCV to build and run one)."""

    path: Path
    sha256: str
    source_sha256: str  # the detector it wraps
    frame_hw: tuple[int, int]  # camera frames it takes, (height, width)
    input_hw: tuple[int, int]  # the detector's input, (height, width)
    batch: int | None  # None: any batch size
    precision: Precision
    class_names: list[str]
    conf_threshold: float
    iou_threshold: float
    max_detections: int  # K, the rows of each image's outputs


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The detector with fp16 weights and compute, fp32 input and output (ONNX Runtime's
    converter; its default block list keeps Resize and friends in fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    converted.topological_sort()  # the converter appends its I/O casts last
    return converted.model


def build_serving_graph(
    detector_path: Path,
    out_path: Path,
    *,
    frame_hw: tuple[int, int],
    conf_threshold: float = DEFAULT_CONF_THRESHOLD,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    max_detections: int = 300,
    precision: Precision = "fp32",
    max_candidates: int = MAX_CANDIDATES,
    resize: ResizeMode = "float",
    nms_chunk: int = NMS_CHUNK,
) -> ServingGraphInfo:
    """Compose preprocess → ``detector_path`` → NMS into ``out_path`` for ``frame_hw`` frames.

    The detector is an Ultralytics ONNX export without NMS (``roadloop.models.export``): static
    height/width, static or dynamic batch; the serving graph takes the same batch. One graph
    serves one camera resolution: cameras of another size need a graph of their own.
    ``resize`` chooses how the frames are scaled down (``_preprocess_model``): ``"float"``
    (the default), ``"uint8_first"`` (faster on CPU; wrong on ONNX Runtime's CUDA provider,
    where ``ServingSession`` refuses it) or ``"separable"``. ``nms_chunk`` images share one
    NonMaxSuppression row when the batch is a multiple of it (``roadloop.serving.nms``).
    """
    detector_path, out_path = Path(detector_path), Path(out_path)
    fh, fw = (int(v) for v in frame_hw)
    if fh < 1 or fw < 1:
        raise ValueError(f"frame_hw must be positive, got {frame_hw}")
    if not 0.0 <= conf_threshold < 1.0 or not 0.0 <= iou_threshold <= 1.0:
        raise ValueError("conf_threshold must be in [0, 1) and iou_threshold in [0, 1]")
    if max_detections < 1 or max_candidates < 1 or nms_chunk < 1:
        raise ValueError("max_detections, max_candidates and nms_chunk must be >= 1")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if not detector_path.is_file():
        raise InvalidInputError(detector_path, "no such detector file")
    try:
        detector = onnx.load(str(detector_path))
    except Exception as exc:  # protobuf raises several types for a bad file
        raise InvalidInputError(detector_path, f"not an ONNX model ({exc})") from exc
    in_shape, out_shape = dims(detector.graph.input[0]), dims(detector.graph.output[0])
    if len(in_shape) != 4 or len(out_shape) != 3:
        raise InvalidInputError(
            detector_path, f"expected NCHW in, (B, 4 + nc, N) out; got {in_shape} → {out_shape}"
        )
    batch_dim, _, ih, iw = in_shape
    _, out_c, anchors = out_shape
    if not all(isinstance(v, int) for v in (ih, iw, out_c, anchors)) or int(out_c) < 5:
        raise InvalidInputError(
            detector_path, f"height/width/channels/anchors must be static: {in_shape} → {out_shape}"
        )
    input_hw = (int(ih), int(iw))
    opset = next((o.version for o in detector.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise InvalidInputError(detector_path, f"opset {opset} < {MIN_OPSET}")
    nc, anchors = int(out_c) - 4, int(anchors)
    meta = {p.key: p.value for p in detector.metadata_props}
    class_names = _parse_names(meta.get("names")) or [f"class{i}" for i in range(nc)]
    source_sha256 = sha256_file(detector_path)
    if precision == "fp16":
        detector = to_fp16(detector)

    pre = preprocess_model((fh, fw), input_hw, batch_dim, detector, resize=resize)
    post, k = postprocess_model(
        (fh, fw),
        input_hw,
        batch_dim,
        nc,
        anchors,
        conf=float(conf_threshold),
        iou=float(iou_threshold),
        max_det=int(max_detections),
        max_candidates=int(max_candidates),
        like=detector,
        nms_chunk=int(nms_chunk),
    )
    # Detector tensors get a prefix so that no name of ours can collide with an export's.
    det_in = detector.graph.input[0].name
    det_out = detector.graph.output[0].name
    detector = onnx.compose.add_prefix(detector, "det/")
    for extra in list(detector.graph.output)[1:]:
        detector.graph.output.remove(extra)  # only the raw head output feeds NMS
    merged = onnx.compose.merge_models(pre, detector, io_map=[(PRE_PREFIX + "pixels", "det/" + det_in)])
    merged = onnx.compose.merge_models(merged, post, io_map=[("det/" + det_out, POST_PREFIX + "raw")])
    merged.ir_version = detector.ir_version
    meta.update(
        {
            "serving_graph": "1",
            "serving_frame_hw": json.dumps([fh, fw]),
            "serving_input_hw": json.dumps(list(input_hw)),
            "serving_precision": precision,
            "serving_conf": repr(float(conf_threshold)),
            "serving_iou": repr(float(iou_threshold)),
            "serving_max_det": str(k),
            "serving_max_candidates": str(min(int(max_candidates), anchors)),
            "serving_nms_chunk": str(int(nms_chunk)),
            "serving_resize": resize,
            "serving_source_sha256": source_sha256,
        }
    )
    del merged.metadata_props[:]
    for key, value in meta.items():
        merged.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    merged.graph.name = "roadloop_serving"
    onnx.checker.check_model(merged)
    with atomic_path(out_path, parents=True, suffix=".onnx") as tmp:
        onnx.save(merged, str(tmp))
    logger.info(
        "serving graph %s: %dx%d frames → %s %s, batch %s, K=%d",
        out_path,
        fh,
        fw,
        detector_path.name,
        precision,
        batch_dim,
        k,
    )
    return ServingGraphInfo(
        path=out_path,
        sha256=sha256_file(out_path),
        source_sha256=source_sha256,
        frame_hw=(fh, fw),
        input_hw=input_hw,
        batch=batch_dim if isinstance(batch_dim, int) else None,
        precision=precision,
        class_names=class_names,
        conf_threshold=float(conf_threshold),
        iou_threshold=float(iou_threshold),
        max_detections=k,
    )
