"""New-camera sensor: each camera folder in the frame store becomes a dynamic partition."""


import json

import dagster as dg

from assets.partitions import camera_partitions
from jobs import sampled_edge_frames_job
from resources import FrameStoreResource


@dg.sensor(
    job=sampled_edge_frames_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition per new camera and refreshes cameras that sent new frames.",
)
def new_camera_sensor(context: dg.SensorEvaluationContext, frame_store: FrameStoreResource) -> dg.SensorResult:
    store = frame_store.store()
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    counts = {camera: store.count(camera) for camera in store.cameras()}
    known = set(context.instance.get_dynamic_partitions(camera_partitions.name))
    new_cameras = sorted(c for c in counts if c not in known)
    changed = sorted(c for c, n in counts.items() if n > 0 and n != seen.get(c))
    return dg.SensorResult(
        dynamic_partitions_requests=[camera_partitions.build_add_request(new_cameras)] if new_cameras else [],
        # run_key = camera + frame count: the same state never launches twice.
        run_requests=[dg.RunRequest(partition_key=c, run_key=f"{c}:{counts[c]}") for c in changed],
        cursor=json.dumps(counts, sort_keys=True),
    )
