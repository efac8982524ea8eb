"""``sampled_edge_frames``: the frames cameras sent, one partition per camera."""


import json
import os
from pathlib import Path

import dagster as dg

from resources import ArtifactStoreResource, FrameStoreResource
from roadloop.data.frames import dedupe_near_duplicates, summarize_partition

from .partitions import camera_partitions


@dg.asset(
    partitions_def=camera_partitions,
    group_name="ingestion",
    kinds={"python"},
    description=(
        "Frames sampled at the edge (or replayed from shared data) for one camera, with their "
        "sampling reasons and image quality; near-duplicates dropped."
    ),
)
def sampled_edge_frames(
    context: dg.AssetExecutionContext,
    frame_store: FrameStoreResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[Path]:
    camera_id = context.partition_key
    store = frame_store.store()
    records = [record for record, _ in store.iter_frames(camera_id)]
    policy = frame_store.dedupe_policy()
    kept, dropped = dedupe_near_duplicates(records, policy=policy)
    summary = summarize_partition(kept, dropped)
    context.log.info(
        "camera %s: %d frames, %d near-duplicates dropped", camera_id, len(kept), len(dropped)
    )

    # The partition's frame index: one JSON line per kept frame (what downstream reads).
    out_dir = artifacts.path("sampled_edge_frames")
    index_path = out_dir / f"{camera_id}.jsonl"
    tmp = index_path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as fh:
        for record in kept:
            fh.write(record.model_dump_json() + "\n")
    os.replace(tmp, index_path)

    reasons = summary.per_reason
    return dg.Output(
        index_path,
        metadata={
            "camera_id": camera_id,
            "frames": len(kept),
            "duplicates_dropped": len(dropped),
            "dedupe_policy": dg.MetadataValue.json(policy.model_dump()),
            "frames_by_reason": dg.MetadataValue.json(reasons),
            "frames_by_reason_table": dg.MetadataValue.md(
                "| reason | frames |\n|---|---|\n"
                + "\n".join(f"| {r} | {n} |" for r, n in sorted(reasons.items()))
            ),
            "summary": dg.MetadataValue.json(json.loads(summary.model_dump_json())),
            "index": dg.MetadataValue.path(str(index_path)),
        },
    )
