"""``curated_dataset``: one YOLO dataset in the shared taxonomy, validated and versioned."""


import json

import dagster as dg

from resources import ArtifactStoreResource, DvcResource, LabelledSourcesResource
from roadloop.data.datasets import build_curated_dataset, load_taxonomy, write_data_yaml
from roadloop.labeling.review_items import load_review_export
from roadloop.retention.ledger import PrivacyLedger, without_erased
from roadloop.settings import get_settings

from . import groups
from .active_learning import reviewed_labels
from .records import CuratedDatasetVersion

seed_datasets = dg.AssetSpec(
    "seed_datasets",
    group_name=groups.DATASETS,
    description="Labelled shared datasets (../shared/datasets: atl_v2, manaus_v4), read-only.",
    kinds={"yolo"},
)


@dg.asset(
    # reviewed_labels is a dependency, not a data input: the last export is read from the
    # folder the artifacts resource names (review_export_dir, where reviewed_labels writes it),
    # so the loop runs before anyone has reviewed anything (an empty export).
    deps=[seed_datasets, reviewed_labels],
    group_name=groups.DATASETS,
    kinds={"dvc", "yolo"},
    description=(
        "Labelled frames mapped onto one class taxonomy, validated (a frame with bad label rows quarantined whole), "
        "split without leakage and versioned with DVC."
    ),
)
def curated_dataset(
    context: dg.AssetExecutionContext,
    labelled_sources: LabelledSourcesResource,
    dvc: DvcResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[CuratedDatasetVersion]:
    taxonomy = load_taxonomy(labelled_sources.taxonomy_file)
    sources, synthetic = labelled_sources.sources()
    if synthetic:
        context.log.warning("SYNTHETIC fallback data: ../shared/datasets was not found")
    store = dvc.store()
    reviewed = load_review_export(artifacts.review_export_path())
    # Erased frames (roadloop.retention.erasure) never enter a new version.
    ledger = PrivacyLedger(get_settings().privacy_dir)
    erased = ledger.excluded_frame_keys()
    frames, keys = without_erased(reviewed.frames, reviewed.frame_keys, erased)
    erased_skipped = len(reviewed.frames) - len(frames)
    if erased_skipped:
        context.log.info("%d reviewed frames left out: erased on request", erased_skipped)
    dataset = build_curated_dataset(
        sources,
        dvc.curated_dir,
        taxonomy,
        replay_fraction=labelled_sources.replay_fraction,
        max_frames_per_split=labelled_sources.max_frames_per_split,
        extra_frames=frames,
        exclude_images=reviewed.exclude_images,
    )
    context.log.info(
        "curated %s images (%d frames quarantined, %d orphan label files); pushing to DVC remote %s",
        dataset.split_counts, dataset.frames_quarantined, dataset.orphan_labels, dvc.remote_url,
    )
    version = store.add_and_push(dvc.curated_dir)
    # Which edge frames this version holds: an erasure reports them as not removable.
    kept_images = _manifest_originals(dataset.path)
    ledger.record_version_frames(version.md5,
                                 [k for f, k in zip(frames, keys, strict=True) if str(f.image) in kept_images])
    data_yaml = write_data_yaml(dataset.path, dvc.curated_dir.parent / "curated.data.yaml")

    class_table = "| split | " + " | ".join(dataset.class_names) + " | images |\n"
    class_table += "|---|" + "---|" * (len(dataset.class_names) + 1) + "\n"
    for split, counts in dataset.class_counts.items():
        cells = " | ".join(str(counts.get(c, 0)) for c in dataset.class_names)
        class_table += f"| {split} | {cells} | {dataset.split_counts.get(split, 0)} |\n"

    return dg.Output(
        CuratedDatasetVersion(dataset=dataset, version=version, data_yaml=data_yaml, synthetic=synthetic),
        metadata={
            "dvc_md5": version.md5,
            "dvc_remote": version.remote_url,
            "dvc_restore": f"roadloop dataset restore {version.md5} <target-dir>",
            "files": version.nfiles,
            "split_counts": dg.MetadataValue.json(dataset.split_counts),
            "class_counts": dg.MetadataValue.md(class_table),
            "source_counts": dg.MetadataValue.json(dataset.source_counts),
            "quarantine_records": dataset.quarantined,
            "frames_quarantined": dataset.frames_quarantined,
            "orphan_label_files": dataset.orphan_labels,
            "quarantine_reasons": dg.MetadataValue.json(dataset.quarantine_reasons),
            "skipped_replay_frames": dataset.skipped_replay,
            "reviewed_frames": len(frames),
            "erased_frames_excluded": erased_skipped,
            "excluded_seed_frames": dataset.held_out,
            "label_issues_awaiting_review": len(reviewed.held_out),
            "review_export": reviewed.content_hash or "none",
            "synthetic": synthetic,
            "path": dg.MetadataValue.path(str(dataset.path)),
        },
    )


def _manifest_originals(dataset_dir) -> set[str]:
    """The ``original`` path of every frame a curated dataset's manifest lists."""
    path = dataset_dir / "manifest.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return {json.loads(line)["original"] for line in lines if line.strip()}


@dg.asset_check(asset=curated_dataset, blocking=True, description="train, val and test all hold frames")
def curated_dataset_splits_present(curated_dataset: CuratedDatasetVersion) -> dg.AssetCheckResult:
    counts = curated_dataset.dataset.split_counts
    missing = [s for s in ("train", "val", "test") if counts.get(s, 0) == 0]
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"split_counts": dg.MetadataValue.json(counts), "empty_splits": ", ".join(missing) or "none"},
    )


@dg.asset_check(asset=curated_dataset, description="share of frames quarantined stays small")
def curated_dataset_quarantine_rate(curated_dataset: CuratedDatasetVersion) -> dg.AssetCheckResult:
    # Frames, not label rows: a frame with any rejected row goes whole (roadloop.data.label_checks).
    ds = curated_dataset.dataset
    kept = sum(ds.split_counts.values())
    rate = ds.frames_quarantined / max(1, kept + ds.frames_quarantined)
    return dg.AssetCheckResult(
        passed=rate <= 0.05,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"frames_quarantined": ds.frames_quarantined, "frames_kept": kept,
                  "orphan_label_files": ds.orphan_labels, "rate": rate, "threshold": 0.05},
    )
