"""Active learning: embeddings → review queue in FiftyOne → reviewed labels; label quality.

``frame_embeddings`` and ``active_learning_queue`` pick which camera frames annotators see
first (the frames each ``sampled_edge_frames`` partition kept); ``reviewed_labels`` brings
their corrected labels back as an export in the folder ``ArtifactStoreResource`` names
(``curated_dataset`` reads it there); ``label_quality`` flags curated frames whose labels look
wrong, sends them to re-review in FiftyOne and rewrites the export at once, so the next
``curated_dataset`` holds them out. The review store is always bound to that export
(``_review_store``): a lost review dataset is an error, not a new empty one. The current
model is MLflow's ``production`` version, else the ``candidate``. Frames with
salt-and-pepper noise (augmented dataset frames, ``roadloop.labeling.frame_noise``) are not
candidates: they say nothing about the cameras.
"""

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field

from resources import ArtifactStoreResource, MlflowResource, TrainerResource
from resources.fiftyone_resource import FiftyOneResource
from roadloop.data.frame_records import FrameRecord
from roadloop.data.replay import NIGHT_MAX_BRIGHTNESS
from roadloop.errors import InvalidInputError
from roadloop.labeling.active_learning import SCORING_CONF, ALWeights, build_queue, predict_frames
from roadloop.labeling.embeddings import EmbeddingTable, compute_embeddings
from roadloop.labeling.frame_noise import image_impulse_share
from roadloop.labeling.label_quality import (
    LabelQualityReport,
    find_label_issues,
    out_of_sample_predictions,
    write_report,
)
from roadloop.labeling.review_dataset import VIEW_LABEL_ISSUES
from roadloop.labeling.review_items import (
    LabelIssueItem,
    ReviewBox,
    ReviewExport,
    boxes_from_yolo,
    items_from_queue,
)
from roadloop.labeling.review_store import ReviewStore
from roadloop.models.tracking import CANDIDATE_ALIAS, PRODUCTION_ALIAS, Tracker
from roadloop.models.training import configure_ultralytics, resolve_start_weights
from roadloop.settings import get_settings

from . import groups
from .ingestion import IndexedFrame, read_frame_index
from .records import CuratedDatasetVersion
from .ui_metadata import class_mix_table, histogram_markdown

WEIGHTS_ARTIFACT = "weights/best.pt"


# --------------------------------------------------------------------------- records


class CurrentModel(BaseModel):
    """The model active learning scores frames with (MLflow production, else candidate)."""

    registered_name: str
    version: str
    alias: str
    weights: Path
    imgsz: int


class CandidateFrame(BaseModel):
    record: FrameRecord
    image: Path
    conditions: list[str] = Field(default_factory=list)


class FrameEmbeddings(BaseModel):
    """Embeddings of the unlabelled camera frames and of the curated train frames."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: CurrentModel
    candidates: list[CandidateFrame]
    candidate_table: EmbeddingTable
    labelled_table: EmbeddingTable
    class_frequencies: dict[str, float] = Field(default_factory=dict)
    skipped_reviewed: int = 0
    skipped_noisy: int = 0  # salt-and-pepper augmented frames kept out of the queue


class ReviewBatch(BaseModel):
    batch_id: str
    dataset_name: str
    view: str
    app_url: str
    queued: int
    added: int
    updated: int
    per_camera: dict[str, int]
    model_version: str
    excluded_noisy: int = 0


class LabelQualityResult(BaseModel):
    report_json: Path
    n_images: int
    n_flagged: int
    tagged_in_fiftyone: int
    added_to_fiftyone: int
    issue_counts: dict[str, int]
    start_weights: str = ""  # what every K-fold model started from (see docs/review.md)
    review_export_hash: str = ""  # the export rewritten with the flagged frames held out


# --------------------------------------------------------------------------- configs


class ActiveLearningConfig(dg.Config):
    budget: int = 20
    strategy: str = "combined"
    weight_uncertainty: float = 0.4
    weight_diversity: float = 0.3
    weight_rarity: float = 0.3
    per_camera_min_share: float | None = None
    seed: int = 0


class EmbeddingConfig(dg.Config):
    batch: int = 8
    max_labelled_frames: int | None = 500  # curated train frames embedded for diversity
    # Only these cameras' frames become candidates (drift_sensor queues a drifting camera's
    # frames this way); None: every camera.
    cameras: list[str] | None = None
    # Frames with more isolated impulse pixels than this share (salt-and-pepper augmented
    # dataset frames) are not candidates; None: settings.review_max_impulse_share.
    max_impulse_share: float | None = None
    # The review dataset is gone while the review export holds frames: true starts a new,
    # empty one on purpose (exported labels stay in training, their frames are not queued
    # again). Leave false to be told instead (ReviewDatasetMissingError).
    start_new_review_dataset: bool = False


class LabelQualityConfig(dg.Config):
    k_folds: int = 3
    split: str = "train"
    seed: int = 0


# --------------------------------------------------------------------------- helpers


def current_model(tracker: Tracker, name: str, cache: Path) -> CurrentModel:
    """Fetch the weights of the ``production`` version (else ``candidate``) from MLflow."""
    for alias in (PRODUCTION_ALIAS, CANDIDATE_ALIAS):
        version = tracker.version_by_alias(name, alias)
        if version is None:
            continue
        weights = tracker.download(version.run_id, WEIGHTS_ARTIFACT, cache / version.version)
        return CurrentModel(
            registered_name=name,
            version=version.version,
            alias=alias,
            weights=weights,
            imgsz=int(version.tags.get("imgsz", 320)),
        )
    raise dg.Failure(
        f"no `{PRODUCTION_ALIAS}` or `{CANDIDATE_ALIAS}` version of registered model {name!r} "
        "in MLflow: train a model first (materialize trained_model)"
    )


def _review_store(fiftyone: FiftyOneResource, artifacts: ArtifactStoreResource) -> ReviewStore:
    """The review store bound to the export ``curated_dataset`` reads: a lost review dataset
    is reported, not silently re-created empty (every reviewed frame would be queued again)."""
    return fiftyone.store().guarded_by(artifacts.review_export_path())


def _conditions(record: FrameRecord) -> list[str]:
    if record.quality is None:
        return []
    return ["night" if record.quality.brightness < NIGHT_MAX_BRIGHTNESS else "day"]


# --------------------------------------------------------------------------- assets


@dg.asset(
    # Every materialized camera partition of sampled_edge_frames, as {camera: index path};
    # a camera whose partition was never materialized is skipped with a warning.
    ins={"sampled_edge_frames": dg.AssetIn(metadata={"allow_missing_partitions": True})},
    # The loop's way back: the promoted model scores the next review batch. A lineage edge
    # only (the weights come from MLflow's `production` alias, else `candidate`).
    deps=["production_model"],
    group_name=groups.ACTIVE_LEARNING,
    kinds={"pytorch", "numpy"},
    description=(
        "Backbone embeddings (current model: MLflow production, else candidate) of every "
        "unreviewed frame in the cameras' frame indexes (sampled_edge_frames, near-duplicates "
        "already dropped) and of the curated train frames; cached per model version. The "
        "production_model edge is the loop: each promotion scores the next review queue."
    ),
)
def frame_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingConfig,
    curated_dataset: CuratedDatasetVersion,
    sampled_edge_frames: dict[str, Path] | None,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
    fiftyone: FiftyOneResource,
) -> dg.Output[FrameEmbeddings]:
    indexes = sampled_edge_frames or {}  # None when the cameras partition set is empty
    not_ingested = sorted(
        set(context.asset_partition_keys_for_input("sampled_edge_frames")) - set(indexes)
    )
    for camera in not_ingested:
        context.log.warning(
            f"camera {camera}: sampled_edge_frames was never materialized for this partition; "
            "its frames are not candidates (run sampled_edge_frames_job for it)"
        )
    if not indexes:
        context.log.warning("no camera partition of sampled_edge_frames is materialized")
    if config.cameras is not None:
        missing = sorted(set(config.cameras) - set(indexes))
        if missing:
            context.log.warning(f"cameras {missing} have no frame index: nothing to queue for them")
        indexes = {c: p for c, p in indexes.items() if c in set(config.cameras)}
        context.log.info(f"candidates limited to cameras {sorted(indexes)}")
    frames: list[IndexedFrame] = []
    for camera, index in sorted(indexes.items()):
        if not Path(index).is_file():
            raise dg.Failure(
                f"camera {camera}: the frame index {index} that sampled_edge_frames recorded is "
                "gone; materialize that partition again"
            )
        frames.extend(read_frame_index(index))

    configure_ultralytics(get_settings().home / "ultralytics")
    model = current_model(
        mlflow.tracker(), mlflow.registered_model_name, artifacts.path("al_model_cache")
    )
    context.log.info(f"scoring with {model.registered_name} v{model.version} ({model.alias})")

    store = _review_store(fiftyone, artifacts)
    if config.start_new_review_dataset:
        store.start_new_dataset()
    done = store.reviewed_frame_keys()  # reviewed, imported or exported: not candidates again
    max_noise = (
        get_settings().review_max_impulse_share
        if config.max_impulse_share is None
        else config.max_impulse_share
    )
    candidates: list[CandidateFrame] = []
    skipped = gone = 0
    noisy: dict[str, int] = {}
    unreadable: list[str] = []
    for frame in frames:
        record = frame.record
        if f"{record.camera_id}/{record.frame_id}" in done:
            skipped += 1
            continue
        if not frame.image.is_file():  # removed from the store since the partition ran
            gone += 1
            continue
        try:  # decodes the image: one that does not is skipped here, not fatal to all
            share = image_impulse_share(frame.image)
        except InvalidInputError as exc:
            unreadable.append(f"{record.camera_id}/{record.frame_id}")
            context.log.warning(f"frame {record.camera_id}/{record.frame_id} is not a "
                                f"candidate: {exc}")
            continue
        if share > max_noise:
            noisy[record.camera_id] = noisy.get(record.camera_id, 0) + 1
            continue
        candidates.append(
            CandidateFrame(record=record, image=frame.image, conditions=_conditions(record))
        )

    if gone:
        context.log.warning(f"{gone} indexed frames are no longer in the frame store: skipped")
    if unreadable:
        context.log.warning(f"{len(unreadable)} indexed frames do not decode: skipped "
                            f"({', '.join(unreadable[:10])})")
    n_noisy = sum(noisy.values())
    if n_noisy:
        context.log.info(
            f"{n_noisy} frames with salt-and-pepper noise (impulse share > {max_noise:g}) kept "
            f"out of the review queue: {dict(sorted(noisy.items()))}"
        )

    ds_dir = curated_dataset.dataset.path
    labelled = sorted((ds_dir / "images" / "train").glob("*"))[: config.max_labelled_frames]
    cache = artifacts.path("embedding_cache")
    cand_table = compute_embeddings(
        model.weights,
        [c.image for c in candidates],
        imgsz=model.imgsz,
        cache_dir=cache,
        model_version=model.version,
        batch=config.batch,
    )
    lab_table = compute_embeddings(
        model.weights,
        labelled,
        imgsz=model.imgsz,
        cache_dir=cache,
        model_version=model.version,
        batch=config.batch,
    )
    freqs = {k: float(v) for k, v in curated_dataset.dataset.class_counts.get("train", {}).items()}
    return dg.Output(
        FrameEmbeddings(
            model=model,
            candidates=candidates,
            candidate_table=cand_table,
            labelled_table=lab_table,
            class_frequencies=freqs,
            skipped_reviewed=skipped,
            skipped_noisy=n_noisy,
        ),
        metadata={
            "model_version": model.version,
            "model_alias": model.alias,
            "candidate_frames": len(candidates),
            "labelled_frames": len(labelled),
            "skipped_already_reviewed": skipped,
            "excluded_noisy_frames": dg.MetadataValue.int(n_noisy),
            "excluded_noisy_per_camera": dg.MetadataValue.json(dict(sorted(noisy.items()))),
            "max_impulse_share": dg.MetadataValue.float(float(max_noise)),
            "cameras": dg.MetadataValue.json(sorted(indexes)),
            "cameras_not_ingested": dg.MetadataValue.json(not_ingested),
            "indexed_frames_missing": gone,
            "computed_now": cand_table.computed + lab_table.computed,
            "dim": cand_table.dim or lab_table.dim,
        },
    )


@dg.asset(
    group_name=groups.ACTIVE_LEARNING,
    kinds={"fiftyone"},
    description=(
        "The next review batch (uncertainty + diversity + rarity, per-camera fairness) pushed "
        "to FiftyOne as a saved view with the model's boxes as pre-annotations."
    ),
)
def active_learning_queue(
    context: dg.AssetExecutionContext,
    config: ActiveLearningConfig,
    frame_embeddings: FrameEmbeddings,
    fiftyone: FiftyOneResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[ReviewBatch]:
    configure_ultralytics(get_settings().home / "ultralytics")
    emb = frame_embeddings
    model = emb.model
    predictions = predict_frames(
        model.weights,
        [(c.record.frame_id, c.record.camera_id, c.image, c.conditions) for c in emb.candidates],
        imgsz=model.imgsz,
        conf=SCORING_CONF,
        model_version=model.version,
    )
    queue = build_queue(
        predictions,
        emb.candidate_table.vectors if len(emb.candidate_table) else None,
        emb.labelled_table.vectors if len(emb.labelled_table) else None,
        emb.class_frequencies,
        weights=ALWeights(
            uncertainty=config.weight_uncertainty,
            diversity=config.weight_diversity,
            rarity=config.weight_rarity,
        ),
        budget=config.budget,
        strategy=config.strategy,  # type: ignore[arg-type]
        per_camera_min_share=config.per_camera_min_share,
        seed=config.seed,
    )
    records = {(c.record.camera_id, c.record.frame_id): c.record for c in emb.candidates}
    batch_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{context.run_id[:6]}"
    store = _review_store(fiftyone, artifacts)
    pushed = store.push_queue(items_from_queue(queue, records), batch_id)
    out = artifacts.path("active_learning", batch_id)
    (out / "queue.json").write_text(queue.model_dump_json(indent=2), encoding="utf-8")
    url = fiftyone.app_url(view=pushed.view)
    context.log.info(
        f"review batch {batch_id}: {len(queue)} frames; open {url} (roadloop annotate)"
    )
    return dg.Output(
        ReviewBatch(
            batch_id=batch_id,
            dataset_name=store.dataset_name,
            view=pushed.view,
            app_url=url,
            queued=len(queue),
            added=pushed.added,
            updated=pushed.updated,
            per_camera=queue.per_camera(),
            model_version=model.version,
            excluded_noisy=emb.skipped_noisy,
        ),
        metadata={
            "batch_id": batch_id,
            "queued": len(queue),
            "added_to_fiftyone": pushed.added,
            "candidates": queue.n_candidates,
            "excluded_noisy_frames": dg.MetadataValue.int(emb.skipped_noisy),
            "per_camera": dg.MetadataValue.json(queue.per_camera()),
            "total_score_histogram": dg.MetadataValue.md(histogram_markdown(queue.histogram("total"))),
            "expected_class_mix": class_mix_table(queue.expected_class_mix()),
            "queue": dg.MetadataValue.md(queue.to_markdown()),
            "fiftyone_view": pushed.view,
            "app_url": dg.MetadataValue.url(url),
            "queue_json": dg.MetadataValue.path(str(out / "queue.json")),
        },
    )


@dg.asset(
    group_name=groups.ACTIVE_LEARNING,
    kinds={"fiftyone", "yolo"},
    description=(
        "Every sample annotators tagged `reviewed` in FiftyOne, exported as YOLO labels and "
        "validated like every label; invalid edits go back to the queue with `review_error`."
    ),
)
def reviewed_labels(
    context: dg.AssetExecutionContext,
    fiftyone: FiftyOneResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[ReviewExport]:
    store = _review_store(fiftyone, artifacts)
    export = _export(context, store, artifacts)
    # Cumulative export: frames stay in every later export, so a failed curation loses nothing.
    store.mark_imported(export.new_sample_ids)
    rejected_md = "| frame | error |\n|---|---|\n" + "".join(
        f"| {r.frame_key} | {r.error.replace('|', '/')} |\n" for r in export.rejected
    )
    return dg.Output(
        export,
        metadata={
            "frames": len(export.frames),
            "newly_imported": len(export.new_sample_ids),
            # Read by drift_sensor: an owed learning_loop waits for its own camera's reviews.
            "newly_imported_per_camera": dg.MetadataValue.json(export.new_per_camera),
            "rejected": len(export.rejected),
            "rejected_edits": dg.MetadataValue.md(rejected_md if export.rejected else "none"),
            "held_out_label_issues": len(export.held_out),
            "excluded_seed_images": len(export.exclude_images),
            "carried_over_frames": len(export.carried_over),
            "class_counts": dg.MetadataValue.json(export.class_counts),
            "content_hash": export.content_hash,
            "path": dg.MetadataValue.path(str(export.path)),
        },
    )


def _export(
    context: dg.AssetExecutionContext, store: ReviewStore, artifacts: ArtifactStoreResource
) -> ReviewExport:
    """Rewrite the review export (the one ``curated_dataset`` reads) and log what it says."""
    export = store.export_reviewed(artifacts.review_export_path())
    for r in export.rejected:
        context.log.warning(f"review rejected, back in the queue: {r.error}")
    if export.vanished:
        context.log.warning(
            f"{len(export.vanished)} imported frames are no longer in the review dataset; "
            f"their exported labels are kept: {', '.join(export.vanished[:20])}"
        )
    return export


def _issue_items(
    report: LabelQualityReport, dataset_dir: Path, export_dir: Path | None
) -> list[LabelIssueItem]:
    """Flagged curated images as FiftyOne items: seed frames point at their original image;
    frames that came from a review point at their review sample (by frame key)."""
    manifest = {}
    path = dataset_dir / "manifest.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            manifest[str((dataset_dir / row["file"]).absolute())] = row
    review_keys: dict[str, str] = {}
    if export_dir is not None and (export_dir / "manifest.jsonl").is_file():
        for line in (export_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            review_keys[Path(row["image"]).name] = row["frame_key"]
    classes = report.class_names
    items: list[LabelIssueItem] = []
    for img in report.images:
        if not img.flagged:
            continue
        curated = Path(img.image).absolute()
        row = manifest.get(str(curated), {})
        original = Path(row["original"]) if row.get("original") else curated
        label = (
            curated.parent.parent.parent / "labels" / curated.parent.name / f"{curated.stem}.txt"
        )
        frame_key = review_keys.get(original.name) if row.get("source") == "reviewed" else None
        suspect = [
            ReviewBox(
                label=f"{i.description}: {i.class_name}",
                box=_xyxy_to_rel(i.xyxy, original),
                confidence=i.score,
            )
            for i in img.issues
        ]
        items.append(
            LabelIssueItem(
                image=original,
                score=max(0.0, min(1.0, 1.0 - img.quality_score)),
                frame_key=frame_key,
                labels=boxes_from_yolo(label, classes),
                suspect=suspect,
                issue_types=img.issue_types,
                source_image=None if frame_key else original,
                split=row.get("split", "train"),
            )
        )
    return items


def _xyxy_to_rel(
    xyxy: tuple[float, float, float, float], image: Path
) -> tuple[float, float, float, float]:
    from PIL import Image

    with Image.open(image) as im:
        w, h = im.size
    x1, y1, x2, y2 = xyxy
    x1, x2 = max(0.0, x1 / w), min(1.0, x2 / w)
    y1, y2 = max(0.0, y1 / h), min(1.0, y2 / h)
    return (x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1))


@dg.asset(
    group_name=groups.ACTIVE_LEARNING,
    kinds={"cleanlab", "fiftyone"},
    description=(
        "cleanlab on K-fold predictions over the curated train split (out of sample only if "
        "the start weights never saw it: metadata start_weights): flagged frames get a "
        "`label_issue` tag and score in FiftyOne (saved view `label issues`) and the review "
        "export is rewritten, so the next curated_dataset holds them out until re-reviewed."
    ),
)
def label_quality(
    context: dg.AssetExecutionContext,
    config: LabelQualityConfig,
    curated_dataset: CuratedDatasetVersion,
    trainer: TrainerResource,
    fiftyone: FiftyOneResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[LabelQualityResult]:
    configure_ultralytics(get_settings().home / "ultralytics")
    dataset_dir = Path(curated_dataset.dataset.path)
    work = artifacts.path("label_quality", curated_dataset.version.md5[:12])
    train_cfg = trainer.train_config()
    # Every fold model starts from these weights; if they were trained on this split (the
    # shipped atl_v2 checkpoints were), the folds are not truly out of sample: docs/review.md.
    start = resolve_start_weights(train_cfg)
    context.log.info(f"K-fold models start from {start.path_or_name} ({start.kind})")
    if start.kind == "checkpoint":
        context.log.warning(
            f"K-fold models start from the checkpoint {start.path_or_name}: if it was trained on "
            "these frames (the shipped atl_v2 checkpoints were), the folds are not out of "
            "sample and label errors it learned look right (docs/review.md)"
        )
    oos = out_of_sample_predictions(
        dataset_dir,
        k_folds=config.k_folds,
        train_cfg=train_cfg,
        split=config.split,
        work_dir=work / "folds",
        seed=config.seed,
    )
    settings = get_settings()
    report = find_label_issues(
        oos.labels,
        oos.predictions,
        oos.class_names,
        high_probability_threshold=settings.label_qa_high_probability,
        max_quality=(
            settings.label_qa_max_quality if settings.label_qa_flag_by == "score" else None
        ),
    )
    report_json = write_report(report, work / "label_quality.json")
    review_dir = artifacts.review_export_path()
    items = _issue_items(report, dataset_dir, review_dir if review_dir.is_dir() else None)
    store = _review_store(fiftyone, artifacts)
    tagged = store.tag_label_issues(items)
    # Flagged review frames lost `reviewed`, flagged seed frames are now excluded: rewrite the
    # export so the next curated_dataset holds them out without waiting for a review import.
    # Pending reviews are exported too but not tagged `imported`: the reviews sensor still
    # launches review_import for them.
    export = _export(context, store, artifacts)
    context.log.info(
        f"{report.n_flagged}/{len(report.images)} frames flagged; re-review in "
        f"{fiftyone.app_url(view=VIEW_LABEL_ISSUES)}"
    )
    return dg.Output(
        LabelQualityResult(
            report_json=report_json,
            n_images=len(report.images),
            n_flagged=report.n_flagged,
            tagged_in_fiftyone=tagged.tagged,
            added_to_fiftyone=tagged.added,
            issue_counts=report.issue_counts,
            start_weights=start.path_or_name,
            review_export_hash=export.content_hash,
        ),
        metadata={
            "frames": len(report.images),
            "flagged": report.n_flagged,
            "issue_counts": dg.MetadataValue.json(report.issue_counts),
            "flagged_by_type": dg.MetadataValue.json(report.flagged_by_type),
            "flagged_by": settings.label_qa_flag_by,
            "high_probability_threshold": report.high_probability_threshold,
            "report": dg.MetadataValue.md(report.to_markdown()),
            "k_folds": config.k_folds,
            "start_weights": start.path_or_name,
            "start_weights_kind": start.kind,
            "held_out_label_issues": len(export.held_out),
            "excluded_seed_images": len(export.exclude_images),
            "review_export": export.content_hash,
            "dataset_md5": curated_dataset.version.md5,
            "fiftyone_view": dg.MetadataValue.url(fiftyone.app_url(view=VIEW_LABEL_ISSUES)),
            "json": dg.MetadataValue.path(str(report_json)),
        },
    )


ACTIVE_LEARNING_ASSETS = [frame_embeddings, active_learning_queue, reviewed_labels, label_quality]

__all__ = [
    "ACTIVE_LEARNING_ASSETS",
    "active_learning_queue",
    "frame_embeddings",
    "label_quality",
    "reviewed_labels",
]
