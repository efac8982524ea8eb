"""Accuracy of an ONNX detector at its own input shape, and the INT8 gate per shape.

Ultralytics' ``val`` letterboxes every frame to a square ``imgsz``, so it cannot run a model
exported at 192×320. Here the edge agent's own preprocessing (``edge_agent.inference``: its
letterbox into the model's ``(h, w)``) and network run over a labelled split, the raw output is
decoded as Ultralytics' ``val`` decodes it (every class scoring above 0.001 is a candidate of
its own — multi-label — then class-wise NMS at IoU 0.7, up to 300 boxes) and mAP is computed
with Ultralytics' ``ap_per_class`` on Ultralytics' matching (IoU 0.50:0.95) — square and
rectangular models are scored by one method, so they compare. At 320×320 this reproduces
Ultralytics' ``val`` of the same ONNX file (atl_v2 val, gpu checkpoint: mAP50 0.200, mAP50-95
0.082 both ways). The agent's own decode (one class per box, for counting) scored 0.116 /
0.050 there: single-label decoding drops the second-best class of boxes the model confuses
(bus/truck, bike), which val's curve counts.

``gate_int8_per_shape`` calls the promotion gate ``roadloop.evaluation.gates.check_int8_drop``
once per exported shape (its fp32 vs its INT8 on the same frames); ``benchmark_shapes`` adds
each shape's forward latency and returns the benchmark report's per-shape rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from edge_agent.boxes import box_iou_matrix, nms
from edge_agent.inference import MAX_NMS_CANDIDATES, LetterboxMeta, OnnxDetector
from roadloop.errors import InvalidInputError
from roadloop.evaluation.gates import GateConfig, GateOutcome, check_int8_drop
from roadloop.evaluation.inputs import label_path_for, read_class_names, split_images
from roadloop.evaluation.latency import measure_latency
from roadloop.evaluation.results import (
    BenchmarkResults,
    DetectionMetrics,
    LatencyConfig,
    LatencyStats,
    MetricsRow,
    ModelSet,
    ShapeRow,
)

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
VAL_CONF = 0.001  # Ultralytics val's confidence: the whole precision-recall curve
VAL_IOU = 0.7  # Ultralytics val's NMS IoU
VAL_MAX_DET = 300


Predictions = tuple[np.ndarray, np.ndarray, np.ndarray]  # classes, confidences, xyxy


def _decode(raw: np.ndarray, meta: LetterboxMeta, conf: float, multi_label: bool) -> Predictions:
    """Ultralytics' NMS on one frame's ``(4 + nc, anchors)`` output: candidates above ``conf``
    (every class above it with ``multi_label``, else the best class), class-wise NMS, boxes
    mapped back through the letterbox and clipped to the frame."""
    scores = raw[4:]
    if multi_label:
        cls, anchor = np.nonzero(scores > conf)
        score = scores[cls, anchor]
    else:
        best = scores.argmax(axis=0)
        anchor = np.nonzero(scores.max(axis=0) > conf)[0]
        cls, score = best[anchor], scores[best[anchor], anchor]
    if len(score) > MAX_NMS_CANDIDATES:
        top = np.argsort(-score, kind="stable")[:MAX_NMS_CANDIDATES]
        cls, anchor, score = cls[top], anchor[top], score[top]
    xy, half_wh = raw[0:2, anchor].T, raw[2:4, anchor].T / 2
    boxes = np.concatenate((xy - half_wh, xy + half_wh), axis=1).astype(np.float64)
    kept = nms(boxes, score, VAL_IOU, class_ids=cls, max_det=VAL_MAX_DET)
    boxes, score, cls = boxes[kept].reshape(-1, 4), score[kept].astype(float), cls[kept]
    h, w = meta.orig_shape
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - meta.pad[0]) / meta.ratio[0]).clip(0, w)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - meta.pad[1]) / meta.ratio[1]).clip(0, h)
    return cls.astype(int), score, boxes


def val_predictions(det: OnnxDetector, frame: np.ndarray, conf: float) -> tuple[Predictions,
                                                                               np.ndarray]:
    """One frame through the agent's letterbox and network: the predictions Ultralytics' ``val``
    scores (multi-label above 0.001), and the classes ``predict`` returns at ``conf`` (one per
    box: what a count sees)."""
    blob, metas = det.preprocess([frame])
    raw = np.asarray(det.infer(blob))[0].astype(np.float32, copy=False)
    if det.end2end:  # an NMS-fused export decodes itself: one class per box
        dets = det.postprocess(raw[None], metas)[0]
        preds = (np.array([d.class_id for d in dets], dtype=int),
                 np.array([d.confidence for d in dets], dtype=float),
                 np.array([[d.x1, d.y1, d.x2, d.y2] for d in dets], dtype=float).reshape(-1, 4))
        return preds, preds[0][preds[1] >= conf]
    return (_decode(raw, metas[0], VAL_CONF, multi_label=True),
            _decode(raw, metas[0], conf, multi_label=False)[0])


def _labels(image: Path, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes and pixel xyxy boxes of a YOLO label file (none when it is missing)."""
    path = label_path_for(image)
    rows = np.loadtxt(path, ndmin=2) if path.is_file() and path.stat().st_size else np.zeros((0, 5))
    cls = rows[:, 0].astype(int)
    cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
    return cls, np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)


def match_predictions(
    pred_cls: np.ndarray, pred_xyxy: np.ndarray, true_cls: np.ndarray, true_xyxy: np.ndarray
) -> np.ndarray:
    """(n_pred, 10) bool: prediction i is a true positive at IoU threshold j (Ultralytics'
    rule: same class, each truth matched once, highest IoU first)."""
    correct = np.zeros((len(pred_cls), len(IOU_THRESHOLDS)), dtype=bool)
    if not len(pred_cls) or not len(true_cls):
        return correct
    iou = box_iou_matrix(true_xyxy, pred_xyxy) * (true_cls[:, None] == pred_cls[None, :])
    for j, t in enumerate(IOU_THRESHOLDS):
        gt_i, pr_i = np.nonzero(iou >= t)
        if not len(gt_i):
            continue
        order = iou[gt_i, pr_i].argsort()[::-1]
        gt_i, pr_i = gt_i[order], pr_i[order]
        _, keep = np.unique(pr_i, return_index=True)
        gt_i, pr_i = gt_i[keep], pr_i[keep]
        _, keep = np.unique(gt_i, return_index=True)
        correct[pr_i[keep], j] = True
    return correct


def evaluate_onnx_at_shape(
    model_path: Path, data_yaml: Path, *, split: str = "test", conf: float = 0.25,
    threads: int | None = 1,
) -> DetectionMetrics:
    """mAP50 / mAP50-95 / P / R / per-class AP and count MAE (at ``conf``) of one ONNX file
    on ``split``, at the model's own input shape (module docstring)."""
    from ultralytics.utils.metrics import ap_per_class

    names = read_class_names(Path(data_yaml))
    nc = len(names)
    det = OnnxDetector(model_path, conf_threshold=VAL_CONF, iou_threshold=VAL_IOU,
                       max_detections=VAL_MAX_DET, intra_op_threads=threads)
    if len(det.class_names) != nc:
        raise InvalidInputError(model_path, f"model has {len(det.class_names)} classes, "
                                f"{data_yaml} has {nc}")
    stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    true_all: list[np.ndarray] = []
    count_err, per_class_err = [], []
    images = split_images(Path(data_yaml), split)
    for image in images:
        frame = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if frame is None:
            raise InvalidInputError(image, "cannot decode image")
        h, w = frame.shape[:2]
        true_cls, true_xyxy = _labels(image, w, h)
        (pcls, pconf, pxyxy), shown = val_predictions(det, frame, conf)
        stats.append((match_predictions(pcls, pxyxy, true_cls, true_xyxy), pconf, pcls))
        true_all.append(true_cls)
        pred_n = np.bincount(shown[(shown >= 0) & (shown < nc)], minlength=nc)[:nc]
        true_n = np.bincount(true_cls[(true_cls >= 0) & (true_cls < nc)], minlength=nc)[:nc]
        count_err.append(abs(int(pred_n.sum()) - int(true_n.sum())))
        per_class_err.append(np.abs(pred_n - true_n))
    tp = np.concatenate([s[0] for s in stats]) if stats else np.zeros((0, 10), bool)
    pconf = np.concatenate([s[1] for s in stats]) if stats else np.zeros(0)
    pcls = np.concatenate([s[2] for s in stats]) if stats else np.zeros(0, int)
    tcls = np.concatenate(true_all) if true_all else np.zeros(0, int)
    present = sorted({int(c) for c in tcls if 0 <= c < nc})
    if len(pconf) and len(tcls):
        _, _, p, r, _, ap, classes, *_ = ap_per_class(tp, pconf, pcls, tcls,
                                                      names=dict(enumerate(names)))
        ap50 = {int(c): float(ap[i, 0]) for i, c in enumerate(classes)}
        ap5095 = {int(c): float(ap[i].mean()) for i, c in enumerate(classes)}
        precision, recall = float(p.mean()), float(r.mean())
    else:
        ap50, ap5095, precision, recall = {}, {}, 0.0, 0.0
    per50 = {names[c]: ap50.get(c, 0.0) for c in present}
    per5095 = {names[c]: ap5095.get(c, 0.0) for c in present}
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    err = np.array(per_class_err).reshape(-1, nc)
    return DetectionMetrics(
        map50=float(np.mean(list(per50.values()))) if per50 else 0.0,
        map50_95=float(np.mean(list(per5095.values()))) if per5095 else 0.0,
        precision=precision, recall=recall, f1=float(f1),
        per_class_ap50=per50, per_class_ap50_95=per5095,
        per_class_count_mae={names[c]: float(err[:, c].mean()) if len(err) else 0.0
                             for c in range(nc)},
        count_mae=float(np.mean(count_err)) if count_err else 0.0,
        n_images=len(images), n_instances=len(tcls),
        absent_classes=[names[c] for c in range(nc) if c not in present], conf=conf,
    )


def gate_int8_per_shape(
    models: Mapping[str, tuple[Path, Path]],
    data_yaml: Path,
    cfg: GateConfig,
    *,
    version: str = "candidate",
    split: str = "test",
) -> dict[str, tuple[GateOutcome, BenchmarkResults]]:
    """``check_int8_drop`` for each shape: ``models`` maps a shape label (``"192x320"``) to its
    (fp32, INT8) ONNX files; both are scored by ``evaluate_onnx_at_shape`` on the same frames.
    Returns the outcome (named ``int8_drop@<shape>``) and the results it judged, per shape."""
    out: dict[str, tuple[GateOutcome, BenchmarkResults]] = {}
    ts = cfg.primary_test_set
    for label, (fp32, int8) in models.items():
        rows = [
            MetricsRow(model="candidate", version=version, format=fmt, test_set=ts,
                       metrics=evaluate_onnx_at_shape(path, data_yaml, split=split))
            for fmt, path in (("onnx_fp32", fp32), ("onnx_int8", int8))
        ]
        results = BenchmarkResults(
            created_at="", imgsz=max(int(v) for v in label.split("x")), split=split, conf=0.25,
            models={"candidate": ModelSet(version=version, onnx_fp32=fp32, onnx_int8=int8)},
            test_sets=[ts], test_set_kinds={ts: "all"},
            latency_config=LatencyConfig(enabled=False), rows=rows,
        )
        outcome = check_int8_drop(results, cfg)
        out[label] = (outcome.model_copy(update={"name": f"int8_drop@{label}"}), results)
        logger.info("%s: %s", label, outcome.description)
    return out


def _latency(path: Path, hw: tuple[int, int], cfg: LatencyConfig, batch: int) -> LatencyStats | None:
    stats = measure_latency(path, imgsz=hw, batch_sizes=(batch,), warmup=cfg.warmup,
                            runs=cfg.runs, threads=cfg.threads, device=cfg.device)
    return stats[0] if stats else None


def benchmark_shapes(
    models: Mapping[str, tuple[Path, Path]],
    data_yaml: Path,
    cfg: GateConfig,
    *,
    version: str = "candidate",
    split: str = "test",
    latency: LatencyConfig | None = None,
) -> tuple[list[ShapeRow], list[GateOutcome]]:
    """Per exported shape (``models``: label → (fp32, INT8) files): the INT8 gate
    (``gate_int8_per_shape``) and, when ``latency`` is enabled, the forward latency of both
    files at the gate's batch size. Returns the report rows and the gates' outcomes."""
    gated = gate_int8_per_shape(models, data_yaml, cfg, version=version, split=split)
    rows: list[ShapeRow] = []
    for label, (outcome, res) in gated.items():
        fp32_path, int8_path = models[label]
        hw = (int(label.split("x")[0]), int(label.split("x")[1]))
        timed = latency is not None and latency.enabled
        fp32 = res.get("candidate", "onnx_fp32", cfg.primary_test_set)
        int8 = res.get("candidate", "onnx_int8", cfg.primary_test_set)
        assert fp32 is not None and int8 is not None
        rows.append(ShapeRow(
            shape=label, version=version, test_set=cfg.primary_test_set, fp32=fp32, int8=int8,
            fp32_latency=_latency(fp32_path, hw, latency, cfg.latency_batch) if timed else None,
            int8_latency=_latency(int8_path, hw, latency, cfg.latency_batch) if timed else None,
            gate=outcome.name, gate_passed=outcome.passed, gate_description=outcome.description,
        ))
    return rows, [outcome for outcome, _ in gated.values()]
