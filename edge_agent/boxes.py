"""Box geometry and class-wise non-maximum suppression in numpy (no torch on the edge)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Up to this many candidates, NMS uses one pairwise IoU matrix (n² memory); beyond, a loop.
MATRIX_NMS_MAX_BOXES = 1024


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes (0 when either is empty)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def box_iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against an (N, 4) array of xyxy boxes."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (N, 4) against (M, 4) xyxy boxes; 0 where the union is empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).prod(1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=float), where=union > 0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    class_ids: np.ndarray | None = None,
    max_det: int | None = None,
) -> np.ndarray:
    """Greedy NMS; returns kept indices, highest score first.

    A box is suppressed when its IoU with a kept, higher-scoring box of the *same class*
    exceeds ``iou_threshold`` (strictly, as torchvision does). ``class_ids=None`` makes it
    class-agnostic. Boxes are xyxy.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(scores) != len(boxes):
        raise ValueError(
            f"boxes must be (N, 4) with N scores, got {boxes.shape} and {scores.shape}"
        )
    order = np.argsort(-scores, kind="stable")
    if len(order) <= MATRIX_NMS_MAX_BOXES:
        return _nms_matrix(boxes, order, iou_threshold, class_ids, max_det)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if max_det is not None and len(keep) >= max_det:
            break
        rest = order[1:]
        if not rest.size:
            break
        overlap = box_iou_one_to_many(boxes[i], boxes[rest]) > iou_threshold
        if class_ids is not None:
            overlap &= class_ids[rest] == class_ids[i]
        order = rest[~overlap]
    return np.asarray(keep, dtype=np.int64)


def _nms_matrix(
    boxes: np.ndarray,
    order: np.ndarray,
    iou_threshold: float,
    class_ids: np.ndarray | None,
    max_det: int | None,
) -> np.ndarray:
    """Same greedy result from one pairwise IoU matrix: faster for the few hundred candidates
    a frame has after the confidence filter (the loop touches only boolean rows)."""
    b = boxes[order]
    lt = np.maximum(b[:, None, :2], b[None, :, :2])
    rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area[:, None] + area[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        over = np.where(union > 0, inter / union, 0.0) > iou_threshold
    if class_ids is not None:
        c = class_ids[order]
        over &= c[:, None] == c[None, :]
    over = np.triu(over, 1)  # only a higher-scoring box suppresses a lower one
    suppressed = np.zeros(len(b), dtype=bool)
    keep: list[int] = []
    for i in range(len(b)):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_det is not None and len(keep) >= max_det:
            break
        suppressed |= over[i]
    return order[np.asarray(keep, dtype=np.int64)]
