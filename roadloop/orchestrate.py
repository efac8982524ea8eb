"""Drives the Dagster code location for ``roadloop demo`` (the CLI's bridge to Dagster).

The only module under ``roadloop/`` that imports Dagster, and only when the CLI calls it;
the library's logic modules never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from roadloop.settings import get_settings
from roadloop.tracking import CANDIDATE_ALIAS, PRODUCTION_ALIAS, Tracker


@dataclass
class LoopOutcome:
    success: bool
    cameras: dict[str, int] = field(default_factory=dict)
    materialized: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    candidate: str | None = None
    production: str | None = None
    run_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["", "roadloop learning loop"]
        lines.append("  cameras (frames kept): " + ", ".join(f"{c}={n}" for c, n in sorted(self.cameras.items())))
        lines.append("  materialized: " + ", ".join(self.materialized))
        lines.append(
            "  checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in sorted(self.checks.items()))
        )
        lines.append(f"  MLflow aliases: candidate=v{self.candidate} production=v{self.production}")
        lines.append(f"  result: {'success' if self.success else 'FAILED'}")
        return "\n".join(lines)


def run_demo_loop(frames_per_camera: int = 40) -> LoopOutcome:
    """Replay cameras → partitions → sampled_edge_frames → the learning loop, on the instance."""
    import dagster as dg

    from definitions import defs

    settings = get_settings()
    instance = dg.DagsterInstance.get()
    outcome = LoopOutcome(success=True)

    replay = defs.resolve_job_def("replay_ingestion_job").execute_in_process(
        instance=instance,
        run_config={"ops": {"replay_shared_cameras": {"config": {"max_frames_per_camera": frames_per_camera}}}},
    )
    outcome.run_ids.append(replay.run_id)

    from roadloop.frames import FrameStore

    store = FrameStore(settings.frame_store)
    cameras = store.cameras()
    new = [c for c in cameras if not instance.has_dynamic_partition("cameras", c)]
    if new:
        instance.add_dynamic_partitions("cameras", new)
    frames_job = defs.resolve_job_def("sampled_edge_frames_job")
    for camera in cameras:
        result = frames_job.execute_in_process(instance=instance, partition_key=camera)
        outcome.run_ids.append(result.run_id)
        for event in result.get_asset_materialization_events():
            md = event.materialization.metadata
            outcome.cameras[camera] = int(md["frames"].value) if "frames" in md else 0
        outcome.success &= result.success

    loop = defs.resolve_job_def("learning_loop").execute_in_process(instance=instance, raise_on_error=False)
    outcome.run_ids.append(loop.run_id)
    outcome.success &= loop.success
    outcome.materialized = [
        e.materialization.asset_key.to_user_string() for e in loop.get_asset_materialization_events()
    ]
    for evaluation in loop.get_asset_check_evaluations():
        outcome.checks[evaluation.check_name] = evaluation.passed

    tracker = Tracker(str(settings.mlflow_tracking_uri), settings.mlflow_experiment, settings.mlflow_artifact_root)
    cand = tracker.version_by_alias(settings.registered_model_name, CANDIDATE_ALIAS)
    prod = tracker.version_by_alias(settings.registered_model_name, PRODUCTION_ALIAS)
    outcome.candidate = cand.version if cand else None
    outcome.production = prod.version if prod else None
    return outcome
