"""Detector accuracy: mAP, per-class AP, P/R/F1 and count MAE of one model file on one test set.

Accuracy comes from Ultralytics ``val`` (never re-implemented here), for ``.pt`` and
``.onnx`` files alike. On top of it:

* **Count MAE** - traffic counting is what the cameras are for, so each model also predicts
  on the split's frames at the deployment confidence (``conf``) and the per-frame box counts
  are compared with the ground-truth label counts.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from roadloop.errors import InvalidInputError
from roadloop.evaluation.inputs import (
    check_model_file,
    check_onnx_imgsz,
    label_path_for,
    read_class_names,
    require_file,
    split_images,
)
from roadloop.evaluation.results import DetectionMetrics

logger = logging.getLogger(__name__)


def _label_class_counts(label: Path, nc: int) -> np.ndarray:
    counts = np.zeros(nc, dtype=np.int64)
    if not label.is_file():
        return counts  # background frame
    for lineno, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            c = int(float(parts[0]))
        except ValueError as exc:
            raise InvalidInputError(
                label, f"line {lineno}: class id {parts[0]!r} is not a number"
            ) from exc
        if not 0 <= c < nc:
            raise InvalidInputError(label, f"line {lineno}: class id {c} outside 0..{nc - 1}")
        counts[c] += 1
    return counts


def _model_names(model: Any) -> list[str]:
    names = model.names
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]


def _check_names(
    model_path: Path, model_names: list[str], data_names: list[str], data_yaml: Path
) -> None:
    if len(model_names) != len(data_names):
        raise InvalidInputError(
            model_path,
            f"model has {len(model_names)} classes {model_names}, but {data_yaml} has "
            f"{len(data_names)} {data_names}",
        )
    if model_names != data_names:
        logger.warning(
            "class names of %s %s differ from %s %s; using the data YAML's names",
            model_path,
            model_names,
            data_yaml,
            data_names,
        )


def evaluate_detector(
    model_path: Path,
    data_yaml: Path,
    *,
    imgsz: int,
    split: str = "test",
    conf: float = 0.25,
    device: str = "cpu",
) -> DetectionMetrics:
    """mAP/P/R/per-class AP from Ultralytics ``val`` plus count MAE from ``predict`` at ``conf``.

    Works for ``.pt`` and ``.onnx`` (fp32 or INT8) files. The model's classes must be the
    data YAML's classes (same count, same order).

    Every format sees the same square ``imgsz`` letterbox (``rect=False``): that is what the
    deployed ONNX (static spatial size) gets, so PyTorch, fp32 and INT8 numbers compare.
    Ultralytics would otherwise use rectangular letterboxes for ``.pt`` and for any ONNX
    whose batch is dynamic - which a static-spatial export cannot run.
    """
    metrics = evaluate_detector_on_sets(
        model_path, {"data": data_yaml}, imgsz=imgsz, split=split, conf=conf, device=device
    )
    return metrics["data"]


def evaluate_detector_on_sets(
    model_path: Path,
    data_yamls: Mapping[str, Path],
    *,
    imgsz: int,
    split: str = "test",
    conf: float = 0.25,
    device: str = "cpu",
) -> dict[str, DetectionMetrics]:
    """:func:`evaluate_detector` of one model file on several test sets, keyed as given.

    The model is loaded once: its predictor (an ONNX Runtime session for an ``.onnx`` file)
    serves every set's ``predict``. Ultralytics' ``val`` still builds its own backend per set.
    Every YAML is checked before any set is scored.
    """
    model_path = check_model_file(Path(model_path))
    yamls = {name: require_file(Path(y), "data YAML") for name, y in data_yamls.items()}
    check_onnx_imgsz(model_path, imgsz)
    names_of = {name: read_class_names(y) for name, y in yamls.items()}
    images_of = {name: split_images(y, split) for name, y in yamls.items()}

    from ultralytics import YOLO

    try:
        model = YOLO(str(model_path), task="detect")
        model_names = _model_names(model)  # an ONNX file's session is made here
    except Exception as exc:
        raise InvalidInputError(model_path, f"Ultralytics cannot load the model ({exc})") from exc
    for name, y in yamls.items():
        _check_names(model_path, model_names, names_of[name], y)
    return {
        name: _score(model, model_path, y, names_of[name], images_of[name],
                     imgsz=imgsz, split=split, conf=conf, device=device)
        for name, y in yamls.items()
    }


def _score(
    model: Any,
    model_path: Path,
    data_yaml: Path,
    data_names: list[str],
    images: list[Path],
    *,
    imgsz: int,
    split: str,
    conf: float,
    device: str,
) -> DetectionMetrics:
    nc = len(data_names)
    logger.info(
        "evaluating %s on %s [%s] (%d frames, imgsz %d)",
        model_path.name,
        data_yaml,
        split,
        len(images),
        imgsz,
    )
    with tempfile.TemporaryDirectory(prefix="roadloop-eval-") as tmp:
        res = model.val(
            data=str(data_yaml),
            split=split,
            imgsz=imgsz,
            batch=1,
            device=device,
            rect=False,
            plots=False,
            verbose=False,
            workers=0,
            save_json=False,
            project=tmp,
            name="val",
            exist_ok=True,
        )
        box = res.box
        nt = getattr(res, "nt_per_class", None)
        nt = np.zeros(nc, dtype=int) if nt is None else np.asarray(nt)
        present = [c for c in range(nc) if c < len(nt) and nt[c] > 0]
        ap_idx = [int(i) for i in getattr(box, "ap_class_index", [])]
        ap50 = {c: float(box.ap50[j]) for j, c in enumerate(ap_idx)} if ap_idx else {}
        ap = {c: float(box.ap[j]) for j, c in enumerate(ap_idx)} if ap_idx else {}
        per_ap50 = {data_names[c]: ap50.get(c, 0.0) for c in present}  # present, never matched → 0
        per_ap = {data_names[c]: ap.get(c, 0.0) for c in present}
        precision, recall = float(box.mp), float(box.mr)

        # Counting error at the deployment confidence.
        gt = np.stack([_label_class_counts(label_path_for(p), nc) for p in images])
        pred = np.zeros_like(gt)
        results = model.predict(
            source=[str(p) for p in images],
            stream=True,
            imgsz=imgsz,
            conf=conf,
            device=device,
            batch=1,
            rect=False,
            verbose=False,
            save=False,
            project=tmp,
            name="predict",
            exist_ok=True,
        )
        for i, r in enumerate(results):
            cls = r.boxes.cls.cpu().numpy().astype(int) if r.boxes is not None else np.zeros(0, int)
            pred[i] = np.bincount(cls[(cls >= 0) & (cls < nc)], minlength=nc)[:nc]

    err = np.abs(pred - gt)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return DetectionMetrics(
        map50=float(box.map50),
        map50_95=float(box.map),
        precision=precision,
        recall=recall,
        f1=float(f1),
        per_class_ap50=per_ap50,
        per_class_ap50_95=per_ap,
        per_class_count_mae={data_names[c]: float(err[:, c].mean()) for c in range(nc)},
        count_mae=float(np.abs(pred.sum(1) - gt.sum(1)).mean()),
        n_images=len(images),
        n_instances=int(gt.sum()),
        per_class_instances={data_names[c]: int(gt[:, c].sum()) for c in range(nc)},
        absent_classes=[data_names[c] for c in range(nc) if c not in present],
        conf=conf,
    )
