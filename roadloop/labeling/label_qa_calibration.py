"""Calibrating cleanlab's label-QA thresholds by measurement (``benchmarks/label_qa.py``).

cleanlab's object-detection checks assume calibrated class probabilities: ``overlooked`` and
``swap`` only look at predicted boxes with probability above 0.95. A YOLO detector's
confidences are not probabilities (the shared checkpoints never exceed ~0.85), so with the
defaults those two checks never fire. Two measured settings replace the defaults:

* :func:`confidence_at_precision` — the model confidence that means what cleanlab's 0.95
  means: the lowest confidence at which the predicted boxes at or above it match a labelled
  box of the same class (IoU ≥ 0.5) at least ``target_precision`` of the time.
* :func:`quality_threshold_for_budget` — an image-level label-quality threshold with a
  false-alarm budget: on a set with its original labels, flag at most ``share`` of the
  images (counting any flagged by other means).

Both are measured on one dataset and the result is reported on another
(``benchmarks/results/label_qa.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_agent.boxes import box_iou_matrix


def confidence_at_precision(
    labels: Sequence[dict[str, Any]],
    predictions: Sequence[Sequence[np.ndarray]],
    *,
    target_precision: float = 0.95,
    iou: float = 0.5,
) -> float:
    """Lowest confidence whose predicted boxes (conf ≥ it) reach ``target_precision``.

    A predicted box is correct when it overlaps a labelled box of its class at IoU ≥ ``iou``.
    Among the prefixes of the predictions sorted by confidence, the longest whose precision
    is at least the target gives the threshold; if none does, the highest confidence (only
    the single most confident box counts as confident). Raises ``ValueError`` without
    predictions.
    """
    confs: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    for lab, pred in zip(labels, predictions):
        boxes = np.asarray(lab["bboxes"], dtype=np.float64).reshape(-1, 4)
        classes = np.asarray(lab["labels"]).reshape(-1)
        for k, arr in enumerate(pred):
            arr = np.asarray(arr, dtype=np.float64).reshape(-1, 5)
            if not len(arr):
                continue
            gt = boxes[classes == k]
            best = box_iou_matrix(arr[:, :4], gt).max(axis=1) if len(gt) else np.zeros(len(arr))
            confs.append(arr[:, 4])
            hits.append(best >= iou)
    if not confs:
        raise ValueError("no predicted boxes to calibrate on")
    conf = np.concatenate(confs)
    hit = np.concatenate(hits)
    order = np.argsort(-conf, kind="stable")
    conf, hit = conf[order], hit[order]
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    ok = np.flatnonzero(precision >= target_precision)
    return float(conf[ok.max()]) if ok.size else float(conf[0])


def quality_threshold_for_budget(
    clean_scores: Sequence[float],
    share: float,
    flagged_anyway: Sequence[bool] | None = None,
) -> float:
    """Image-quality threshold (flag when score < it) keeping flags to ``share`` of images.

    ``clean_scores`` are per-image label quality scores on a set with its original labels,
    ``flagged_anyway`` marks images flagged regardless (by other checks), if any. The
    threshold is halfway between the last score that may be flagged and the next, so that
    at most ``floor(share · n)`` images are flagged in all; 0 when the budget is spent.
    """
    scores = np.asarray(clean_scores, dtype=np.float64)
    anyway = (
        np.zeros(scores.shape, bool)
        if flagged_anyway is None
        else np.asarray(flagged_anyway, dtype=bool)
    )
    if scores.shape != anyway.shape:
        raise ValueError("clean_scores and flagged_anyway differ in length")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    allowed = math.floor(share * len(scores) + 1e-9) - int(anyway.sum())
    rest = np.sort(scores[~anyway])
    if allowed <= 0 or rest.size == 0:
        return 0.0
    if allowed >= rest.size:
        return float(np.nextafter(rest[-1], np.inf))
    return float((rest[allowed - 1] + rest[allowed]) / 2)


__all__ = ["confidence_at_precision", "quality_threshold_for_budget"]
