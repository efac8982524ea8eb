"""A "serving graph": one ONNX model that takes raw camera frames and returns final detections.

On a GPU the exported detector alone is fast; what holds end-to-end throughput down is the
per-frame work around it on the CPU (letterbox, float conversion, NMS). This module composes,
with ``onnx.compose``, three graphs into one, so that the whole path runs on the execution
provider that runs the network (CUDA for a GPU box):

``frames`` uint8 ``[B, H, W, 3]`` BGR at one fixed camera resolution (what OpenCV decodes)
→ Cast → NCHW → BGR→RGB → Resize (bilinear, half-pixel, as ``cv2.resize``) → Round → Pad
(grey 114, centred) → ÷255 → **the detector** (Ultralytics export, not NMS-fused, optionally
converted to fp16 with fp32 I/O) → decode cx,cy,w,h → best class per anchor (as
Ultralytics' single-label NMS) → each image's best ``max_candidates`` anchors →
``NonMaxSuppression`` per (image, class), folded into few calls by coordinate offsets (see
``_postprocess_model``) → top ``max_det`` per image → boxes mapped back through the
letterbox into frame pixels.

Outputs, fixed size so they can be pre-bound: ``boxes`` float ``[B, K, 4]`` (x1, y1, x2, y2
in frame pixels), ``scores`` float ``[B, K]`` (descending), ``classes`` int64 ``[B, K]`` and
``count`` int64 ``[B]``; rows at or past ``count`` are padding (score 0, class -1, box 0).

The letterbox geometry is the edge agent's (``edge_agent.inference``), so detections match
:class:`edge_agent.inference.OnnxDetector` on the same frames up to resize rounding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.inference import (
    DEFAULT_CONF_THRESHOLD,
    DEFAULT_IOU_THRESHOLD,
    _letterbox_params,
    _parse_names,
)
from roadloop.errors import InvalidInputError
from roadloop.fsutil import atomic_path, sha256_file

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16"]
FRAMES_INPUT = "frames"
OUTPUTS = ("boxes", "scores", "classes", "count")
PAD_VALUE = 114.0
MIN_OPSET = 13  # Unsqueeze/ReduceSum take axes as inputs from 13 on
_PRE, _POST = "serve_pre/", "serve_post/"
_NMS_CHUNK = 8  # images per NonMaxSuppression batch row (when the batch divides)
_GROUP_COLUMNS = 16  # (image, class) groups per row of the offset grid
MAX_CANDIDATES = 4096  # anchors per image that enter NMS, best first


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


class _Builder:
    """Collects nodes and constants under one name prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        full = self.prefix + name
        self.inits.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str:
        outs = (
            [self.prefix + name]
            if n_out == 1
            else [f"{self.prefix}{name}_{i}" for i in range(n_out)]
        )
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.prefix + name + "_node", **attrs)
        )
        return outs[0]


def _model(b: _Builder, inputs, outputs, like: onnx.ModelProto, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    return model


def _preprocess_model(
    frame_hw: tuple[int, int],
    input_hw: tuple[int, int],
    batch: int | str,
    like: onnx.ModelProto,
    *,
    resize_first: bool = False,
) -> onnx.ModelProto:
    """uint8 BGR NHWC frames → the detector's float NCHW RGB input, letterboxed.

    ``resize_first=False``: Cast to float → NCHW → RGB → Resize → Round, so the resize works
    on float pixels as ``cv2.resize`` rounds its uint8 result. ``True``: NCHW and Resize on
    the uint8 frames (ONNX Runtime has uint8 ``Resize`` kernels on CPU and CUDA), then RGB and
    Cast on the resized image only: a quarter or less of the pixels go through the float
    steps, and pixels may differ from ``cv2.resize``'s by one grey level (its own rounding).
    """
    h, w = frame_hw
    (new_w, new_h), (top, bottom, left, right) = _letterbox_params(frame_hw, input_hw)
    b = _Builder(_PRE)
    rgb_order = b.const("rgb_order", np.array([2, 1, 0], np.int64))
    if resize_first:
        x = b.op("Transpose", [FRAMES_INPUT], "nchw", perm=[0, 3, 1, 2])
    else:
        x = b.op("Cast", [FRAMES_INPUT], "float", to=TensorProto.FLOAT)
        x = b.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
        x = b.op("Gather", [x, rgb_order], "rgb", axis=1)
    if (new_h, new_w) != (h, w):
        shape = b.op("Shape", [x], "shape")
        nc = b.op(
            "Slice",
            [
                shape,
                b.const("zero", np.array([0], np.int64)),
                b.const("two", np.array([2], np.int64)),
            ],
            "nc",
        )
        sizes = b.op(
            "Concat", [nc, b.const("new_hw", np.array([new_h, new_w], np.int64))], "sizes", axis=0
        )
        x = b.op(
            "Resize",
            [x, "", "", sizes],
            "resized",
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        )
        if not resize_first:
            x = b.op("Round", [x], "rounded")  # cv2.resize on uint8 rounds to whole levels
    if resize_first:
        x = b.op("Gather", [x, rgb_order], "rgb", axis=1)
        x = b.op("Cast", [x], "float", to=TensorProto.FLOAT)
    if top or bottom or left or right:
        pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
        x = b.op(
            "Pad",
            [x, b.const("pads", pads), b.const("pad_value", np.array(PAD_VALUE, np.float32))],
            "padded",
            mode="constant",
        )
    b.op("Div", [x, b.const("scale", np.array(255.0, np.float32))], "pixels")
    ih, iw = input_hw
    return _model(
        b,
        [helper.make_tensor_value_info(FRAMES_INPUT, TensorProto.UINT8, [batch, h, w, 3])],
        [helper.make_tensor_value_info(_PRE + "pixels", TensorProto.FLOAT, [batch, 3, ih, iw])],
        like,
        "serving_preprocess",
    )


def _postprocess_model(
    frame_hw: tuple[int, int],
    input_hw: tuple[int, int],
    batch: int | str,
    num_classes: int,
    anchors: int,
    *,
    conf: float,
    iou: float,
    max_det: int,
    max_candidates: int,
    like: onnx.ModelProto,
) -> tuple[onnx.ModelProto, int]:
    """Raw ``[B, 4 + nc, N]`` → fixed-size, letterbox-undone detections per image.

    ONNX ``NonMaxSuppression`` runs per (batch row, class), and ONNX Runtime's CUDA kernel
    waits for the device twice per pair: at batch 32 with 4 classes that is 128 round trips
    per batch. So the graph folds them together, the way batched NMS is usually done (as
    torchvision's ``batched_nms`` or Ultralytics' class offsets): every candidate box is moved
    by an offset unique to its (image, class) group, so that boxes of different groups can
    never overlap and one NMS call over all of them equals one call per group. Groups are
    laid out on a grid ``_GROUP_COLUMNS`` wide of squares ``4 × input size`` apart, boxes first
    clipped to ``[-size, 2 × size]`` so none can reach a neighbour (such boxes are absurd
    anyway; the output is clipped to the frame). The NMS batch dimension holds chunks of
    ``_NMS_CHUNK`` images when the batch is a multiple of it, else one image each, and only
    each image's best ``max_candidates`` anchors enter NMS: the kernel's suppression mask
    grows with the square of the boxes it sees, so both keep it bounded (≤ 8 × 4096 boxes).
    """
    h, w = frame_hw
    (new_w, new_h), (top, _, left, _) = _letterbox_params(frame_hw, input_hw)
    cand = min(max_candidates, anchors)
    k = min(max_det, cand)
    size = float(max(input_hw))
    b = _Builder(_POST)
    raw = _POST + "raw"

    def const_i(name: str, *values: int) -> str:
        return b.const(name, np.array(values, np.int64))

    def channels(lo: int, hi: int, name: str) -> str:
        return b.op(
            "Slice",
            [raw, const_i(name + "_lo", lo), const_i(name + "_hi", hi), const_i(name + "_axis", 1)],
            name,
        )

    def gather_rows(data: str, index: str, name: str) -> str:
        """``data[b, index[b, j], :]`` for ``[B, n, 4]`` data and ``[B, m]`` indices."""
        index3 = b.op("Unsqueeze", [index, const_i(name + "_ax", 2)], name + "_i3")
        to = b.op(
            "Concat",
            [b.op("Shape", [index], name + "_shape"), const_i(name + "_4", 4)],
            name + "_to",
            axis=0,
        )
        return b.op(
            "GatherElements", [data, b.op("Expand", [index3, to], name + "_ix")], name, axis=1
        )

    xy, wh, cls = channels(0, 2, "xy"), channels(2, 4, "wh"), channels(4, 4 + num_classes, "cls")
    half = b.op("Div", [wh, b.const("two_f", np.array(2.0, np.float32))], "half_wh")
    x1y1 = b.op("Sub", [xy, half], "x1y1")
    x2y2 = b.op("Add", [xy, half], "x2y2")
    xyxy = b.op("Concat", [x1y1, x2y2], "xyxy_c", axis=1)
    boxes = b.op("Transpose", [xyxy], "boxes_n4", perm=[0, 2, 1])  # [B, N, 4]
    # Single label, as Ultralytics: each anchor competes only in its best class.
    best3 = b.op("ArgMax", [cls], "best_class", axis=1, keepdims=1)  # [B, 1, N]
    best_score3 = b.op("GatherElements", [cls, best3], "best_score", axis=1)  # [B, 1, N]
    anchors_shape = const_i("bn_shape", -1, anchors)
    best = b.op("Reshape", [best3, anchors_shape], "best2")  # [B, N]
    best_score = b.op("Reshape", [best_score3, anchors_shape], "best_score2")  # [B, N]
    if cand < anchors:  # each image's best candidates only
        cand_score = b.op("TopK", [best_score, const_i("cand_k", cand)], "cand", n_out=2, axis=1)
        cand_anchor = _POST + "cand_1"
        cand_class = b.op("GatherElements", [best, cand_anchor], "cand_class", axis=1)
        cand_boxes = gather_rows(boxes, cand_anchor, "cand_boxes")
    else:
        cand_score, cand_class, cand_boxes = best_score, best, boxes
        cand_anchor = None
    # Group of each candidate: (its image's place in its NMS chunk, its class).
    n_img = b.op(
        "Slice",
        [b.op("Shape", [cand_score], "cand_shape"), const_i("z", 0), const_i("o", 1)],
        "n_img",
    )  # [1]: B
    divisible = b.op(
        "Equal",
        [b.op("Mod", [n_img, const_i("chunk_c", _NMS_CHUNK)], "rem"), const_i("zero_i", 0)],
        "divisible",
    )
    chunk = b.op(
        "Where", [divisible, const_i("chunk_v", _NMS_CHUNK), const_i("one_i", 1)], "chunk"
    )  # [1]
    img = b.op(
        "Range",
        [
            b.const("zero_s", np.array(0, np.int64)),
            b.op("Squeeze", [n_img, const_i("sq_ax", 0)], "n_img_s"),
            b.const("one_s", np.array(1, np.int64)),
        ],
        "img",
    )  # [B]
    slot = b.op("Reshape", [b.op("Mod", [img, chunk], "slot1"), const_i("col", -1, 1)], "slot")
    group = b.op(
        "Add", [b.op("Mul", [slot, const_i("nc", num_classes)], "slot_nc"), cand_class], "group"
    )  # [B, cand]
    span = b.const("span", np.array(4.0 * size, np.float32))

    def grid(op: str, name: str) -> str:
        """The group's grid column (``Mod``) or row (``Div``) × span, as ``[B, cand, 1]``."""
        cell = b.op(op, [group, const_i(name + "_cols", _GROUP_COLUMNS)], name + "_cell")
        cell_f = b.op("Cast", [cell], name + "_cell_f", to=TensorProto.FLOAT)
        scaled = b.op("Mul", [cell_f, span], name)
        return b.op("Unsqueeze", [scaled, const_i(name + "_ax", 2)], name + "3")

    gx3, gy3 = grid("Mod", "gx"), grid("Div", "gy")
    offsets = b.op("Concat", [gx3, gy3, gx3, gy3], "offsets", axis=2)  # [B, cand, 4]
    clipped_in = b.op(
        "Clip",
        [
            cand_boxes,
            b.const("clip_lo", np.array(-size, np.float32)),
            b.const("clip_hi", np.array(2.0 * size, np.float32)),
        ],
        "nms_clip",
    )
    shifted = b.op("Add", [clipped_in, offsets], "shifted")
    n_chunks = b.op("Div", [n_img, chunk], "n_chunks")
    nms_boxes = b.op(
        "Reshape",
        [
            shifted,
            b.op(
                "Concat",
                [n_chunks, const_i("m1a", -1), const_i("four_a", 4)],
                "nms_boxes_shape",
                axis=0,
            ),
        ],
        "nms_boxes",
    )
    nms_scores = b.op(
        "Reshape",
        [
            cand_score,
            b.op(
                "Concat",
                [n_chunks, const_i("one_b", 1), const_i("m1b", -1)],
                "nms_scores_shape",
                axis=0,
            ),
        ],
        "nms_scores",
    )
    selected = b.op(
        "NonMaxSuppression",
        [
            nms_boxes,
            nms_scores,
            const_i("max_out", _NMS_CHUNK * cand),
            b.const("iou", np.array([iou], np.float32)),
            b.const("conf", np.array([conf], np.float32)),
        ],
        "selected",
    )  # [M, 3]: (chunk, 0, position in chunk)
    chunk_of = b.op(
        "Gather", [selected, b.const("col0", np.array(0, np.int64))], "chunk_of", axis=1
    )
    pos = b.op("Gather", [selected, b.const("col2", np.array(2, np.int64))], "pos", axis=1)
    per_chunk = b.op("Mul", [chunk, const_i("cand_n", cand)], "per_chunk")
    flat = b.op("Add", [b.op("Mul", [chunk_of, per_chunk], "chunk_start"), pos], "flat_pos")
    flat_idx = b.op("Unsqueeze", [flat, const_i("flat_ax", 1)], "flat_idx")  # [M, 1]
    flat_scores = b.op("Reshape", [cand_score, const_i("all", -1)], "flat_scores")
    kept = b.op("GatherND", [flat_scores, flat_idx], "kept_scores")
    zeros = b.op(
        "ConstantOfShape",
        [b.op("Shape", [flat_scores], "flat_shape")],
        "zeros",
        value=numpy_helper.from_array(np.array([0.0], np.float32)),
    )
    dense = b.op(
        "Reshape",
        [b.op("ScatterND", [zeros, flat_idx, kept], "dense1"), const_i("bc_shape", -1, cand)],
        "dense",
    )  # [B, cand]
    top_scores = b.op("TopK", [dense, const_i("k", k)], "topk", n_out=2, axis=1)
    top_pos = _POST + "topk_1"  # sorted descending; padding rows score 0
    anchor_of = (
        top_pos
        if cand_anchor is None
        else b.op("GatherElements", [cand_anchor, top_pos], "anchor_of", axis=1)
    )
    class_of = b.op("GatherElements", [best, anchor_of], "class_of", axis=1)
    picked = gather_rows(boxes, anchor_of, "picked")  # [B, K, 4]
    valid = b.op("Greater", [top_scores, b.const("zero_g", np.array(0.0, np.float32))], "valid")
    # Undo the letterbox exactly as OnnxDetector._to_detections does: -pad, /ratio, clip.
    ratio = (new_w / w, new_h / h)
    offset = np.array([left, top, left, top], np.float32)
    scale = np.array([ratio[0], ratio[1], ratio[0], ratio[1]], np.float32)
    limit = np.array([w, h, w, h], np.float32)
    mapped = b.op(
        "Div",
        [b.op("Sub", [picked, b.const("pad", offset)], "unpad"), b.const("ratio", scale)],
        "mapped",
    )
    clipped = b.op(
        "Min",
        [
            b.op("Max", [mapped, b.const("low", np.array(0.0, np.float32))], "clip_low"),
            b.const("high", limit),
        ],
        "clipped",
    )
    valid3 = b.op(
        "Unsqueeze",
        [
            b.op("Cast", [valid], "valid_f", to=TensorProto.FLOAT),
            b.const("axis2b", np.array([2], np.int64)),
        ],
        "valid3",
    )
    b.nodes.append(helper.make_node("Mul", [clipped, valid3], ["boxes"], name=_POST + "boxes_out"))
    b.nodes.append(
        helper.make_node("Identity", [top_scores], ["scores"], name=_POST + "scores_out")
    )
    b.nodes.append(
        helper.make_node(
            "Where",
            [valid, class_of, b.const("no_class", np.array(-1, np.int64))],
            ["classes"],
            name=_POST + "classes_out",
        )
    )
    b.nodes.append(
        helper.make_node(
            "ReduceSum",
            [
                b.op("Cast", [valid], "valid_i", to=TensorProto.INT64),
                b.const("axis1", np.array([1], np.int64)),
            ],
            ["count"],
            keepdims=0,
            name=_POST + "count_out",
        )
    )
    model = _model(
        b,
        [helper.make_tensor_value_info(raw, TensorProto.FLOAT, [batch, 4 + num_classes, anchors])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, k, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, k]),
            helper.make_tensor_value_info("classes", TensorProto.INT64, [batch, k]),
            helper.make_tensor_value_info("count", TensorProto.INT64, [batch]),
        ],
        like,
        "serving_postprocess",
    )
    return model, k


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """A tensor's dims: ints where static, the symbol (or "?") where dynamic."""
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


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
    resize_first: bool = False,
) -> ServingGraphInfo:
    """Compose preprocess → ``detector_path`` → NMS into ``out_path`` for ``frame_hw`` frames.

    The detector is an Ultralytics ONNX export without NMS (``roadloop.models.export``): static
    height/width, static or dynamic batch; the serving graph takes the same batch. One graph
    serves one camera resolution: cameras of another size need a graph of their own.
    ``resize_first`` resizes the uint8 frames before any float step (``_preprocess_model``).
    """
    detector_path, out_path = Path(detector_path), Path(out_path)
    fh, fw = (int(v) for v in frame_hw)
    if fh < 1 or fw < 1:
        raise ValueError(f"frame_hw must be positive, got {frame_hw}")
    if not 0.0 <= conf_threshold < 1.0 or not 0.0 <= iou_threshold <= 1.0:
        raise ValueError("conf_threshold must be in [0, 1) and iou_threshold in [0, 1]")
    if max_detections < 1 or max_candidates < 1:
        raise ValueError("max_detections and max_candidates must be >= 1")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if not detector_path.is_file():
        raise InvalidInputError(detector_path, "no such detector file")
    try:
        detector = onnx.load(str(detector_path))
    except Exception as exc:  # protobuf raises several types for a bad file
        raise InvalidInputError(detector_path, f"not an ONNX model ({exc})") from exc
    in_shape, out_shape = _dims(detector.graph.input[0]), _dims(detector.graph.output[0])
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

    pre = _preprocess_model((fh, fw), input_hw, batch_dim, detector, resize_first=resize_first)
    post, k = _postprocess_model(
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
    )
    # Detector tensors get a prefix so that no name of ours can collide with an export's.
    det_in = detector.graph.input[0].name
    det_out = detector.graph.output[0].name
    detector = onnx.compose.add_prefix(detector, "det/")
    for extra in list(detector.graph.output)[1:]:
        detector.graph.output.remove(extra)  # only the raw head output feeds NMS
    merged = onnx.compose.merge_models(pre, detector, io_map=[(_PRE + "pixels", "det/" + det_in)])
    merged = onnx.compose.merge_models(merged, post, io_map=[("det/" + det_out, _POST + "raw")])
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
            "serving_resize": "uint8_first" if resize_first else "float",
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
