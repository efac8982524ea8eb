"""Replay ingestion: plays the shared datasets and videos as cameras into the frame store.

The op; its job (``replay_ingestion_job``) is in the top-level ``jobs`` module.

Stands in for edge agents until they run; it writes the same frame-store layout the fleet
gateway writes, so ``sampled_edge_frames`` cannot tell the difference.
"""


from datetime import UTC, datetime

import dagster as dg

from resources import FrameStoreResource
from roadloop.data.replay import default_replay_cameras, replay_camera
from roadloop.settings import get_settings


class ReplayConfig(dg.Config):
    max_frames_per_camera: int | None = 40
    cameras: list[str] | None = None  # default: every camera whose data exists
    kinds: list[str] = ["dataset", "video"]  # noqa: RUF012 (pydantic copies defaults); the demo streams videos through real agents


@dg.op(description="Replay shared labelled frames and videos as camera traffic.")
def replay_shared_cameras(
    context: dg.OpExecutionContext, config: ReplayConfig, frame_store: FrameStoreResource
) -> dict:
    settings = get_settings()
    cameras = default_replay_cameras(settings)
    if config.cameras:
        cameras = [c for c in cameras if c.camera_id in set(config.cameras)]
    cameras = [c for c in cameras if c.kind in set(config.kinds)]
    store = frame_store.store()
    start = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    written: dict[str, int] = {}
    for camera in cameras:
        stats = replay_camera(
            camera,
            store,
            start_time=start,
            max_frames=config.max_frames_per_camera,
            replay_fraction=settings.replay_fraction,
        )
        written[camera.camera_id] = stats.written
        context.log.info(
            f"{camera.camera_id}: {stats.written} new frames, {stats.already_present} already present, "
            f"{stats.skipped_invalid} invalid"
        )
    return written
