"""Drives the Dagster code location for ``roadloop demo`` (the CLI's bridge to Dagster).

The only module under ``roadloop/`` that imports Dagster, and only when the CLI calls it;
the library's logic modules never do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from roadloop.localfleet import LocalFleet
from roadloop.settings import get_settings
from roadloop.tracking import CANDIDATE_ALIAS, PRODUCTION_ALIAS, Tracker


log = logging.getLogger(__name__)


@dataclass
class LoopOutcome:
    success: bool
    agents: dict[str, int] = field(default_factory=dict)
    cameras: dict[str, int] = field(default_factory=dict)
    materialized: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    candidate: str | None = None
    production: str | None = None
    run_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["", "roadloop learning loop"]
        lines.append("  edge agents (exit codes): " + ", ".join(f"{c}={n}" for c, n in sorted(self.agents.items())))
        lines.append("  cameras (frames kept): " + ", ".join(f"{c}={n}" for c, n in sorted(self.cameras.items())))
        lines.append("  materialized: " + ", ".join(self.materialized))
        lines.append(
            "  checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in sorted(self.checks.items()))
        )
        lines.append(f"  MLflow aliases: candidate=v{self.candidate} production=v{self.production}")
        lines.append(f"  result: {'success' if self.success else 'FAILED'}")
        return "\n".join(lines)


DEFAULT_AGENT_MODEL = "atl_v2_yolo11n_320.onnx"


def stream_videos_through_agents(fleet: LocalFleet, frames_per_agent: int) -> dict[str, int]:
    """One real edge agent per shared video, uploading through the real gateway."""
    settings = get_settings()
    videos = sorted(settings.videos_dir.glob("*.mp4")) if settings.videos_dir.is_dir() else []
    model = settings.models_dir / DEFAULT_AGENT_MODEL
    if not videos or not model.exists():
        log.warning("no shared videos or agent model: skipping the edge agents")
        return {}
    for video in videos:
        fleet.start_agent(
            video.stem,
            video,
            model,
            # Read as fast as inference allows; sample generously so the demo has frames to learn from.
            ["--no-realtime", "--max-frames", str(frames_per_agent), "--base-rate", "0.2",
             "--heartbeat-interval", "5", "--threads", "1"],
        )
    return fleet.wait_agents(timeout_s=900)


def run_demo_loop(frames_per_camera: int = 40, frames_per_agent: int = 150) -> LoopOutcome:
    """Agents + replay → partitions → sampled_edge_frames → the learning loop, on the instance."""
    import dagster as dg

    from definitions import defs

    settings = get_settings()
    instance = dg.DagsterInstance.get()
    outcome = LoopOutcome(success=True)

    with LocalFleet(home=settings.home, port=settings.gateway_port) as fleet:
        fleet.start_gateway()
        outcome.agents = stream_videos_through_agents(fleet, frames_per_agent)
        outcome.success &= all(code == 0 for code in outcome.agents.values())

    # Labelled datasets have no agent: their replay part is played as camera traffic.
    replay = defs.resolve_job_def("replay_ingestion_job").execute_in_process(
        instance=instance,
        run_config={
            "ops": {
                "replay_shared_cameras": {
                    "config": {"max_frames_per_camera": frames_per_camera, "kinds": ["dataset"]}
                }
            }
        },
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
