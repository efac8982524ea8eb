"""Editable pre-annotations (the ``ground_truth`` draft) from the model's boxes.

The review queue shows two label sets: ``predictions`` (every box the model gave, read-only)
and ``ground_truth`` (what annotators correct). The draft should ask for as little deleting
as possible, so it keeps only boxes at or above ``min_confidence`` and drops duplicates of
one object under two classes (a car that is also a truck) with class-agnostic NMS
(OpenCV's ``cv2.dnn.NMSBoxes``): of overlapping boxes, the most confident one stays.

``DEFAULT_DRAFT_CONF`` is the confidence that maximises F1 of this draft against the atl_v2
val labels with the shipped checkpoint (``docs/review.md`` has the measurement).
"""

from __future__ import annotations

from collections.abc import Sequence

from roadloop.labeling.review_items import ReviewBox

DEFAULT_DRAFT_CONF = 0.40
"""Boxes below this confidence stay in ``predictions`` but not in the draft."""
DEFAULT_DRAFT_NMS_IOU = 0.5
"""Class-agnostic NMS: of two boxes overlapping more than this, only the more confident
one enters the draft (whatever their classes)."""


def draft_boxes(
    boxes: Sequence[ReviewBox],
    *,
    min_confidence: float = DEFAULT_DRAFT_CONF,
    nms_iou: float = DEFAULT_DRAFT_NMS_IOU,
) -> list[ReviewBox]:
    """The draft of ``boxes`` (relative ``[x, y, w, h]``): confident boxes, one per object,
    in their original order, without confidences (an annotator's box has none).

    A box without a confidence (already a human label) is always kept and never suppressed.
    """
    import cv2

    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
    human = [i for i, b in enumerate(boxes) if b.confidence is None]
    scored = [
        i
        for i, b in enumerate(boxes)
        if b.confidence is not None and b.confidence >= min_confidence
    ]
    keep = set(human)
    if scored:
        kept = cv2.dnn.NMSBoxes(
            [list(boxes[i].box) for i in scored],
            [float(boxes[i].confidence) for i in scored],  # type: ignore[arg-type]
            0.0,
            float(nms_iou),
        )
        keep.update(scored[int(k)] for k in kept)
    return [boxes[i].model_copy(update={"confidence": None}) for i in sorted(keep)]


__all__ = ["DEFAULT_DRAFT_CONF", "DEFAULT_DRAFT_NMS_IOU", "draft_boxes"]
