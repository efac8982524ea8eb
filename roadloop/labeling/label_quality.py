"""Label quality with cleanlab: which labelled frames look wrong, and how.

* :func:`out_of_sample_predictions` — K-fold over a curated split: train on K−1 folds,
  predict the held-out fold, so every frame is scored by a model that never trained on it
  (cleanlab needs out-of-sample predictions; in-sample ones agree with the labels they
  learned, errors included). **K by cost:** training cost grows with ``(K−1)·N`` frame-epochs
  (K models on ``(K−1)/K`` of the data each). On 2 CPU cores K=3 is the default: 2·N
  frame-epochs, each model sees 2/3 of the data; K=2 halves the cost but trains on half
  the data (weaker predictions, more false flags); K=5 doubles it again for little gain at
  these dataset sizes. A cheaper predictor can be injected (``fit_predict``) for tests.
* :func:`find_label_issues` — cleanlab 2.9 ``object_detection``: per-image label quality
  (``rank.get_label_quality_scores``), flagged images (``filter.find_label_issues``) and
  which boxes are suspect by type: ``overlooked`` (a box the model is sure of has no label:
  **missing box**), ``swap`` (**wrong class**), ``badloc`` (**bad localisation**). The
  per-type box scores are cleanlab's public ``rank.compute_*_box_scores``; the per-type
  thresholds are those ``filter.find_label_issues`` applies internally (per-class AP times
  a factor), re-used from ``cleanlab.object_detection.filter`` so that the union of the
  per-type flags is exactly cleanlab's image flag (checked at run time).
  Two measured settings (``roadloop.labeling.label_qa_calibration``) adapt it to YOLO
  confidences: ``high_probability_threshold`` (cleanlab's 0.95, above which predicted boxes
  count as confident for ``overlooked`` / ``swap``; YOLO confidences never reach it) and
  ``max_quality``: when given, an image is flagged (``low_quality``) when its label quality
  score is below it, as cleanlab's ``rank.issues_from_scores`` does, instead of by the
  per-box checks (whose issues are still reported, as the reasons). The defaults reproduce
  cleanlab's ``filter.find_label_issues``; the asset passes the platform's calibrated
  ``ROADLOOP_LABEL_QA_*`` settings.
* :func:`hold_out_flagged` — flagged frames stay out of training until re-reviewed.

Coordinates are pixels, ``xyxy``, as cleanlab expects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, Field
from tqdm import tqdm

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.fsutil import write_text_atomic

logger = logging.getLogger(__name__)

ISSUE_TYPES: dict[str, str] = {
    "overlooked": "missing box",
    "swap": "wrong class",
    "badloc": "bad localisation",
}
LOW_QUALITY = "low_quality"
"""Issue type of an image flagged because its label quality score is below ``max_quality``."""
OOS_CONF = 0.01
"""Confidence floor of out-of-sample predictions: cleanlab wants low-confidence boxes too."""

CleanlabLabel = dict[str, Any]
CleanlabPrediction = list[np.ndarray]
FitPredict = Callable[[list[Path], list[Path], Path, list[str]], list[CleanlabPrediction]]


# --------------------------------------------------------------------------- formats


def _image_size(image: Path) -> tuple[int, int]:
    try:
        with Image.open(image) as im:
            return im.size  # (w, h)
    except FileNotFoundError as exc:
        raise MissingDataError(f"image not found: {image}", image) from exc
    except Exception as exc:
        raise InvalidInputError(image, f"cannot read image size: {exc}") from exc


def read_yolo_label(image: Path, label: Path | None, nc: int) -> CleanlabLabel:
    """One frame's YOLO label file as cleanlab wants it (pixel xyxy boxes, class ids).

    A missing label file is a background frame; a malformed row or a class id outside
    ``0..nc-1`` raises ``InvalidInputError`` naming the file and line.
    """
    w, h = _image_size(Path(image))
    boxes: list[list[float]] = []
    classes: list[int] = []
    if label is not None and Path(label).is_file():
        for lineno, line in enumerate(Path(label).read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 5:
                    raise ValueError(f"expected 5 fields, got {len(parts)}")
                c = int(float(parts[0]))
                x, y, bw, bh = (float(v) for v in parts[1:])
            except ValueError as exc:
                raise InvalidInputError(label, f"line {lineno}: {exc}") from exc
            if not 0 <= c < nc:
                raise InvalidInputError(label, f"line {lineno}: class id {c} outside 0..{nc - 1}")
            boxes.append([(x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h])
            classes.append(c)
    return {
        "bboxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(classes, dtype=np.int64),
        "image_name": str(image),
    }


def detections_to_cleanlab(
    xyxy: np.ndarray, classes: np.ndarray, conf: np.ndarray, nc: int
) -> CleanlabPrediction:
    """Detections of one frame as cleanlab's per-class list of ``(M, 5)`` arrays."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    return [
        np.concatenate([xyxy[classes == k], conf[classes == k, None]], axis=1).reshape(-1, 5)
        for k in range(nc)
    ]


def _read_names(data_yaml: Path) -> list[str]:
    if not data_yaml.is_file():
        raise MissingDataError(f"no data.yaml in dataset folder {data_yaml.parent}", data_yaml)
    doc = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
    names = doc.get("names")
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise InvalidInputError(data_yaml, "'names' missing or not a list/dict")


def dataset_split_frames(dataset_dir: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of one split of a curated dataset folder, sorted by name."""
    img_dir = Path(dataset_dir) / "images" / split
    if not img_dir.is_dir():
        raise MissingDataError(f"no {split} images in {dataset_dir}", img_dir)
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    return [
        (p, Path(dataset_dir) / "labels" / split / f"{p.stem}.txt")
        for p in sorted(img_dir.iterdir())
        if p.is_file() and p.suffix.lower() in suffixes
    ]


# --------------------------------------------------------------------------- out-of-sample


class OutOfSamplePredictions(BaseModel):
    """Every frame's labels and the predictions of a model that did not train on it."""

    model_config = {"arbitrary_types_allowed": True}

    class_names: list[str]
    images: list[Path]
    folds: list[int]
    labels: list[CleanlabLabel]
    predictions: list[CleanlabPrediction]
    k_folds: int


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(Path(src).absolute(), dst)
    except OSError:
        shutil.copy2(src, dst)


def symlink_yolo_dataset(
    root: Path, train: list[Path], val: list[Path], class_names: list[str]
) -> Path:
    """A YOLO dataset of symlinks at ``root`` (Ultralytics' caches land here, never in the
    source dataset); returns its ``data.yaml``."""
    for split, imgs in (("train", train), ("val", val)):
        for img in imgs:
            _link(img, root / "images" / split / img.name)
            lbl = img.parent.parent.parent / "labels" / img.parent.name / f"{img.stem}.txt"
            if lbl.is_file():
                _link(lbl, root / "labels" / split / f"{img.stem}.txt")
    doc = {
        "path": str(root.absolute()),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(class_names)),
    }
    (root / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return root / "data.yaml"


def predict_for_cleanlab(
    weights: Path,
    images: Sequence[Path],
    num_classes: int,
    *,
    imgsz: int,
    conf: float = OOS_CONF,
    device: str = "cpu",
) -> list[CleanlabPrediction]:
    """Predict ``images`` with the Ultralytics ``weights`` (square letterbox at ``imgsz``, low
    ``conf``), one cleanlab prediction per image."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    preds: list[CleanlabPrediction] = []
    for img in images:
        r = model.predict(
            str(img),
            imgsz=imgsz,
            conf=conf,
            device=device,
            rect=False,
            verbose=False,
            save=False,
        )[0]
        b = r.boxes
        preds.append(
            detections_to_cleanlab(
                b.xyxy.cpu().numpy(), b.cls.cpu().numpy(), b.conf.cpu().numpy(), num_classes
            )
        )
    return preds


def ultralytics_fit_predict(
    train_cfg: Any, *, imgsz: int | None = None, conf: float = OOS_CONF, device: str = "cpu"
) -> FitPredict:
    """The default K-fold step: ``train_detector`` on the fold's train frames, then predict
    the held-out frames with the best weights (square letterbox, low ``conf``)."""

    def fit_predict(
        train: list[Path], heldout: list[Path], fold_dir: Path, class_names: list[str]
    ) -> list[CleanlabPrediction]:
        from roadloop.models.training import train_detector

        data_yaml = symlink_yolo_dataset(fold_dir / "data", train, heldout, class_names)
        result = train_detector(train_cfg, data_yaml, fold_dir / "run")
        return predict_for_cleanlab(
            result.best_weights,
            heldout,
            len(class_names),
            imgsz=imgsz or train_cfg.imgsz,
            conf=conf,
            device=device,
        )

    return fit_predict


def out_of_sample_predictions(
    dataset_dir: Path,
    *,
    k_folds: int = 3,
    train_cfg: Any = None,
    split: str = "train",
    work_dir: Path,
    seed: int = 0,
    fit_predict: FitPredict | None = None,
    imgsz: int | None = None,
    conf: float = OOS_CONF,
    device: str = "cpu",
) -> OutOfSamplePredictions:
    """K-fold out-of-sample predictions for every frame of ``split`` (see module docstring).

    ``fit_predict(train_images, heldout_images, fold_dir, class_names)`` returns the
    held-out frames' predictions in cleanlab format; the default trains with
    ``train_cfg`` (a ``roadloop.models.training.TrainConfig``) via :func:`ultralytics_fit_predict`.
    Fold work goes under ``work_dir/fold_<i>``.
    """
    dataset_dir = Path(dataset_dir)
    class_names = _read_names(dataset_dir / "data.yaml")
    frames = dataset_split_frames(dataset_dir, split)
    if k_folds < 2:
        raise ValueError("k_folds must be >= 2")
    if len(frames) < k_folds:
        raise ValueError(f"{len(frames)} frames in {dataset_dir} [{split}] < k_folds={k_folds}")
    if fit_predict is None:
        if train_cfg is None:
            raise ValueError("give train_cfg (or a fit_predict) for out-of-sample predictions")
        fit_predict = ultralytics_fit_predict(train_cfg, imgsz=imgsz, conf=conf, device=device)
    labels = [read_yolo_label(img, lbl, len(class_names)) for img, lbl in frames]
    folds = np.random.default_rng(seed).permutation(len(frames)) % k_folds
    preds: list[CleanlabPrediction | None] = [None] * len(frames)
    for k in tqdm(range(k_folds), desc="K-fold out-of-sample", unit="fold"):
        held = [i for i in range(len(frames)) if folds[i] == k]
        train = [frames[i][0] for i in range(len(frames)) if folds[i] != k]
        logger.info("fold %d/%d: train on %d, predict %d", k + 1, k_folds, len(train), len(held))
        out = fit_predict(
            train, [frames[i][0] for i in held], Path(work_dir) / f"fold_{k}", class_names
        )
        if len(out) != len(held):
            raise ValueError(
                f"fold {k}: fit_predict returned {len(out)} predictions for {len(held)} frames"
            )
        for i, p in zip(held, out):
            if len(p) != len(class_names):
                raise ValueError(
                    f"prediction for {frames[i][0]} has {len(p)} classes, not {len(class_names)}"
                )
            preds[i] = [np.asarray(a, dtype=np.float64).reshape(-1, 5) for a in p]
    return OutOfSamplePredictions(
        class_names=class_names,
        images=[f[0] for f in frames],
        folds=[int(f) for f in folds],
        labels=labels,
        predictions=[p for p in preds if p is not None],
        k_folds=k_folds,
    )


# --------------------------------------------------------------------------- issues


class BoxIssue(BaseModel):
    """One suspect box. ``box`` indexes the label boxes (swap, badloc) or, for overlooked,
    the prediction boxes in cleanlab's class-major order."""

    type: str
    description: str
    box: int
    class_name: str
    xyxy: tuple[float, float, float, float]
    score: float


class ImageQuality(BaseModel):
    image: str
    quality_score: float
    flagged: bool
    n_labels: int
    issues: list[BoxIssue] = Field(default_factory=list)
    low_quality: bool = Field(
        default=False, description="Flagged because its quality score is below max_quality."
    )

    @property
    def issue_types(self) -> list[str]:
        return sorted(
            {i.type for i in self.issues} | ({LOW_QUALITY} if self.low_quality else set())
        )


class LabelQualityReport(BaseModel):
    class_names: list[str]
    images: list[ImageQuality]
    n_flagged: int
    issue_counts: dict[str, int] = Field(description="Suspect boxes per issue type.")
    flagged_by_type: dict[str, int] = Field(description="Flagged images per issue type.")
    n_low_quality: int = Field(default=0, description="Images with quality below max_quality.")
    high_probability_threshold: float = Field(
        default=0.95, description="Confidence above which predictions count as confident."
    )
    max_quality: float | None = Field(
        default=None,
        description="Images scoring below it are flagged; None: cleanlab's per-box checks flag.",
    )

    def flagged_images(self) -> list[str]:
        """Flagged images, worst quality first."""
        return [i.image for i in sorted(self.images, key=lambda i: i.quality_score) if i.flagged]

    def to_markdown(self, top: int = 20) -> str:
        lines = [
            (
                f"{self.n_flagged} of {len(self.images)} images flagged by cleanlab "
                f"(confident predictions ≥ {self.high_probability_threshold:.3f}; "
                + (
                    "flagged by the per-box checks)."
                    if self.max_quality is None
                    else f"flagged when label quality < {self.max_quality:.3f})."
                )
            ),
            "",
            "| issue type | suspect boxes | images |",
            "|---|---|---|",
        ]
        for t, desc in ISSUE_TYPES.items():
            lines.append(
                f"| {desc} (`{t}`) | {self.issue_counts.get(t, 0)} | {self.flagged_by_type.get(t, 0)} |"
            )
        lines += ["", "| image | quality | issues |", "|---|---|---|"]
        worst = [i for i in sorted(self.images, key=lambda i: i.quality_score) if i.flagged][:top]
        for i in worst:
            kinds = Counter(x.type for x in i.issues)
            kinds_text = [f"{ISSUE_TYPES[k]} ×{n}" for k, n in sorted(kinds.items())]
            if i.low_quality:
                kinds_text.append("low label quality")
            lines.append(
                f"| {Path(i.image).name} | {i.quality_score:.3f} | " + ", ".join(kinds_text) + " |"
            )
        return "\n".join(lines) + "\n"


def _validate(
    labels: Sequence[CleanlabLabel], predictions: Sequence[CleanlabPrediction], nc: int
) -> None:
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} label entries but {len(predictions)} predictions")
    for i, (lab, pred) in enumerate(zip(labels, predictions)):
        name = lab.get("image_name", f"image {i}")
        if len(pred) != nc:
            raise InvalidInputError(name, f"prediction has {len(pred)} class arrays, expected {nc}")
        lab_cls = np.asarray(lab["labels"])
        if lab_cls.size and (lab_cls.min() < 0 or lab_cls.max() >= nc):
            raise InvalidInputError(name, f"label class ids outside 0..{nc - 1}")
        if np.asarray(lab["bboxes"]).reshape(-1, 4).shape[0] != lab_cls.size:
            raise InvalidInputError(name, "bboxes and labels differ in length")


_POOL_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _cleanlab_pools_in_threads() -> Iterator[None]:
    """Run cleanlab's object-detection worker pools as threads, not forked processes.

    cleanlab 2.9 opens ``multiprocessing.Pool`` (fork) for per-class AP even with one
    process, and never closes it. Forked from a process that already runs threads (torch,
    ONNX Runtime, FiftyOne's database client) a worker can inherit a held lock and never
    start; the pool's finaliser then waits on it forever (seen as a hung test suite and an
    interpreter that would not exit). The work is small numpy, so threads cost nothing;
    every pool opened here is closed on the way out.
    """
    from cleanlab.object_detection import filter as clf
    from cleanlab.object_detection import summary as cls_summary

    opened: list[ThreadPool] = []

    def thread_pool(processes: int | None = None, *args: Any, **kwargs: Any) -> ThreadPool:
        pool = ThreadPool(processes)
        opened.append(pool)
        return pool

    with _POOL_PATCH_LOCK:
        saved = clf.Pool, cls_summary.Pool
        clf.Pool = cls_summary.Pool = thread_pool
        try:
            yield
        finally:
            clf.Pool, cls_summary.Pool = saved
            for pool in opened:
                pool.terminate()
                pool.join()


def find_label_issues(
    labels: Sequence[CleanlabLabel],
    predictions: Sequence[CleanlabPrediction],
    class_names: Sequence[str],
    *,
    high_probability_threshold: float | None = None,
    max_quality: float | None = None,
) -> LabelQualityReport:
    """Per-image quality scores, flags and typed box issues (see module docstring).

    ``high_probability_threshold`` (default: cleanlab's 0.95) is the confidence above which
    predicted boxes count for the ``overlooked`` and ``swap`` checks and scores. With
    ``max_quality`` an image is flagged when its label quality score is below it; without,
    when any of its boxes fails a per-box check (cleanlab's ``find_label_issues``).
    """
    if high_probability_threshold is not None and not 0.0 < high_probability_threshold <= 1.0:
        raise ValueError(
            f"high_probability_threshold must be in (0, 1], got {high_probability_threshold}"
        )
    if max_quality is not None and not 0.0 <= max_quality <= 1.0:
        raise ValueError(f"max_quality must be in [0, 1], got {max_quality}")
    with _cleanlab_pools_in_threads():
        return _find_label_issues(
            labels, predictions, class_names, high_probability_threshold, max_quality
        )


def _find_label_issues(
    labels: Sequence[CleanlabLabel],
    predictions: Sequence[CleanlabPrediction],
    class_names: Sequence[str],
    high_probability_threshold: float | None,
    max_quality: float | None,
) -> LabelQualityReport:
    from cleanlab.object_detection import filter as clf
    from cleanlab.object_detection import rank as clr

    labels = [
        {
            "bboxes": np.asarray(lab["bboxes"], dtype=np.float64).reshape(-1, 4),
            "labels": np.asarray(lab["labels"], dtype=np.int64).reshape(-1),
            "image_name": str(lab.get("image_name", f"image_{i}")),
        }
        for i, lab in enumerate(labels)
    ]
    predictions = [[np.asarray(a, dtype=np.float64).reshape(-1, 5) for a in p] for p in predictions]
    nc = len(class_names)
    _validate(labels, predictions, nc)
    n = len(labels)
    default_hp = high_probability_threshold in (None, clf.HIGH_PROBABILITY_THRESHOLD)
    hp = (
        clf.HIGH_PROBABILITY_THRESHOLD
        if high_probability_threshold is None
        else high_probability_threshold
    )
    if n == 0:
        return LabelQualityReport(
            class_names=list(class_names),
            images=[],
            n_flagged=0,
            issue_counts={t: 0 for t in ISSUE_TYPES},
            flagged_by_type={t: 0 for t in ISSUE_TYPES},
            high_probability_threshold=hp,
            max_quality=max_quality,
        )

    if default_hp:
        scores = clr.get_label_quality_scores(labels, predictions, verbose=False)
        cleanlab_flags = np.asarray(clf.find_label_issues(labels, predictions), dtype=bool)
    else:
        # get_label_quality_scores fixes the threshold at 0.95; this is what it calls.
        scores = clr._get_subtype_label_quality_scores(
            labels, predictions, high_probability_threshold=hp
        )
        cleanlab_flags = None  # the union of the typed flags below

    # Per type, as filter.find_label_issues decides internally (cleanlab 2.9).
    aux = clf._get_valid_inputs_for_compute_scores(clf.ALPHA, labels, predictions)
    per_class_ap = clf._get_per_class_ap(labels, predictions)
    lab_thr = clf._process_class_list([clf._separate_label(x)[1] for x in labels], per_class_ap)
    pred_sep = [clf._separate_prediction(p) for p in predictions]
    pred_thr = clf._process_class_list([s[1] for s in pred_sep], per_class_ap)
    typed = {
        "overlooked": clf._find_label_issues_per_box(
            clr.compute_overlooked_box_scores(
                alpha=clf.ALPHA, high_probability_threshold=hp, auxiliary_inputs=aux
            ),
            pred_thr,
            clf.OVERLOOKED_THRESHOLD_FACTOR,
        ),
        "swap": clf._find_label_issues_per_box(
            clr.compute_swap_box_scores(
                alpha=clf.ALPHA, high_probability_threshold=hp, auxiliary_inputs=aux
            ),
            lab_thr,
            clf.SWAP_THRESHOLD_FACTOR,
        ),
        "badloc": clf._find_label_issues_per_box(
            clr.compute_badloc_box_scores(
                alpha=clf.ALPHA,
                low_probability_threshold=clf.LOW_PROBABILITY_THRESHOLD,
                auxiliary_inputs=aux,
            ),
            lab_thr,
            clf.BADLOC_THRESHOLD_FACTOR,
        ),
    }
    # Box scores again for the report (the per-box flag call above mutates NaN → 1).
    box_scores = {
        "overlooked": clr.compute_overlooked_box_scores(
            labels=labels, predictions=predictions, high_probability_threshold=hp
        ),
        "swap": clr.compute_swap_box_scores(
            labels=labels, predictions=predictions, high_probability_threshold=hp
        ),
        "badloc": clr.compute_badloc_box_scores(labels=labels, predictions=predictions),
    }

    images: list[ImageQuality] = []
    issue_counts: Counter = Counter({t: 0 for t in ISSUE_TYPES})
    flagged_by_type: Counter = Counter({t: 0 for t in ISSUE_TYPES})
    mismatch = 0
    for i in range(n):
        issues: list[BoxIssue] = []
        for t, per_box in typed.items():
            mask = np.asarray(per_box[i], dtype=bool)
            if t == "overlooked":
                boxes, cls = pred_sep[i][0], pred_sep[i][1]
            else:
                boxes, cls = labels[i]["bboxes"], labels[i]["labels"]
            if mask.size != len(cls):  # cleanlab's placeholder [False] for "no boxes"
                continue
            sc = np.asarray(box_scores[t][i], dtype=float)
            for j in np.flatnonzero(mask):
                issues.append(
                    BoxIssue(
                        type=t,
                        description=ISSUE_TYPES[t],
                        box=int(j),
                        class_name=class_names[int(cls[j])],
                        xyxy=tuple(float(v) for v in boxes[j][:4]),
                        score=float(sc[j]) if j < sc.size and np.isfinite(sc[j]) else 1.0,
                    )
                )
        kinds = {x.type for x in issues}
        for t in kinds:
            flagged_by_type[t] += 1
        issue_counts.update(x.type for x in issues)
        box_flag = bool(kinds)
        if cleanlab_flags is not None:
            mismatch += box_flag != bool(cleanlab_flags[i])
            box_flag = bool(cleanlab_flags[i])
        low = max_quality is not None and bool(scores[i] < max_quality)
        images.append(
            ImageQuality(
                image=labels[i]["image_name"],
                quality_score=float(scores[i]),
                flagged=box_flag if max_quality is None else low,
                n_labels=len(labels[i]["labels"]),
                issues=issues,
                low_quality=low,
            )
        )
    if mismatch:
        logger.warning(
            "per-type issues disagree with cleanlab's image flags on %d image(s) "
            "(cleanlab internals changed?); the image flags are cleanlab's",
            mismatch,
        )
    n_flagged = sum(im.flagged for im in images)
    n_low = sum(im.low_quality for im in images)
    logger.info(
        "label quality: %d/%d images flagged (by %s); suspect boxes %s",
        n_flagged,
        n,
        "per-box checks" if max_quality is None else f"quality < {max_quality:.3f}",
        dict(issue_counts),
    )
    return LabelQualityReport(
        class_names=list(class_names),
        images=images,
        n_flagged=n_flagged,
        issue_counts=dict(issue_counts),
        flagged_by_type=dict(flagged_by_type),
        n_low_quality=n_low,
        high_probability_threshold=hp,
        max_quality=max_quality,
    )


def hold_out_flagged(
    frames: Iterable[Any],
    report: LabelQualityReport,
    *,
    reviewed: Iterable[str] = (),
    key: Callable[[Any], str] = lambda f: str(getattr(f, "image", f)),
) -> tuple[list[Any], list[Any]]:
    """Split ``frames`` into (trainable, held out): flagged frames not yet re-reviewed are held.

    ``key(frame)`` must give the same string as the report's ``image`` (default: the
    frame's ``image`` path); ``reviewed`` lists keys that were re-reviewed since.
    """
    flagged = {i.image for i in report.images if i.flagged} - set(reviewed)
    keep, held = [], []
    for f in frames:
        (held if key(f) in flagged else keep).append(f)
    return keep, held


def write_report(report: LabelQualityReport, path: Path) -> Path:
    """Write the report as JSON, atomically."""
    path = Path(path)
    write_text_atomic(path, report.model_dump_json(indent=2), parents=True)
    return path


__all__ = [
    "ISSUE_TYPES",
    "LOW_QUALITY",
    "BoxIssue",
    "ImageQuality",
    "LabelQualityReport",
    "OutOfSamplePredictions",
    "dataset_split_frames",
    "detections_to_cleanlab",
    "find_label_issues",
    "hold_out_flagged",
    "out_of_sample_predictions",
    "predict_for_cleanlab",
    "read_yolo_label",
    "symlink_yolo_dataset",
    "ultralytics_fit_predict",
    "write_report",
]
