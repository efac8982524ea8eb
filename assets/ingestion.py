"""``sampled_edge_frames``: the frames cameras sent, one partition per camera.

Near-duplicates are dropped here, once: each partition writes the camera's frame index
(``<artifacts>/sampled_edge_frames/<camera>.jsonl``, one ``IndexedFrame`` per kept frame) and
returns its path; downstream stages (``frame_embeddings``) read the index, not the frame store.
"""


import json
from pathlib import Path

import dagster as dg
from pydantic import BaseModel

from resources import ArtifactStoreResource, FrameStoreResource
from roadloop.data.curation import dedupe_near_duplicates, summarize_partition
from roadloop.data.frame_records import FrameRecord
from roadloop.data.frames import jpeg_ends_problem
from roadloop.fsutil import write_text_atomic
from roadloop.markdown import md_cell

from . import groups
from .partitions import camera_partitions


class IndexedFrame(BaseModel):
    """One line of a camera's frame index: a kept frame's record and its image in the store."""

    record: FrameRecord
    image: Path


def read_frame_index(path: Path) -> list[IndexedFrame]:
    """The kept frames a ``sampled_edge_frames`` partition listed, in capture order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [IndexedFrame.model_validate_json(line) for line in lines if line.strip()]


@dg.asset(
    partitions_def=camera_partitions,
    group_name=groups.INGESTION,
    kinds={"python"},
    description=(
        "Frames sampled at the edge (or replayed from shared data) for one camera, with their "
        "sampling reasons and image quality; near-duplicates dropped. The value is the path of "
        "the camera's frame index (one JSON line per kept frame and its image)."
    ),
)
def sampled_edge_frames(
    context: dg.AssetExecutionContext,
    frame_store: FrameStoreResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[Path]:
    camera_id = context.partition_key
    store = frame_store.store()
    listed = list(store.iter_frames(camera_id))
    # Whole JPEGs only, by their ends (a local store: an object store checks on upload).
    frames, broken = [], []
    for record, image in listed:
        problem = jpeg_ends_problem(image) if store.is_local else None
        if problem is None:
            frames.append((record, image))
        else:
            broken.append(f"{image} {problem}")
    images = {record.frame_id: image for record, image in frames}
    policy = frame_store.dedupe_policy()
    kept, dropped = dedupe_near_duplicates([record for record, _ in frames], policy=policy)
    summary = summarize_partition(kept, dropped)
    context.log.info(
        "camera %s: %d frames, %d near-duplicates dropped", camera_id, len(kept), len(dropped)
    )

    # The partition's frame index: one JSON line per kept frame (what downstream reads).
    index_path = artifacts.path("sampled_edge_frames") / f"{camera_id}.jsonl"
    write_text_atomic(
        index_path,
        "".join(
            IndexedFrame(record=r, image=images[r.frame_id]).model_dump_json() + "\n" for r in kept
        ),
    )

    # What the store holds that is no frame (FrameStore.iter_frames skipped it with a Python
    # warning only): named here, in the run's log and metadata, so an operator sees it.
    report = store.fsck(camera_id)
    unreadable = [*sorted(str(p) for p in [*report.orphan_images, *report.corrupt_sidecars,
                                           *report.sidecars_without_image, *report.bad_images]),
                  *broken]
    if unreadable:
        context.log.warning(
            f"camera {camera_id}: {len(unreadable)} entries of the frame store are no frame "
            "(an image without its sidecar, a sidecar that does not read back or names another "
            "frame, an empty, linked, cut or non-JPEG image) and were left out: "
            + ", ".join(unreadable[:10]) + (" …" if len(unreadable) > 10 else ""))

    reasons = summary.per_reason
    return dg.Output(
        index_path,
        metadata={
            "camera_id": camera_id,
            "frames": len(kept),
            # what the frame store held: the new-camera sensor's first tick compares with it
            "store_frames": len(listed),
            "duplicates_dropped": len(dropped),
            "store_unreadable": len(unreadable),
            "dedupe_policy": dg.MetadataValue.json(policy.model_dump()),
            "frames_by_reason": dg.MetadataValue.json(reasons),
            "frames_by_reason_table": dg.MetadataValue.md(
                "| reason | frames |\n|---|---|\n"
                + "\n".join(f"| {md_cell(r)} | {n} |" for r, n in sorted(reasons.items()))
            ),
            "summary": dg.MetadataValue.json(json.loads(summary.model_dump_json())),
            "index": dg.MetadataValue.path(str(index_path)),
        },
    )
