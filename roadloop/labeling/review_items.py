"""Review items: the records of a frame under review, their checks and the export format.

Framework-free and FiftyOne-free: the review store (``review_store.ReviewStore``) turns
these records into FiftyOne samples and back.

- ``ReviewBox``: one box, taxonomy class name, relative top-left ``[x, y, w, h]`` (FiftyOne's
  box format); ``ReviewItem``: one frame to review with the model's boxes as
  pre-annotations (``items_from_queue`` builds them from an active-learning queue);
  ``LabelIssueItem``: one frame whose labels label-quality checks doubt.
- ``validate_boxes``: what an annotator's boxes must satisfy (known class, finite,
  positive size, inside the image up to App rounding).
- The validated export: ``write_review_export`` writes every valid reviewed frame as a
  YOLO folder (taxonomy ids) with ``manifest.jsonl``, ``rejected.jsonl`` and the
  ``ReviewExport`` record (``export.json``); ``load_review_export`` reads it back for
  ``curated_dataset``. The export is cumulative: frames of the previous export whose review
  sample is gone are carried into the next one (``carried``, ``read_export_manifest``), so
  labels once imported leave training only on purpose (see ``ReviewStore.export_reviewed``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from roadloop.data.datasets import LabelledFrame, Taxonomy, check_frame
from roadloop.errors import InvalidInputError
from roadloop.fsutil import swap_dir_into_place

logger = logging.getLogger(__name__)

REVIEWED_SOURCE = "reviewed"  # LabelledFrame.source of exported frames
EXPORT_RECORD = "export.json"  # the ReviewExport, inside the export folder
_BOX_EPS = 1e-3  # relative tolerance for boxes touching the image border (App rounding)


# --------------------------------------------------------------------------- records


class ReviewBox(BaseModel):
    """One box in a frame: taxonomy class name, relative top-left ``[x, y, w, h]``."""

    label: str
    box: tuple[float, float, float, float]
    confidence: float | None = None


class ReviewItem(BaseModel):
    """One frame to review, as the review store needs it (see ``items_from_queue``)."""

    camera_id: str
    frame_id: str
    image: Path
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    al_score: float = 0.0
    predictions: list[ReviewBox] = Field(default_factory=list)
    model_version: str | None = None
    source: str | None = None
    source_ref: str | None = None
    labels_ref: str | None = None
    split: str = "train"
    reasons: list[str] = Field(default_factory=list)

    @property
    def frame_key(self) -> str:
        return f"{self.camera_id}/{self.frame_id}"


class ReviewRejection(BaseModel):
    sample_id: str
    frame_key: str
    filepath: str
    error: str


class ReviewExport(BaseModel):
    """What ``write_review_export`` (``ReviewStore.export_reviewed``) wrote: a YOLO folder of
    every reviewed, valid sample."""

    path: Path
    frames: list[LabelledFrame] = Field(default_factory=list)
    frame_keys: list[str] = Field(default_factory=list)
    new_sample_ids: list[str] = Field(default_factory=list)  # pending before this export
    # Of new_sample_ids: how many per camera ("" for a sample without one, e.g. a seed frame).
    new_per_camera: dict[str, int] = Field(default_factory=dict)
    rejected: list[ReviewRejection] = Field(default_factory=list)
    held_out: list[str] = Field(default_factory=list)  # frame keys with an open label issue
    # Seed images (original source paths) that must not enter training as-is: their labels
    # are under re-review, or a reviewed copy in ``frames`` replaces them.
    exclude_images: list[Path] = Field(default_factory=list)
    class_counts: dict[str, int] = Field(default_factory=dict)
    content_hash: str = ""
    # Frame keys kept from the previous export although their review sample is no longer in
    # the review dataset (deleted in the App, dataset replaced): imported labels stay.
    carried_over: list[str] = Field(default_factory=list)
    # Of carried_over: gone since the previous export (this export's news; not recorded).
    vanished: list[str] = Field(default_factory=list, exclude=True)
    dataset: str = ""  # the FiftyOne review dataset it was exported from


class LabelIssueItem(BaseModel):
    """One frame whose labels label-quality checks doubt (see ``ReviewStore.tag_label_issues``).

    ``score`` is how doubtful the labels are, in [0, 1] (1 - cleanlab's label quality).
    """

    image: Path
    score: float
    frame_key: str | None = None  # set when the frame is already a review sample
    labels: list[ReviewBox] = Field(default_factory=list)  # the labels in doubt
    predictions: list[ReviewBox] = Field(default_factory=list)
    suspect: list[ReviewBox] = Field(default_factory=list)  # e.g. "missing box: car"
    issue_types: list[str] = Field(default_factory=list)
    source_image: Path | None = None  # original seed image, to exclude from curation
    split: str = "train"
    width: int | None = None
    height: int | None = None
    reason: str = ""


# --------------------------------------------------------------------------- frames


def _rel_box_from_xyxy(
    xyxy: Sequence[float], width: int, height: int
) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    x1, x2 = (min(max(v / width, 0.0), 1.0) for v in (x1, x2))
    y1, y2 = (min(max(v / height, 0.0), 1.0) for v in (y1, y2))
    return (x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1))


def _image_size(path: Path) -> tuple[int, int]:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InvalidInputError(path, "queued image does not decode")
    h, w = img.shape[:2]
    return w, h


def items_from_queue(
    queue: Any, records: Mapping[tuple[str, str], Any] | None = None
) -> list[ReviewItem]:
    """Review items from an ``ALQueue`` (or its rows); ``records`` maps
    ``(camera_id, frame_id)`` to the frame's ``FrameRecord`` (size, provenance)."""
    rows = getattr(queue, "rows", queue)
    items: list[ReviewItem] = []
    for row in rows:
        rec = records.get((row.camera_id, row.frame_id)) if records else None
        if rec is not None:
            width, height = int(rec.width), int(rec.height)
        else:
            width, height = _image_size(Path(row.image))
        preds = [
            ReviewBox(
                label=d.class_name,
                box=_rel_box_from_xyxy(d.xyxy, width, height),
                confidence=float(d.confidence),
            )
            for d in row.pre_annotations
        ]
        items.append(
            ReviewItem(
                camera_id=row.camera_id,
                frame_id=row.frame_id,
                image=Path(row.image),
                width=width,
                height=height,
                al_score=float(row.scores.total),
                predictions=preds,
                model_version=row.model_version,
                source=getattr(rec, "source", None),
                source_ref=getattr(rec, "source_ref", None),
                labels_ref=getattr(rec, "labels_ref", None),
                reasons=list(getattr(rec, "reasons", []) or []),
            )
        )
    return items


def boxes_from_yolo(label_file: Path, class_names: Sequence[str]) -> list[ReviewBox]:
    """Read a YOLO label file (taxonomy ids) into review boxes; bad rows are skipped."""
    out: list[ReviewBox] = []
    path = Path(label_file)
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        try:
            cls = int(float(parts[0]))
            cx, cy, w, h = (float(p) for p in parts[1:])
        except ValueError:
            continue
        if 0 <= cls < len(class_names):
            out.append(ReviewBox(label=class_names[cls], box=(cx - w / 2, cy - h / 2, w, h)))
    return out


def validate_boxes(detections, classes: Sequence[str]) -> list[str]:
    """Problems with annotator boxes (empty list: valid). ``detections`` is fo.Detections."""
    problems: list[str] = []
    if detections is None:
        return problems
    for i, det in enumerate(detections.detections, start=1):
        label = det.label
        box = det.bounding_box
        if label not in classes:
            problems.append(f"box {i}: unknown class {label!r} (known: {', '.join(classes)})")
        if box is None or len(box) != 4:
            problems.append(f"box {i} ({label}): bounding box must be [x, y, w, h], got {box!r}")
            continue
        try:
            x, y, w, h = (float(v) for v in box)
        except (TypeError, ValueError):
            problems.append(f"box {i} ({label}): non-numeric bounding box {box!r}")
            continue
        shown = "[" + ", ".join(f"{v:.3f}" for v in (x, y, w, h)) + "]"
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            problems.append(f"box {i} ({label}): non-finite bounding box {box!r}")
        elif w <= 0 or h <= 0:
            problems.append(f"box {i} ({label}): width and height must be > 0, got {shown}")
        elif x < -_BOX_EPS or y < -_BOX_EPS or x + w > 1 + _BOX_EPS or y + h > 1 + _BOX_EPS:
            problems.append(
                f"box {i} ({label}): lies outside the image (relative [x, y, w, h] = {shown}; "
                "x, y, x+w and y+h must lie in [0, 1])"
            )
    return problems


def _yolo_rows(detections, classes: Sequence[str]) -> list[str]:
    rows = []
    for det in detections.detections if detections is not None else []:
        x, y, w, h = (float(v) for v in det.bounding_box)
        # Clip the tolerated border overshoot, then convert to YOLO centre format.
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(1.0, x + w), min(1.0, y + h)
        cls = classes.index(det.label)
        rows.append(f"{cls} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}\n")
    return rows


def _safe_name(key: str) -> str:
    stem = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in key).strip(".") or "_"
    return f"{stem[:80]}__{hashlib.sha1(key.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ReviewedSample:
    """One sample an annotator tagged ``reviewed``, as ``write_review_export`` reads it."""

    sample_id: str
    frame_key: str
    filepath: str
    ground_truth: Any  # fo.Detections as the annotator left it (validated here)
    split: str | None
    camera_id: str | None
    source_image: str | None
    batch_id: str | None
    pending: bool  # not imported yet


def write_review_export(
    samples: Iterable[ReviewedSample],
    out_dir: Path,
    taxonomy: Taxonomy,
    *,
    held_out: Iterable[str] = (),
    exclude_images: Iterable[Path] = (),
    carried: Iterable[Mapping[str, Any]] = (),
    dataset: str = "",
) -> ReviewExport:
    """Write the valid ``samples`` as a YOLO folder at ``out_dir`` (atomically) and return it.

    A box outside the image, a class not in the taxonomy, or anything the curated-dataset
    rules reject makes a sample invalid: it is left out and listed in ``rejected``.
    ``held_out`` (frame keys with an open label issue) and ``exclude_images`` (seed images
    to keep out of training) are recorded in the export and its ``content_hash``.
    ``carried``: manifest rows of the export now at ``out_dir`` (``read_export_manifest``)
    to keep as they are (already validated when first exported); a row whose files are gone
    is dropped with a warning.
    """
    classes = list(taxonomy.classes)
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:12]}"
    (tmp / "images").mkdir(parents=True)
    (tmp / "labels").mkdir(parents=True)
    export = ReviewExport(path=out_dir)
    rejected: dict[str, ReviewRejection] = {}
    entries: list[tuple[str, LabelledFrame, dict]] = []  # (frame key, frame, manifest row)
    counts: Counter = Counter()
    try:
        for sample in samples:
            where = f"sample {sample.frame_key} ({sample.filepath})"
            problems = validate_boxes(sample.ground_truth, classes)
            image = Path(sample.filepath)
            if not image.is_file():
                problems.append(f"image file not found: {image}")
            if problems:
                rejected[sample.sample_id] = _rejection(sample, f"{where}: " + "; ".join(problems))
                continue
            name = _safe_name(sample.frame_key)
            img_out = tmp / "images" / f"{name}{image.suffix.lower() or '.jpg'}"
            lbl_out = tmp / "labels" / f"{name}.txt"
            shutil.copyfile(image, img_out)
            rows = _yolo_rows(sample.ground_truth, classes)
            lbl_out.write_text("".join(rows), encoding="utf-8")
            # The same rules every curated frame passes (decode, rows, ranges, classes).
            frame = LabelledFrame(
                image=img_out,
                label=lbl_out,
                source=REVIEWED_SOURCE,
                split=sample.split or "train",
            )
            checked, bad = check_frame(frame, taxonomy, 0)
            bad = bad + (checked.quarantine if checked is not None else [])
            if bad:
                img_out.unlink(missing_ok=True)
                lbl_out.unlink(missing_ok=True)
                detail = "; ".join(f"{b.reason}: {b.detail}" for b in bad)
                rejected[sample.sample_id] = _rejection(sample, f"{where}: {detail}")
                continue
            final = LabelledFrame(
                image=out_dir / "images" / img_out.name,
                label=out_dir / "labels" / lbl_out.name,
                source=REVIEWED_SOURCE,
                split=frame.split,
            )
            if sample.pending:
                export.new_sample_ids.append(sample.sample_id)
                camera = sample.camera_id or ""
                export.new_per_camera[camera] = export.new_per_camera.get(camera, 0) + 1
            for det in sample.ground_truth.detections if sample.ground_truth else []:
                counts[det.label] += 1
            row = {
                "frame_key": sample.frame_key,
                "sample_id": sample.sample_id,
                "image": f"images/{img_out.name}",
                "label": f"labels/{lbl_out.name}",
                "split": frame.split,
                "camera_id": sample.camera_id,
                "original": sample.filepath,
                "source_image": sample.source_image,
                "batch_id": sample.batch_id,
                "n_boxes": len(rows),
                "sha256": checked.sha256 if checked else None,
            }
            entries.append((sample.frame_key, final, row))
        exported = {key for key, _, _ in entries}
        for row in carried:
            kept = _carry_row(row, out_dir, tmp, classes, counts)
            if kept is not None and kept[0] not in exported:
                entries.append(kept)
                export.carried_over.append(kept[0])
        entries.sort(key=lambda e: e[0])
        export.frames = [f for _, f, _ in entries]
        export.frame_keys = [k for k, _, _ in entries]
        manifest = [m for _, _, m in entries]
        export.carried_over.sort()
        export.dataset = dataset
        export.held_out = sorted(held_out)
        export.exclude_images = sorted({Path(p) for p in exclude_images})
        export.class_counts = dict(sorted(counts.items()))
        export.rejected = [rejected[sid] for sid in sorted(rejected)]
        body = "".join(json.dumps(m, sort_keys=True) + "\n" for m in manifest)
        state = (
            body + json.dumps([str(p) for p in export.exclude_images]) + json.dumps(export.held_out)
        )
        export.content_hash = hashlib.sha256(state.encode()).hexdigest()[:16]
        (tmp / "manifest.jsonl").write_text(body, encoding="utf-8")
        (tmp / "data.yaml").write_text(
            "# roadloop reviewed labels (taxonomy ids), exported from FiftyOne.\n"
            + "train: images\nval: images\n"
            + "names:\n"
            + "".join(f"  {i}: {c}\n" for i, c in enumerate(classes)),
            encoding="utf-8",
        )
        (tmp / "rejected.jsonl").write_text(
            "".join(r.model_dump_json() + "\n" for r in export.rejected), encoding="utf-8"
        )
        (tmp / EXPORT_RECORD).write_text(export.model_dump_json(indent=2), encoding="utf-8")
        swap_dir_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export


def _carry_row(
    row: Mapping[str, Any], out_dir: Path, tmp: Path, classes: Sequence[str], counts: Counter
) -> tuple[str, LabelledFrame, dict] | None:
    """Copy one frame of the previous export (at ``out_dir``) into the new one (``tmp``)."""
    key = str(row["frame_key"])
    image, label = out_dir / str(row["image"]), out_dir / str(row["label"])
    if not image.is_file() or not label.is_file():
        logger.warning("review export: cannot carry %s over, its files are gone (%s)", key, image)
        return None
    shutil.copyfile(image, tmp / str(row["image"]))
    shutil.copyfile(label, tmp / str(row["label"]))
    for line in label.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and int(parts[0]) < len(classes):
            counts[classes[int(parts[0])]] += 1
    frame = LabelledFrame(
        image=out_dir / str(row["image"]),
        label=out_dir / str(row["label"]),
        source=REVIEWED_SOURCE,
        split=str(row.get("split") or "train"),
    )
    return key, frame, {**row, "carried_over": True}


def read_export_manifest(path: Path) -> list[dict[str, Any]]:
    """The manifest rows of the export at ``path`` (one per frame); [] when there is no
    export yet. An export record that exists but does not parse is an error: carrying
    nothing over would silently drop every imported label."""
    path = Path(path)
    record = path / EXPORT_RECORD
    if not record.is_file():
        return []
    try:
        ReviewExport.model_validate_json(record.read_text(encoding="utf-8"))
        lines = (path / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise InvalidInputError(record, f"previous review export unreadable: {exc}") from exc


def read_export_record(path: Path) -> ReviewExport | None:
    """The export record at ``path`` without checking its images; None when there is none."""
    record = Path(path) / EXPORT_RECORD
    if not record.is_file():
        return None
    try:
        return ReviewExport.model_validate_json(record.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidInputError(record, f"not a review export record: {exc}") from exc


def _rejection(sample: ReviewedSample, error: str) -> ReviewRejection:
    return ReviewRejection(
        sample_id=sample.sample_id,
        frame_key=sample.frame_key,
        filepath=sample.filepath,
        error=error,
    )


def load_review_export(path: Path) -> ReviewExport:
    """The last ``export_reviewed`` written to ``path``; an empty export when there is none
    yet (so ``curated_dataset`` can take reviewed frames as an optional input)."""
    path = Path(path)
    record = path / EXPORT_RECORD
    if not record.is_file():
        return ReviewExport(path=path)
    try:
        export = ReviewExport.model_validate_json(record.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidInputError(record, f"not a review export record: {exc}") from exc
    missing = [f.image for f in export.frames if not Path(f.image).is_file()]
    if missing:
        raise InvalidInputError(
            record, f"{len(missing)} exported image(s) missing, e.g. {missing[0]}"
        )
    return export


__all__ = [
    "EXPORT_RECORD",
    "REVIEWED_SOURCE",
    "LabelIssueItem",
    "ReviewBox",
    "ReviewExport",
    "ReviewItem",
    "ReviewRejection",
    "ReviewedSample",
    "boxes_from_yolo",
    "items_from_queue",
    "load_review_export",
    "read_export_manifest",
    "read_export_record",
    "validate_boxes",
    "write_review_export",
]
