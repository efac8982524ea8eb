"""Human review of the active-learning queue in FiftyOne (framework-free).

One persistent FiftyOne dataset (default ``roadloop-review``) holds every frame that was
ever sent for review. Per sample:

- ``predictions``: the model's boxes (``fo.Detections``, relative ``[x, y, w, h]``), shown as
  pre-annotations;
- ``ground_truth``: what annotators correct in the App (initialised from ``predictions``);
- ``al_score``, ``camera_id``, ``frame_id``, ``batch_id``, ``frame_key`` (``camera/frame``,
  unique), ``model_version``, ``split``, ``source_image`` (for seed frames pulled in by
  label-quality checks), ``review_error``, ``label_issue_score``.

Tags drive the workflow (the App's tag editor is the annotators' only control):

- ``reviewed``: an annotator (or the simulated oracle) finished the sample;
- ``imported``: its labels went into a curated dataset version;
- ``review_error``: the last import rejected its labels (message in ``review_error``);
  the ``reviewed`` tag was removed, so it is back in the queue;
- ``label_issue``: label-quality checks doubt its labels; held out of training until an
  annotator re-reviews it (tags it ``reviewed`` again).

Saved views: ``review_queue`` (not yet reviewed, highest ``al_score`` first), one
``batch_<id>`` per pushed batch, ``label_issues`` (for re-review, worst first).

FiftyOne is imported lazily (it is slow to import and starts MongoDB on first use); the
database location is configured before the first connection (see ``configure_fiftyone``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from roadloop.data.datasets import (
    LabelledFrame,
    Taxonomy,
    _check_frame,
    load_taxonomy,
)
from roadloop.errors import InvalidInputError, RoadloopError
from roadloop.fsutil import swap_dir_into_place

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "roadloop-review"
TAG_REVIEWED = "reviewed"
TAG_IMPORTED = "imported"
TAG_REVIEW_ERROR = "review_error"
TAG_LABEL_ISSUE = "label_issue"
VIEW_QUEUE = "review_queue"
VIEW_LABEL_ISSUES = "label_issues"
REVIEWED_SOURCE = "reviewed"  # LabelledFrame.source of exported frames
EXPORT_RECORD = "export.json"  # the ReviewExport, inside the export folder
_BOX_EPS = 1e-3  # relative tolerance for boxes touching the image border (App rounding)


class FiftyOneUnavailable(RoadloopError):
    """FiftyOne or its MongoDB could not be started/connected."""


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


class PushResult(BaseModel):
    batch_id: str
    view: str
    added: int = 0
    updated: int = 0
    skipped_reviewed: int = 0  # already reviewed/imported: annotators' work is kept


class ReviewRejection(BaseModel):
    sample_id: str
    frame_key: str
    filepath: str
    error: str


class ReviewExport(BaseModel):
    """What ``export_reviewed`` wrote: a YOLO folder of every reviewed, valid sample."""

    path: Path
    frames: list[LabelledFrame] = Field(default_factory=list)
    frame_keys: list[str] = Field(default_factory=list)
    new_sample_ids: list[str] = Field(default_factory=list)  # pending before this export
    rejected: list[ReviewRejection] = Field(default_factory=list)
    held_out: list[str] = Field(default_factory=list)  # frame keys with an open label issue
    # Seed images (original source paths) that must not enter training as-is: their labels
    # are under re-review, or a reviewed copy in ``frames`` replaces them.
    exclude_images: list[Path] = Field(default_factory=list)
    class_counts: dict[str, int] = Field(default_factory=dict)
    content_hash: str = ""


class LabelIssueItem(BaseModel):
    """One frame whose labels label-quality checks doubt (see ``tag_label_issues``).

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


class LabelIssueResult(BaseModel):
    tagged: int = 0
    added: int = 0
    view: str = VIEW_LABEL_ISSUES


# --------------------------------------------------------------------------- fiftyone


def _import_eta_tolerantly() -> None:
    """Import ``eta.constants`` (FiftyOne's dependency) whatever importlib_metadata does.

    voxel51-eta's METADATA has no ``Author`` field and eta reads ``_META["author"]``. Once a
    package has registered ``importlib_metadata`` (>= 8)'s finder (mlflow does, on import),
    ``importlib.metadata.metadata`` returns its ``Message``, which raises KeyError for a
    missing field, so ``import fiftyone`` fails after ``import mlflow``. Reading the few
    fields eta uses through ``.get`` avoids that.
    """
    if "eta.constants" in sys.modules:
        return
    import importlib.metadata as md

    original = md.metadata

    def tolerant(name: str):
        meta = original(name)
        if name not in ("voxel51-eta", "eta"):
            return meta
        keys = ("name", "version", "summary", "author", "author-email", "home-page", "license")
        return {k: meta.get(k) for k in keys}

    md.metadata = tolerant
    try:
        import eta.constants  # noqa: F401
    finally:
        md.metadata = original


def configure_fiftyone(database_dir: Path | str | None = None, database_uri: str | None = None):
    """Import FiftyOne pointed at ``database_dir`` (a local mongod) or ``database_uri``.

    Must run before the process's first FiftyOne database connection; a later call asking
    for a different database raises instead of silently using the first one.
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    first_import = "fiftyone" not in sys.modules
    if first_import:
        if database_uri:
            os.environ["FIFTYONE_DATABASE_URI"] = database_uri
        elif database_dir:
            os.environ["FIFTYONE_DATABASE_DIR"] = str(Path(database_dir).absolute())
    try:
        _import_eta_tolerantly()
        import fiftyone as fo
        import fiftyone.core.odm.database as fodb
    except Exception as exc:  # pragma: no cover - install problem
        raise FiftyOneUnavailable(f"fiftyone could not be imported: {exc}") from exc

    want_dir = str(Path(database_dir).absolute()) if database_dir else None
    if fodb._client is not None:  # already connected: only the same database will do
        same = (database_uri and fo.config.database_uri == database_uri) or (
            not database_uri
            and (want_dir is None or str(Path(fo.config.database_dir).absolute()) == want_dir)
        )
        if not same:
            raise FiftyOneUnavailable(
                f"this process is already connected to FiftyOne database "
                f"{fo.config.database_uri or fo.config.database_dir}; cannot switch to "
                f"{database_uri or want_dir} (one database per process)"
            )
        return fo
    fo.config.database_validation = False
    if database_uri:
        fo.config.database_uri = database_uri
    elif want_dir:
        Path(want_dir).mkdir(parents=True, exist_ok=True)
        fo.config.database_dir = want_dir
    return fo


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


def _detections(fo, boxes: Iterable[ReviewBox]):
    return fo.Detections(
        detections=[
            fo.Detection(label=b.label, bounding_box=list(b.box), confidence=b.confidence)
            for b in boxes
        ]
    )


def _as_boxes(detections) -> list[ReviewBox]:
    if detections is None:
        return []
    out = []
    for d in detections.detections:
        out.append(
            ReviewBox(label=str(d.label), box=tuple(d.bounding_box), confidence=d.confidence)
        )
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


def pending_key(sample_ids: Iterable[str]) -> str:
    """A stable key for a set of pending sample ids (sensor run keys, cursors)."""
    return hashlib.sha1("\n".join(sorted(sample_ids)).encode()).hexdigest()[:16]


class ReviewStore:
    """The persistent FiftyOne review dataset; see the module docstring."""

    def __init__(
        self,
        dataset_name: str = DEFAULT_DATASET,
        database_dir: Path | str | None = None,
        database_uri: str | None = None,
        taxonomy: Taxonomy | None = None,
    ) -> None:
        self.dataset_name = dataset_name
        self.database_dir = Path(database_dir) if database_dir else None
        self.database_uri = database_uri
        self.taxonomy = taxonomy or load_taxonomy()

    def taxonomy_name(self, name: str) -> str:
        """``name`` as a taxonomy class: itself, or what a source's class map makes of it
        (a model with a source's head, e.g. atl_v2's ``bike`` -> ``two_wheeler``)."""
        if name in self.taxonomy.classes:
            return name
        for mapping in self.taxonomy.sources.values():
            if name in mapping:
                return mapping[name]
        return name

    # ---- connection
    def fo(self):
        return configure_fiftyone(self.database_dir, self.database_uri)

    def dataset(self):
        """The review dataset (created, persistent, with its fields, on first use)."""
        fo = self.fo()
        try:
            if fo.dataset_exists(self.dataset_name):
                ds = fo.load_dataset(self.dataset_name)
                ds.reload()  # tags may have changed in the App (another process)
                return ds
            ds = fo.Dataset(self.dataset_name, persistent=True)
        except Exception as exc:
            if isinstance(exc, RoadloopError):
                raise
            where = self.database_uri or self.database_dir or "FiftyOne's default database"
            raise FiftyOneUnavailable(f"could not open FiftyOne dataset at {where}: {exc}") from exc
        for name, ftype in (
            ("frame_key", fo.StringField),
            ("camera_id", fo.StringField),
            ("frame_id", fo.StringField),
            ("batch_id", fo.StringField),
            ("model_version", fo.StringField),
            ("split", fo.StringField),
            ("source", fo.StringField),
            ("source_ref", fo.StringField),
            ("labels_ref", fo.StringField),
            ("source_image", fo.StringField),
            ("review_error", fo.StringField),
            ("annotated_by", fo.StringField),
            ("al_score", fo.FloatField),
            ("label_issue_score", fo.FloatField),
        ):
            ds.add_sample_field(name, ftype)
        ds.add_sample_field("label_issue_types", fo.ListField, subfield=fo.StringField)
        for name in ("predictions", "ground_truth", "suspect_boxes"):
            ds.add_sample_field(name, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
        ds.create_index("frame_key", unique=True)
        ds.default_classes = list(self.taxonomy.classes)
        ds.classes = {"ground_truth": list(self.taxonomy.classes)}
        ds.info = {
            "about": "roadloop active-learning review: correct `ground_truth`, then tag the "
            "sample `reviewed`. `predictions` are the model's pre-annotations.",
        }
        self._configure_app(fo, ds)
        ds.save()
        self._save_common_views(ds)
        return ds

    @staticmethod
    def _configure_app(fo, ds) -> None:
        """Colours per field and a ``review`` sidebar group first, so annotators see the
        pre-annotations (orange), their corrections (teal) and why a frame is queued."""
        ds.app_config.color_scheme = fo.ColorScheme(
            color_by="field",
            fields=[
                {"path": "predictions", "fieldColor": "#ff9f1c"},
                {"path": "ground_truth", "fieldColor": "#2ec4b6"},
                {"path": "suspect_boxes", "fieldColor": "#e71d36"},
            ],
        )
        review_paths = [
            "al_score",
            "batch_id",
            "camera_id",
            "frame_id",
            "review_error",
            "label_issue_score",
            "label_issue_types",
            "annotated_by",
            "model_version",
            "split",
        ]
        try:
            groups = fo.DatasetAppConfig.default_sidebar_groups(ds)
            for g in groups:
                g.paths = [p for p in g.paths if p not in review_paths]
            tags = [g for g in groups if g.name == "tags"]
            rest = [g for g in groups if g.name != "tags"]
            ds.app_config.sidebar_groups = (
                tags + [fo.SidebarGroupDocument(name="review", paths=review_paths)] + rest
            )
        except Exception as exc:  # noqa: BLE001 - cosmetic only: never block the review dataset
            logger.warning("could not configure the FiftyOne sidebar: %s", exc)

    def delete(self) -> None:
        fo = self.fo()
        if fo.dataset_exists(self.dataset_name):
            fo.delete_dataset(self.dataset_name)

    def _save_common_views(self, ds) -> None:
        F = self.fo().ViewField

        queue = ds.match_tags([TAG_REVIEWED, TAG_IMPORTED], bool=False).sort_by(
            F("al_score"), reverse=True
        )
        ds.save_view(
            VIEW_QUEUE,
            queue,
            description="Frames waiting for review, most informative first",
            overwrite=True,
        )
        issues = ds.match_tags(TAG_LABEL_ISSUE).sort_by(F("label_issue_score"), reverse=True)
        ds.save_view(
            VIEW_LABEL_ISSUES,
            issues,
            description="Labels in doubt: re-review, then tag `reviewed`",
            overwrite=True,
        )

    def _ensure_label_schemas(self, ds) -> None:
        """In-App annotation (FiftyOne >= 1.13): ``ground_truth`` editable with the taxonomy
        as a dropdown, the model's boxes read-only. Needs samples (the media type) first."""
        if not hasattr(ds, "set_label_schemas") or len(ds) == 0:
            return
        try:
            if "ground_truth" in ds.label_schemas:
                return
            schemas = ds.generate_label_schemas(
                ["ground_truth", "predictions", "suspect_boxes"], scan_samples=False
            )
            schemas["ground_truth"].update(
                component="dropdown", classes=list(self.taxonomy.classes)
            )
            # Annotators edit boxes and classes; the model-only attributes stay out of the form.
            schemas["ground_truth"]["attributes"] = [
                a
                for a in schemas["ground_truth"].get("attributes", [])
                if a.get("name") in ("id", "tags")
            ]
            schemas["predictions"]["read_only"] = True
            schemas["suspect_boxes"]["read_only"] = True
            ds.set_label_schemas(schemas)
            ds.active_label_schemas = ["ground_truth"]
        except Exception as exc:  # noqa: BLE001 - Explore view and tagging work without it
            logger.warning("could not set FiftyOne annotation schemas: %s", exc)

    @staticmethod
    def batch_view_name(batch_id: str) -> str:
        return f"batch_{batch_id}"

    # ---- queue
    def push_queue(self, items: Iterable[ReviewItem | Any], batch_id: str) -> PushResult:
        """Add (or refresh) queue frames; annotators' work on reviewed samples is kept."""
        fo = self.fo()  # configure FiftyOne before anything imports it
        F = fo.ViewField
        ds = self.dataset()
        if hasattr(items, "rows"):  # an ALQueue
            items = items_from_queue(items)
        entries = [
            it if isinstance(it, ReviewItem) else ReviewItem.model_validate(it) for it in items
        ]
        entries = [
            e.model_copy(
                update={
                    "predictions": [
                        b.model_copy(update={"label": self.taxonomy_name(b.label)})
                        for b in e.predictions
                    ]
                }
            )
            for e in entries
        ]
        result = PushResult(batch_id=batch_id, view=self.batch_view_name(batch_id))
        keys = [e.frame_key for e in entries]
        existing = {s.frame_key: s for s in ds.match(F("frame_key").is_in(keys))}
        new_samples = []
        for e in entries:
            sample = existing.get(e.frame_key)
            preds = _detections(fo, e.predictions)
            if sample is None:
                new_samples.append(
                    fo.Sample(
                        filepath=str(Path(e.image).absolute()),
                        metadata=fo.ImageMetadata(width=e.width, height=e.height),
                        frame_key=e.frame_key,
                        camera_id=e.camera_id,
                        frame_id=e.frame_id,
                        batch_id=batch_id,
                        al_score=float(e.al_score),
                        model_version=e.model_version,
                        split=e.split,
                        source=e.source,
                        source_ref=e.source_ref,
                        labels_ref=e.labels_ref,
                        predictions=preds,
                        # Pre-annotation: annotators correct the model's boxes.
                        ground_truth=_detections(
                            fo, [b.model_copy(update={"confidence": None}) for b in e.predictions]
                        ),
                    )
                )
                continue
            if TAG_REVIEWED in sample.tags or TAG_IMPORTED in sample.tags:
                result.skipped_reviewed += 1
                continue
            sample["batch_id"] = batch_id
            sample["al_score"] = float(e.al_score)
            sample["model_version"] = e.model_version
            sample["predictions"] = preds
            sample.save()
            result.updated += 1
        if new_samples:
            ds.add_samples(new_samples, progress=False)
        result.added = len(new_samples)
        self._ensure_label_schemas(ds)
        view = ds.match(F("batch_id") == batch_id).sort_by(F("al_score"), reverse=True)
        ds.save_view(
            result.view, view, description=f"Active-learning batch {batch_id}", overwrite=True
        )
        self._save_common_views(ds)
        logger.info(
            "review batch %s: %d added, %d updated, %d already reviewed",
            batch_id,
            result.added,
            result.updated,
            result.skipped_reviewed,
        )
        return result

    def queue_items(self, limit: int | None = None) -> list[tuple[str, ReviewItem]]:
        """(sample id, item) of frames waiting for review, highest ``al_score`` first."""
        ds = self.dataset()
        view = ds.load_saved_view(VIEW_QUEUE)
        if limit is not None:
            view = view.limit(limit)
        return [(s.id, self._item(s)) for s in view]

    @staticmethod
    def _item(sample) -> ReviewItem:
        md = sample.metadata
        return ReviewItem(
            camera_id=sample.camera_id or "",
            frame_id=sample.frame_id or "",
            image=Path(sample.filepath),
            width=int(md.width) if md and md.width else 1,
            height=int(md.height) if md and md.height else 1,
            al_score=float(sample.al_score or 0.0),
            predictions=_as_boxes(sample.predictions),
            model_version=sample.model_version,
            source=sample.source,
            source_ref=sample.source_ref,
            labels_ref=sample.labels_ref,
            split=sample.split or "train",
        )

    # ---- reviews
    def pending_reviews(self) -> list[str]:
        """Sample ids tagged ``reviewed`` and not yet ``imported`` (sorted)."""
        ds = self.dataset()
        view = ds.match_tags(TAG_REVIEWED).match_tags(TAG_IMPORTED, bool=False)
        return sorted(view.values("id"))

    def reviewed_frame_keys(self) -> set[str]:
        """Frame keys already reviewed or imported (not candidates for a new batch)."""
        ds = self.dataset()
        return set(ds.match_tags([TAG_REVIEWED, TAG_IMPORTED]).values("frame_key"))

    def tag_reviewed(self, sample_ids: Sequence[str]) -> None:
        """What an annotator does in the App: tag samples ``reviewed``."""
        self.dataset().select(list(sample_ids)).tag_samples(TAG_REVIEWED)

    def set_ground_truth(
        self, sample_id: str, boxes: Iterable[ReviewBox], annotated_by: str | None = None
    ) -> None:
        fo = self.fo()
        sample = self.dataset()[sample_id]
        sample["ground_truth"] = _detections(fo, boxes)
        if annotated_by is not None:
            sample["annotated_by"] = annotated_by
        sample.save()

    def export_reviewed(self, out_dir: Path) -> ReviewExport:
        """Write every reviewed sample's labels as a YOLO folder (atomically) and return it.

        Samples pending import are validated first: a box outside the image, a class not in
        the taxonomy, or anything the curated-dataset rules reject makes the sample invalid.
        Invalid samples are not exported: they get the message in ``review_error``, lose the
        ``reviewed`` tag (back in the queue) and get the ``review_error`` tag.
        """
        ds = self.dataset()
        classes = list(self.taxonomy.classes)
        out_dir = Path(out_dir).absolute()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:12]}"
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir(parents=True)
        export = ReviewExport(path=out_dir)
        errors: dict[str, str] = {}
        manifest: list[dict] = []
        counts: Counter = Counter()
        try:
            reviewed = ds.match_tags(TAG_REVIEWED).sort_by("frame_key")
            for sample in reviewed:
                pending = TAG_IMPORTED not in sample.tags
                where = f"sample {sample.frame_key} ({sample.filepath})"
                problems = validate_boxes(sample.ground_truth, classes)
                image = Path(sample.filepath)
                if not image.is_file():
                    problems.append(f"image file not found: {image}")
                if problems:
                    errors[sample.id] = f"{where}: " + "; ".join(problems)
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
                checked, bad = _check_frame(frame, self.taxonomy, 0)
                bad = bad + (checked.quarantine if checked is not None else [])
                if bad:
                    img_out.unlink(missing_ok=True)
                    lbl_out.unlink(missing_ok=True)
                    detail = "; ".join(f"{b.reason}: {b.detail}" for b in bad)
                    errors[sample.id] = f"{where}: {detail}"
                    continue
                final = LabelledFrame(
                    image=out_dir / "images" / img_out.name,
                    label=out_dir / "labels" / lbl_out.name,
                    source=REVIEWED_SOURCE,
                    split=frame.split,
                )
                export.frames.append(final)
                export.frame_keys.append(sample.frame_key)
                if pending:
                    export.new_sample_ids.append(sample.id)
                for det in sample.ground_truth.detections if sample.ground_truth else []:
                    counts[det.label] += 1
                manifest.append(
                    {
                        "frame_key": sample.frame_key,
                        "sample_id": sample.id,
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
                )
            open_issues = ds.match_tags(TAG_LABEL_ISSUE).match_tags(TAG_REVIEWED, bool=False)
            export.held_out = sorted(open_issues.values("frame_key"))
            export.exclude_images = sorted(
                {Path(p) for p in ds.exists("source_image").values("source_image") if p}
            )
            export.class_counts = dict(sorted(counts.items()))
            export.rejected = [
                ReviewRejection(
                    sample_id=sid,
                    frame_key=ds[sid].frame_key,
                    filepath=ds[sid].filepath,
                    error=msg,
                )
                for sid, msg in sorted(errors.items())
            ]
            body = "".join(json.dumps(m, sort_keys=True) + "\n" for m in manifest)
            state = (
                body
                + json.dumps([str(p) for p in export.exclude_images])
                + json.dumps(export.held_out)
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
        # Only now (the export is in place) touch FiftyOne: rejected samples go back to the queue.
        if errors:
            view = ds.select(list(errors))
            view.untag_samples(TAG_REVIEWED)
            view.tag_samples(TAG_REVIEW_ERROR)
            for sid, msg in errors.items():
                sample = ds[sid]
                sample["review_error"] = msg
                sample.save()
                logger.warning("review rejected: %s", msg)
        ok_ids = [sid for sid in export.new_sample_ids]
        if ok_ids:
            ok = ds.select(ok_ids)
            ok.untag_samples(TAG_REVIEW_ERROR)
            ok.set_values("review_error", [None] * len(ok_ids))
        logger.info(
            "exported %d reviewed frames (%d new, %d rejected) to %s",
            len(export.frames),
            len(export.new_sample_ids),
            len(export.rejected),
            out_dir,
        )
        return export

    def mark_imported(self, sample_ids: Sequence[str]) -> int:
        """Tag samples ``imported``; a re-reviewed label issue is closed (tag removed)."""
        if not sample_ids:
            return 0
        view = self.dataset().select(list(sample_ids))
        view.tag_samples(TAG_IMPORTED)
        view.untag_samples(TAG_LABEL_ISSUE)
        return len(view)

    # ---- label quality
    def tag_label_issues(self, issues: Iterable[LabelIssueItem | Any]) -> LabelIssueResult:
        """Flag frames whose labels are in doubt: tag ``label_issue`` with a score.

        A flagged review sample loses ``reviewed``/``imported`` (held out of training until
        re-reviewed). A flagged seed frame not yet in FiftyOne is added with its current
        labels as ``ground_truth`` and the model's boxes as ``predictions``.
        """
        fo = self.fo()  # configure FiftyOne before anything imports it
        F = fo.ViewField
        ds = self.dataset()
        items = [
            i if isinstance(i, LabelIssueItem) else LabelIssueItem.model_validate(i) for i in issues
        ]
        result = LabelIssueResult()
        by_key = {
            s.frame_key: s
            for s in ds.match(F("frame_key").is_in([i.frame_key for i in items if i.frame_key]))
        }
        by_path = {
            s.filepath: s
            for s in ds.match(F("filepath").is_in([str(Path(i.image).absolute()) for i in items]))
        }
        by_source = {
            s.source_image: s
            for s in ds.match(
                F("source_image").is_in([str(i.source_image) for i in items if i.source_image])
            )
        }
        new_samples = []
        for it in items:
            sample = (
                (by_key.get(it.frame_key) if it.frame_key else None)
                or by_path.get(str(Path(it.image).absolute()))
                or (by_source.get(str(it.source_image)) if it.source_image else None)
            )
            if sample is not None:
                tags = [t for t in sample.tags if t not in (TAG_REVIEWED, TAG_IMPORTED)]
                if TAG_LABEL_ISSUE not in tags:
                    tags.append(TAG_LABEL_ISSUE)
                sample.tags = tags
                sample["label_issue_score"] = float(it.score)
                sample["label_issue_types"] = list(it.issue_types)
                sample["suspect_boxes"] = _detections(fo, it.suspect)
                sample.save()
                result.tagged += 1
                continue
            width, height = it.width, it.height
            if not width or not height:
                import cv2

                img = cv2.imread(str(it.image))
                if img is None:
                    raise InvalidInputError(it.image, "flagged image does not decode")
                height, width = img.shape[:2]
            src = Path(it.source_image or it.image)
            key = it.frame_key or f"seed/{src.parent.name}/{src.stem}"
            new_samples.append(
                fo.Sample(
                    filepath=str(Path(it.image).absolute()),
                    metadata=fo.ImageMetadata(width=width, height=height),
                    tags=[TAG_LABEL_ISSUE],
                    frame_key=key,
                    camera_id="seed",
                    frame_id=_safe_name(key),
                    split=it.split,
                    source_image=str(it.source_image) if it.source_image else None,
                    label_issue_score=float(it.score),
                    label_issue_types=list(it.issue_types),
                    suspect_boxes=_detections(fo, it.suspect),
                    al_score=0.0,
                    predictions=_detections(fo, it.predictions),
                    ground_truth=_detections(fo, it.labels),
                )
            )
        if new_samples:
            ds.add_samples(new_samples, progress=False)
        result.added = len(new_samples)
        result.tagged += len(new_samples)
        self._ensure_label_schemas(ds)
        self._save_common_views(ds)
        return result

    def counts(self) -> dict[str, int]:
        ds = self.dataset()
        out = {"samples": len(ds)}
        out.update(ds.count_sample_tags())
        out["pending"] = len(self.pending_reviews())
        return out


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


def app_url(
    dataset_name: str, port: int, address: str = "127.0.0.1", view: str | None = VIEW_QUEUE
) -> str:
    """The FiftyOne App URL of the review dataset (optionally a saved view)."""
    from urllib.parse import quote

    _import_eta_tolerantly()
    from fiftyone.core.utils import to_slug

    url = f"http://{address}:{port}/datasets/{quote(dataset_name)}"
    if view:
        url += f"?view={quote(to_slug(view))}"
    return url


__all__ = [
    "FiftyOneUnavailable",
    "LabelIssueItem",
    "LabelIssueResult",
    "PushResult",
    "ReviewBox",
    "ReviewExport",
    "ReviewItem",
    "ReviewRejection",
    "ReviewStore",
    "app_url",
    "boxes_from_yolo",
    "configure_fiftyone",
    "items_from_queue",
    "load_review_export",
    "pending_key",
    "validate_boxes",
]
