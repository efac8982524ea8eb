"""Human review of the active-learning queue in FiftyOne (framework-free): ``ReviewStore``.

The store works on the persistent review dataset (its fields, tags and saved views are
described in ``review_dataset``): it pushes queue batches with the model's boxes as
pre-annotations, lists what waits for review and for import, exports the reviewed labels
(validated; the export format is ``review_items``'s) and tags them ``imported``, and flags
frames whose labels label-quality checks doubt.

The export is the durable record of what was imported, FiftyOne the working copy: a store
bound to the export (``guarded_by``) refuses to create a missing review dataset while the
export holds frames (``ReviewDatasetMissingError``), and each export starts from the previous
one, so a sample deleted in FiftyOne keeps its imported labels (see ``export_reviewed``).

FiftyOne is imported through ``fiftyone_setup.configure_fiftyone`` (database location
first). For demos and benchmarks, ``oracle.simulate_reviews`` drives the store the way a
person in the App does.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from roadloop.data.datasets import Taxonomy, load_taxonomy
from roadloop.errors import InvalidInputError, RoadloopError
from roadloop.labeling.drafts import draft_boxes
from roadloop.labeling.fiftyone_setup import FiftyOneUnavailable, configure_fiftyone
from roadloop.labeling.review_dataset import (
    DEFAULT_DATASET,
    TAG_IMPORTED,
    TAG_LABEL_ISSUE,
    TAG_REVIEW_ERROR,
    TAG_REVIEWED,
    VIEW_LABEL_ISSUES,
    VIEW_QUEUE,
    ensure_label_schemas,
    init_review_dataset,
    save_common_views,
)
from roadloop.labeling.review_items import (
    LabelIssueItem,
    ReviewBox,
    ReviewedSample,
    ReviewExport,
    ReviewItem,
    _safe_name,
    items_from_queue,
    read_export_manifest,
    read_export_record,
    write_review_export,
)

logger = logging.getLogger(__name__)


class ReviewDatasetMissingError(RoadloopError):
    """The review dataset is gone while the review export holds imported frames: creating an
    empty one would send every reviewed frame back to the queue, so it is not done silently."""


class PushResult(BaseModel):
    batch_id: str
    view: str
    added: int = 0
    updated: int = 0
    skipped_reviewed: int = 0  # already reviewed/imported: annotators' work is kept


class LabelIssueResult(BaseModel):
    tagged: int = 0
    added: int = 0
    view: str = VIEW_LABEL_ISSUES


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


def pending_key(sample_ids: Iterable[str]) -> str:
    """A stable key for a set of pending sample ids (sensor run keys, cursors)."""
    return hashlib.sha1("\n".join(sorted(sample_ids)).encode()).hexdigest()[:16]


def review_mark(modified: dict[str, Any]) -> str:
    """A stable key for the state of a set of pending samples: their ids and when each was
    last modified (``ReviewStore.pending_reviews_modified``). Unlike ``pending_key`` it
    changes when a sample of the same set is edited or tagged again (a review rejected on
    import, fixed and finished again), and only then."""
    text = "\n".join(
        f"{sid}@{'' if t is None else t.isoformat()}" for sid, t in sorted(modified.items())
    )
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class ReviewStore:
    """The persistent FiftyOne review dataset (see ``review_dataset``) and its workflow."""

    def __init__(
        self,
        dataset_name: str = DEFAULT_DATASET,
        database_dir: Path | str | None = None,
        database_uri: str | None = None,
        taxonomy: Taxonomy | None = None,
        draft_conf: float | None = None,
        draft_nms_iou: float | None = None,
        export_dir: Path | str | None = None,
        allow_new_dataset: bool = False,
    ) -> None:
        from roadloop.settings import get_settings

        self.dataset_name = dataset_name
        # The review export this dataset feeds (see guarded_by); allow_new_dataset: create a
        # missing dataset even though that export holds frames (start_new_dataset).
        self.export_dir = Path(export_dir) if export_dir else None
        self.allow_new_dataset = allow_new_dataset
        self.database_dir = Path(database_dir) if database_dir else None
        self.database_uri = database_uri
        self.taxonomy = taxonomy or load_taxonomy()
        settings = get_settings()
        # The editable draft (ground_truth) of a pushed frame: see drafts.draft_boxes.
        self.draft_conf = settings.review_draft_conf if draft_conf is None else draft_conf
        self.draft_nms_iou = (
            settings.review_draft_nms_iou if draft_nms_iou is None else draft_nms_iou
        )

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

    def guarded_by(self, export_dir: Path | str) -> ReviewStore:
        """Bind the store to the review export it feeds (returns the store): a missing review
        dataset is then not created while that export holds frames, and frames in the export
        count as reviewed (``reviewed_frame_keys``)."""
        self.export_dir = Path(export_dir)
        return self

    def start_new_dataset(self):
        """Create the review dataset on purpose although the bound export holds imported
        frames (the old dataset is lost): those frames stay in the export and in training,
        and are not queued again."""
        if self.fo().dataset_exists(self.dataset_name):
            return self.dataset()  # nothing lost: nothing to start
        self.allow_new_dataset = True
        ds = self.dataset()
        logger.warning("review dataset %r: started a new one on request", self.dataset_name)
        return ds

    def _where(self) -> str:
        return str(self.database_uri or self.database_dir or "FiftyOne's default database")

    def _refuse_new_dataset(self, export_dir: Path | None) -> None:
        """Raise ``ReviewDatasetMissingError`` when the export at ``export_dir`` holds frames."""
        if self.allow_new_dataset or export_dir is None:
            return
        record = read_export_record(export_dir)
        if record is None or not record.frame_keys:
            return
        raise ReviewDatasetMissingError(
            f"FiftyOne review dataset {self.dataset_name!r} does not exist in {self._where()}, "
            f"but the review export {export_dir} holds {len(record.frame_keys)} imported frames "
            f"(from dataset {record.dataset or 'unrecorded'!r}). It is not created empty: every "
            "reviewed frame would be queued again. Restore it: rename the dataset back "
            f"(fo.load_dataset(<its name>).name = {self.dataset_name!r}), set the fiftyone "
            "resource's dataset_name to its name, or restore FiftyOne's database. To start a "
            "new review dataset on purpose (the exported labels stay in training), materialize "
            "frame_embeddings with config start_new_review_dataset: true "
            "(ReviewStore.start_new_dataset)."
        )

    def dataset(self):
        """The review dataset (created, persistent, with its fields, on first use; not when
        the bound export holds frames: ``ReviewDatasetMissingError``)."""
        return self._open(self.export_dir)

    def _open(self, export_dir: Path | None):
        fo = self.fo()
        try:
            if fo.dataset_exists(self.dataset_name):
                ds = fo.load_dataset(self.dataset_name)
                ds.reload()  # tags may have changed in the App (another process)
                return ds
            self._refuse_new_dataset(export_dir)
            ds = fo.Dataset(self.dataset_name, persistent=True)
        except Exception as exc:
            if isinstance(exc, RoadloopError):
                raise
            raise FiftyOneUnavailable(
                f"could not open FiftyOne dataset at {self._where()}: {exc}"
            ) from exc
        init_review_dataset(fo, ds, self.taxonomy)
        return ds

    def delete(self) -> None:
        fo = self.fo()
        if fo.dataset_exists(self.dataset_name):
            fo.delete_dataset(self.dataset_name)

    @staticmethod
    def batch_view_name(batch_id: str) -> str:
        return f"batch_{batch_id}"

    # ---- queue
    def push_queue(self, items: Iterable[ReviewItem | Any], batch_id: str) -> PushResult:
        """Add (or refresh) queue frames; annotators' work on reviewed samples is kept.

        ``predictions`` get every box of the item; a new sample's ``ground_truth`` is their
        draft (``drafts.draft_boxes`` at ``draft_conf`` / ``draft_nms_iou``): what an
        annotator corrects rather than deletes. A refreshed sample keeps its ``ground_truth``.
        """
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
                        ground_truth=_detections(
                            fo,
                            draft_boxes(
                                e.predictions,
                                min_confidence=self.draft_conf,
                                nms_iou=self.draft_nms_iou,
                            ),
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
        ensure_label_schemas(ds, self.taxonomy.classes)
        view = ds.match(F("batch_id") == batch_id).sort_by(F("al_score"), reverse=True)
        ds.save_view(
            result.view, view, description=f"Active-learning batch {batch_id}", overwrite=True
        )
        save_common_views(fo, ds)
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

    def pending_reviews_modified(self) -> dict[str, Any]:
        """The pending samples (as ``pending_reviews``) with when each was last modified
        (FiftyOne's ``last_modified_at``, a naive UTC datetime; None where unset)."""
        ds = self.dataset()
        view = ds.match_tags(TAG_REVIEWED).match_tags(TAG_IMPORTED, bool=False)
        ids, times = view.values(["id", "last_modified_at"])
        return dict(sorted(zip(ids, times, strict=True)))

    def reviewed_frame_keys(self) -> set[str]:
        """Frame keys already reviewed or imported (not candidates for a new batch), and
        those in the bound export (their sample may be gone from the dataset)."""
        ds = self.dataset()
        keys = set(ds.match_tags([TAG_REVIEWED, TAG_IMPORTED]).values("frame_key"))
        record = read_export_record(self.export_dir) if self.export_dir else None
        return keys | set(record.frame_keys if record else [])

    def delete_frames(self, frame_keys: Iterable[str]) -> int:
        """Delete every sample of these frame keys (erasure, retention); returns how many."""
        keys = sorted(set(frame_keys))
        if not keys:
            return 0
        fo = self.fo()
        F = fo.ViewField
        if not fo.dataset_exists(self.dataset_name):  # nothing to delete: do not create it
            return 0
        ds = self.dataset()
        ids = ds.match(F("frame_key").is_in(keys)).values("id")
        if ids:
            ds.delete_samples(ids)
        return len(ids)

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

    def export_reviewed(
        self, out_dir: Path, erased: Iterable[str] | None = None
    ) -> ReviewExport:
        """Write every reviewed sample's labels as a YOLO folder (atomically) and return it.

        Samples pending import are validated first: a box outside the image, a class not in
        the taxonomy, or anything the curated-dataset rules reject makes the sample invalid
        (``review_items.write_review_export``). Invalid samples are not exported: they get
        the message in ``review_error``, lose the ``reviewed`` tag (back in the queue) and
        get the ``review_error`` tag. Open label issues are held out.

        The export starts from the previous one at ``out_dir``: a frame whose sample is still
        in the dataset follows it (re-exported while ``reviewed``; held out when flagged or
        sent back), a frame whose sample is gone keeps its exported labels (``carried_over``,
        a warning names it) unless it was erased (``erased``: frame keys; default: the privacy
        ledger's exclusions). Seed images once excluded stay excluded.
        """
        out_dir = Path(out_dir)
        ds = self._open(self.export_dir or out_dir)
        previous = read_export_record(out_dir)
        rows = read_export_manifest(out_dir)
        erased_keys = set(self._erased_keys() if erased is None else erased)
        live = set(ds.values("frame_key"))
        gone = [r for r in rows if r["frame_key"] not in live]
        carried = [r for r in gone if r["frame_key"] not in erased_keys]
        dropped = sorted(r["frame_key"] for r in gone if r["frame_key"] in erased_keys)
        if dropped:
            logger.info("review export: %d erased frames removed: %s", len(dropped), dropped)
        reviewed = ds.match_tags(TAG_REVIEWED).sort_by("frame_key")
        open_issues = ds.match_tags(TAG_LABEL_ISSUE).match_tags(TAG_REVIEWED, bool=False)
        exclude = {Path(p) for p in ds.exists("source_image").values("source_image") if p}
        exclude |= set(previous.exclude_images if previous else [])
        export = write_review_export(
            (self._reviewed(s) for s in reviewed),
            out_dir,
            self.taxonomy,
            held_out=open_issues.values("frame_key"),
            exclude_images=exclude,
            carried=carried,
            dataset=self.dataset_name,
        )
        before = set(previous.carried_over if previous else [])
        export.vanished = [k for k in export.carried_over if k not in before]
        if export.vanished:
            logger.warning(
                "%d imported frames are no longer in review dataset %r; their exported labels "
                "are kept (an erasure removes them; a label-quality flag sends them back to "
                "review): %s",
                len(export.vanished),
                self.dataset_name,
                ", ".join(export.vanished[:20]) + (" ..." if len(export.vanished) > 20 else ""),
            )
        # Only now (the export is in place) touch FiftyOne: rejected samples go back to the queue.
        errors = {r.sample_id: r.error for r in sorted(export.rejected, key=lambda r: r.frame_key)}
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
            export.path,
        )
        return export

    @staticmethod
    def _erased_keys() -> set[str]:
        """Frame keys erased on request (the privacy ledger): never carried over."""
        from roadloop.retention.ledger import PrivacyLedger
        from roadloop.settings import get_settings

        return PrivacyLedger(get_settings().privacy_dir).excluded_frame_keys()

    @staticmethod
    def _reviewed(sample) -> ReviewedSample:
        return ReviewedSample(
            sample_id=sample.id,
            frame_key=sample.frame_key,
            filepath=sample.filepath,
            ground_truth=sample.ground_truth,
            split=sample.split,
            camera_id=sample.camera_id,
            source_image=sample.source_image,
            batch_id=sample.batch_id,
            pending=TAG_IMPORTED not in sample.tags,
        )

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
        ensure_label_schemas(ds, self.taxonomy.classes)
        save_common_views(fo, ds)
        return result

    def counts(self) -> dict[str, int]:
        ds = self.dataset()
        out = {"samples": len(ds)}
        out.update(ds.count_sample_tags())
        out["pending"] = len(self.pending_reviews())
        return out


__all__ = [
    "LabelIssueResult",
    "PushResult",
    "ReviewDatasetMissingError",
    "ReviewStore",
    "pending_key",
]
