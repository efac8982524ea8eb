"""The serving graph's postprocessing as an ONNX graph: the detector's raw output → each
image's best detections after class-aware NMS, mapped back through the letterbox."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.inference import _letterbox_params
from roadloop.serving.onnx_builder import GraphBuilder, model_like

POST_PREFIX = "serve_post/"
NMS_CHUNK = 8  # images per NonMaxSuppression batch row (when the batch divides)
GROUP_COLUMNS = 16  # (image, class) groups per row of the offset grid
MAX_CANDIDATES = 4096  # anchors per image that enter NMS, best first


def postprocess_model(
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
    nms_chunk: int = NMS_CHUNK,
) -> tuple[onnx.ModelProto, int]:
    """Raw ``[B, 4 + nc, N]`` → fixed-size, letterbox-undone detections per image.

    ONNX ``NonMaxSuppression`` runs per (batch row, class), and ONNX Runtime's CUDA kernel
    waits for the device twice per pair: at batch 32 with 4 classes that is 128 round trips
    per batch. So the graph folds them together, the way batched NMS is usually done (as
    torchvision's ``batched_nms`` or Ultralytics' class offsets): every candidate box is moved
    by an offset unique to its (image, class) group, so that boxes of different groups can
    never overlap and one NMS call over all of them equals one call per group. Groups are
    laid out on a grid ``GROUP_COLUMNS`` wide of squares ``4 × input size`` apart, boxes first
    clipped to ``[-size, 2 × size]`` so none can reach a neighbour (such boxes are absurd
    anyway; the output is clipped to the frame). The NMS batch dimension holds chunks of
    ``nms_chunk`` images when the batch is a multiple of it, else one image each, and only
    each image's best ``max_candidates`` anchors enter NMS: the kernel's suppression mask
    grows with the square of the boxes it sees, so both keep it bounded (≤ 8 × 4096 boxes).
    """
    h, w = frame_hw
    (new_w, new_h), (top, _, left, _) = _letterbox_params(frame_hw, input_hw)
    cand = min(max_candidates, anchors)
    k = min(max_det, cand)
    size = float(max(input_hw))
    b = GraphBuilder(POST_PREFIX)
    raw = POST_PREFIX + "raw"

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
        cand_anchor = POST_PREFIX + "cand_1"
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
        [b.op("Mod", [n_img, const_i("chunk_c", nms_chunk)], "rem"), const_i("zero_i", 0)],
        "divisible",
    )
    chunk = b.op(
        "Where", [divisible, const_i("chunk_v", nms_chunk), const_i("one_i", 1)], "chunk"
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
        cell = b.op(op, [group, const_i(name + "_cols", GROUP_COLUMNS)], name + "_cell")
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
            const_i("max_out", nms_chunk * cand),
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
    top_pos = POST_PREFIX + "topk_1"  # sorted descending; padding rows score 0
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
    b.nodes.append(helper.make_node("Mul", [clipped, valid3], ["boxes"], name=POST_PREFIX + "boxes_out"))
    b.nodes.append(
        helper.make_node("Identity", [top_scores], ["scores"], name=POST_PREFIX + "scores_out")
    )
    b.nodes.append(
        helper.make_node(
            "Where",
            [valid, class_of, b.const("no_class", np.array(-1, np.int64))],
            ["classes"],
            name=POST_PREFIX + "classes_out",
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
            name=POST_PREFIX + "count_out",
        )
    )
    model = model_like(
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
