"""Drives the Dagster code location for ``roadloop demo`` (the CLI's bridge to Dagster).

An entry point: it starts a local fleet (``launch.localfleet``), then materializes the code
location's jobs in-process. ``launch.cli`` imports it only when ``demo`` runs, so other
commands do not load Dagster.

Every run, finished or stopped part-way, leaves its stage times (with the load average at
start and end, the flags it ran with, the CPU count and the date) in
``demo_timings.{json,md}`` beside the before/after report (``launch.demo_before_after``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from launch.demo_traffic import TrafficOutcome, configure_cameras, materialize_report, preview
from launch.drift_turn import DriftTurnOutcome, prepare_streams, run_drift_turn, start_camera
from launch.federated_turn import FederatedTurnOutcome, run_federated_turn
from launch.localfleet import LocalFleet
from roadloop.fsutil import sha256_file, write_text_atomic
from roadloop.models.tracking import CANDIDATE_ALIAS, PRODUCTION_ALIAS, Tracker
from roadloop.settings import get_settings

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
    rollout: dict = field(default_factory=dict)
    agent_models: dict[str, str] = field(default_factory=dict)
    review_queue: int = 0
    # wall seconds per demo stage, in order (a stage that failed still has its time)
    timings: dict[str, float] = field(default_factory=dict)
    failed_stage: str | None = None  # the stage an exception left, if one did
    timings_files: list[str] = field(default_factory=list)  # demo_timings.{json,md}
    review_turns: list[dict] = field(default_factory=list)
    drift: DriftTurnOutcome | None = None
    federated: FederatedTurnOutcome | None = None
    traffic: TrafficOutcome | None = None
    # The minimum-quality check's description when the loop promoted under a relaxed floor
    quality_floor: str = ""
    # The before/after table as printed (launch.demo_before_after) and where its files are
    before_after: list[str] = field(default_factory=list)
    before_after_files: list[str] = field(default_factory=list)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            self.failed_stage = stage
            raise
        finally:
            self.timings[stage] = round(time.monotonic() - t0, 1)
            log.info("stage %s took %.1f s", stage, self.timings[stage])

    def summary(self) -> str:
        lines = ["", "roadloop learning loop"]
        lines.append("  edge agents (exit codes): " + ", ".join(f"{c}={n}" for c, n in sorted(self.agents.items())))
        lines.append("  cameras (frames kept): " + ", ".join(f"{c}={n}" for c, n in sorted(self.cameras.items())))
        lines.append("  materialized: " + ", ".join(self.materialized))
        lines.append(
            "  checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in sorted(self.checks.items()))
        )
        lines.append(f"  MLflow aliases: candidate=v{self.candidate} production=v{self.production}")
        if self.quality_floor:
            lines.append("  NOTE: promoted under the relaxed demo quality floor, not a production "
                         "bar (a short demo training run): " + self.quality_floor)
        if self.rollout:
            lines.append(
                f"  rollout {self.rollout.get('rollout_id')}: status={self.rollout.get('status')} "
                f"stage={self.rollout.get('stage')} ({self.rollout.get('percent')} %) "
                + "; ".join(self.rollout.get("reasons") or [])
                + ("  (rolled back by its health gate; every agent serves the baseline again)"
                   if self.rollout.get("gate_held") else "")
            )
            lines.append(
                "  agents now serving: " + ", ".join(f"{c}={v}" for c, v in sorted(self.agent_models.items()))
            )
        if self.traffic is not None:
            lines += self.traffic.lines()
        if self.drift is not None:
            lines += self.drift.lines()
        if self.federated is not None:
            lines += self.federated.lines()
        lines.append(f"  review queue pushed to FiftyOne: {self.review_queue} frames")
        for turn in self.review_turns:
            lines.append(
                f"  review turn {turn['turn']}: {turn['reviewed']} frames reviewed (simulated "
                f"annotator), {turn['imported']} imported, dataset {turn['dataset_md5']}, "
                f"candidate=v{turn['candidate']} production=v{turn['production']} (checks "
                + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in sorted(turn["checks"].items()))
                + f"), {turn['seconds']:.0f} s"
            )
        if self.before_after:
            lines.append("  before/after the loop (" + ", ".join(self.before_after_files) + "):")
            lines += [f"    {line}" for line in self.before_after]
        if self.timings:
            lines.append("  stage times (s): " + ", ".join(f"{k}={v:.0f}" for k, v in self.timings.items())
                         + (f" ({', '.join(self.timings_files)})" if self.timings_files else ""))
        lines.append(f"  result: {'success' if self.success else 'FAILED'}")
        return "\n".join(lines)


# The agents' model: the gpu checkpoint's 320 px export, else the older CPU-trained one.
AGENT_MODELS = ("atl_v2_yolo11n_gpu_320.onnx", "atl_v2_yolo11n_320.onnx")
DEFAULT_AGENT_MODEL = AGENT_MODELS[0]
# A demo fleet is three agents: short holds, and few frames per stage, so the rollout finishes
# in about a minute. Production keeps the gateway defaults (30 min holds, 20 frames).
DEMO_GATEWAY_ENV = {
    "ROADLOOP_GATEWAY_ROLLOUT_MIN_FRAMES": "5",
    "ROADLOOP_GATEWAY_ROLLOUT_MIN_REPORTING_FRACTION": "1.0",
}


def _videos_and_model() -> tuple[list, object]:
    settings = get_settings()
    videos = sorted(settings.videos_dir.glob("*.mp4")) if settings.videos_dir.is_dir() else []
    found = [settings.models_dir / n for n in AGENT_MODELS if (settings.models_dir / n).exists()]
    if not found:
        return [], settings.models_dir / DEFAULT_AGENT_MODEL
    return videos, found[0]


def stream_videos_through_agents(fleet: LocalFleet, frames_per_agent: int) -> dict[str, int]:
    """One real edge agent per shared video, uploading through the real gateway."""
    videos, model = _videos_and_model()
    if not videos:
        log.warning("no shared videos or agent model: skipping the edge agents")
        return {}
    started = [
        fleet.start_agent(
            video.stem,
            video,
            model,
            # Read as fast as inference allows; sample generously so the demo has frames to learn from.
            ["--no-realtime", "--max-frames", str(frames_per_agent), "--base-rate", "0.2",
             "--heartbeat-interval", "5", "--threads", "1"],
        )
        for video in videos
    ]
    return fleet.wait_agents(timeout_s=900, agents=started)


TIMINGS_NAME = "demo_timings"


def demo_timings_record(
    timings: dict[str, float],
    *,
    flags: dict,
    started_at: datetime,
    finished_at: datetime,
    wall_s: float,
    load_start: tuple[float, ...] | list[float],
    load_end: tuple[float, ...] | list[float],
    success: bool,
    error: str | None = None,
    failed_stage: str | None = None,
) -> dict:
    """What ``demo_timings.json`` holds: the stages that ran, in order, and under what."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        usable = None
    return {
        "date": started_at.date().isoformat(),
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "complete": error is None,  # False: stopped part-way; the stages below are what ran
        "success": bool(success and error is None),
        "error": error,
        "failed_stage": failed_stage,
        "flags": dict(flags),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in load_end],
        "stages_s": dict(timings),
        "stages_total_s": round(sum(timings.values()), 1),
        "wall_s": round(wall_s, 1),
    }


def demo_timings_markdown(record: dict) -> str:
    def loads(v: list[float]) -> str:
        return " / ".join(f"{x:.2f}" for x in v)

    if record["complete"]:
        result = "success" if record["success"] else "FAILED (ran to the end)"
    else:
        result = f"stopped part-way: {record['error']}"
        if record.get("failed_stage"):
            result += f" (in stage `{record['failed_stage']}`)"
    flags = ", ".join(f"{k}={v}" for k, v in record["flags"].items())
    lines = [
        "# Demo stage timings",
        "",
        (f"{record['started_at']} → {record['finished_at']} · {record['cpu_count']} CPUs"
         + (f" ({record['cpus_usable']} usable)" if record.get("cpus_usable") else "")
         + f" · result: {result}"),
        "",
        f"Flags: {flags}.",
        "",
        (f"Load average (1/5/15 min) at start {loads(record['load_average_start'])}, "
         f"at end {loads(record['load_average_end'])}."),
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {stage} | {s:.1f} |" for stage, s in record["stages_s"].items()),
        f"| sum of the stages | {record['stages_total_s']:.1f} |",
        f"| whole run (wall, set-up included) | {record['wall_s']:.1f} |",
        "",
    ]
    return "\n".join(lines)


def write_demo_timings(folder: Path, record: dict) -> tuple[Path, Path]:
    """``folder/demo_timings.json`` and ``.md``, each written atomically."""
    json_path, md_path = folder / f"{TIMINGS_NAME}.json", folder / f"{TIMINGS_NAME}.md"
    write_text_atomic(json_path, json.dumps(record, indent=2) + "\n", parents=True)
    write_text_atomic(md_path, demo_timings_markdown(record), parents=True)
    return json_path, md_path


def run_demo_loop(
    frames_per_camera: int = 40,
    frames_per_agent: int = 150,
    review_turns: int = 0,
    reviews_per_turn: int = 20,
    drift_turn: bool = True,
    federated_turn: bool = True,
) -> LoopOutcome:
    """Agents + replay → partitions → sampled_edge_frames → the learning loop, on the instance.

    Then the new production model rolls out to the agents and the next review batch goes to
    FiftyOne. Each of ``review_turns`` closes the loop once more: the simulated annotator
    reviews ``reviews_per_turn`` queued frames, ``review_import`` cuts a new dataset version
    and the learning loop trains, gates and (when the checks pass) promotes again.

    The stage times go to ``demo_timings.{json,md}`` however the run ends (an exception too:
    then with the stages that ran).
    """
    outcome = LoopOutcome(success=True)
    flags = {
        "drift_turn": drift_turn,
        "federated_turn": federated_turn,
        "review_turns": review_turns,
        "reviews_per_turn": reviews_per_turn,
        "frames_per_camera": frames_per_camera,
        "frames_per_agent": frames_per_agent,
        "profile": get_settings().profile,
    }
    started_at, t0, load_start = datetime.now(UTC), time.monotonic(), os.getloadavg()
    error: str | None = None
    try:
        _demo_loop(outcome, frames_per_camera, frames_per_agent, review_turns, reviews_per_turn,
                   drift_turn, federated_turn)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
        raise
    finally:
        _save_timings(outcome, flags, started_at, time.monotonic() - t0, load_start, error)
    return outcome


def _save_timings(outcome: LoopOutcome, flags: dict, started_at: datetime, wall_s: float,
                  load_start: tuple[float, ...], error: str | None) -> None:
    """The stage times beside the before/after report; never the reason a run fails."""
    try:
        from launch.demo_before_after import reports_dir

        record = demo_timings_record(
            outcome.timings, flags=flags, started_at=started_at, finished_at=datetime.now(UTC),
            wall_s=wall_s, load_start=load_start, load_end=os.getloadavg(),
            success=outcome.success, error=error, failed_stage=outcome.failed_stage,
        )
        paths = write_demo_timings(reports_dir(get_settings()), record)
    except Exception:  # a run's own error (if any) must stay the one raised
        log.exception("demo stage timings not written")
        return
    outcome.timings_files = [str(p) for p in paths]
    log.info("demo stage timings: %s", ", ".join(outcome.timings_files))


def _demo_loop(
    outcome: LoopOutcome,
    frames_per_camera: int,
    frames_per_agent: int,
    review_turns: int,
    reviews_per_turn: int,
    drift_turn: bool,
    federated_turn: bool,
) -> None:
    """The demo's stages, in order, recorded on ``outcome`` (see ``run_demo_loop``)."""
    import dagster as dg

    from definitions import defs

    settings = get_settings()
    instance = dg.DagsterInstance.get()

    from roadloop.release.signing import load_or_create_signing_key

    # The platform's signing key exists before the gateway starts: the gateway hands its public
    # half to agents at enrollment, and they pin it.
    load_or_create_signing_key(settings.home / "keys")
    fleet = LocalFleet(home=settings.home, port=settings.gateway_port, gateway_env=DEMO_GATEWAY_ENV)
    _, agent_model = _videos_and_model()
    streams = prepare_streams(settings) if drift_turn and agent_model.exists() else None
    try:
        fleet.start_gateway()
        token_file = fleet.write_admin_token()
        # Before the agents start: each polls its configuration once before its first frame.
        outcome.traffic = _configure_traffic(fleet, token_file)
        streamed_from = datetime.now(UTC).date()
        with outcome.timed("edge_agents_stream"):
            outcome.agents = stream_videos_through_agents(fleet, frames_per_agent)
        outcome.success &= all(code == 0 for code in outcome.agents.values())
        _run_learning_loop(defs, instance, settings, outcome, frames_per_camera)
        if outcome.production and outcome.agents:
            with outcome.timed("rollout_to_agents"):
                _roll_out_to_agents(defs, instance, fleet, outcome)
        if outcome.agents and outcome.traffic.configured:
            fleet.stop_agents()  # their last (partial) interval records go out as they stop
            with outcome.timed("traffic_report"):
                materialize_report(defs, instance, [streamed_from, datetime.now(UTC).date()],
                                   outcome.traffic)
            outcome.success &= outcome.traffic.success
        # After the rollout, so neither the benchmark's latency nor the rollout shares the CPU
        # with it: the camera joins, takes the fleet's model, and its day windows become its
        # drift reference.
        if streams is not None and outcome.production:
            fleet.stop_agents()  # the video cameras have shown the rollout; free their CPU
            day_agent = start_camera(fleet, streams[0], agent_model)
            with outcome.timed("drift_turn"):
                outcome.drift = run_drift_turn(
                    defs, instance, settings, fleet, day_agent, datetime.now(UTC), streams[1],
                    agent_model, reviews_per_turn, lambda: _aliases(settings),
                )
            outcome.success &= outcome.drift.success
            outcome.candidate, outcome.production = _aliases(settings)
    finally:
        fleet.stop()
    if federated_turn and outcome.production:
        # After the fleet stops: the sites' training nodes get the CPU to themselves.
        with outcome.timed("federated_turn"):
            outcome.federated = run_federated_turn(defs, instance)
        outcome.success &= outcome.federated.success
        outcome.candidate, outcome.production = _aliases(settings)
    if outcome.production:
        with outcome.timed("review_queue_push"):
            _push_review_queue(defs, instance, outcome)
        for turn in range(1, review_turns + 1):
            _review_turn(defs, instance, settings, outcome, turn, reviews_per_turn)
    if outcome.production or outcome.candidate:
        with outcome.timed("before_after_table"):
            _before_after(defs, settings, outcome)


def _before_after(defs, settings, outcome: LoopOutcome) -> None:
    """The start checkpoint vs the promoted model (and the candidate) on the held-out test
    sets; a table that cannot be built is said in the summary, not a failed loop."""
    from launch.demo_before_after import demo_before_after
    from roadloop.evaluation.before_after import render_text

    try:
        built = demo_before_after(settings, defs.resources["trainer"].train_config(),
                                  production=outcome.production, candidate=outcome.candidate)
    except Exception as exc:  # reported below; the loop itself ran
        log.exception("before/after table failed")
        outcome.before_after = [f"not built: {type(exc).__name__}: {str(exc)[:300]}"]
        return
    if built is None:
        outcome.before_after = ["not built: no benchmark report for the candidate or production"]
        return
    table, json_path, md_path = built
    outcome.before_after = render_text(table)
    outcome.before_after_files = [str(json_path), str(md_path)]


def _configure_traffic(fleet: LocalFleet, token_file) -> TrafficOutcome:
    """Each video camera's counting lines and zones (launch.demo_geometry), via the gateway."""
    from resources import build_resources

    videos, _ = _videos_and_model()
    traffic = TrafficOutcome()
    traffic.configured = configure_cameras(build_resources()["fleet"],
                                           [(video.stem, video.name) for video in videos])
    preview(traffic, fleet.url, token_file)
    return traffic


def _run_learning_loop(defs, instance, settings, outcome: LoopOutcome, frames_per_camera: int) -> None:
    """Replay labelled cameras → partitions → sampled_edge_frames → the learning loop."""
    # Labelled datasets have no agent: their replay part is played as camera traffic.
    with outcome.timed("replay_and_partitions"):
        _ingest(defs, instance, settings, outcome, frames_per_camera)
    with outcome.timed("learning_loop"):
        _learning_loop_job(defs, instance, settings, outcome)


def _ingest(defs, instance, settings, outcome: LoopOutcome, frames_per_camera: int) -> None:
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

    from roadloop.data.object_frames import platform_frame_store

    store = platform_frame_store(settings)  # where the replay wrote: folder or object store
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


def _learning_loop_job(defs, instance, settings, outcome: LoopOutcome, gates_may_block: bool = False) -> None:
    """Curate → train → export → quantize → benchmark → (checks) → promote; aliases read back.

    ``gates_may_block``: a candidate that fails a blocking check (worse than production, say)
    is the loop working, not a failed demo; only the first turn must promote.
    """
    loop = defs.resolve_job_def("learning_loop").execute_in_process(instance=instance, raise_on_error=False)
    outcome.run_ids.append(loop.run_id)
    outcome.materialized = [
        e.materialization.asset_key.to_user_string() for e in loop.get_asset_materialization_events()
    ]
    outcome.checks = {}
    for evaluation in loop.get_asset_check_evaluations():
        outcome.checks[evaluation.check_name] = evaluation.passed
        relaxed = evaluation.metadata.get("relaxed_floor")
        if evaluation.check_name == "model_meets_quality_floor" and relaxed and relaxed.value:
            outcome.quality_floor = evaluation.description or ""
            log.warning("quality floor: %s", outcome.quality_floor)
    # Blocked by a gate = the report was made and a check failed; anything else is a failure.
    blocked_by_gate = (
        gates_may_block and "benchmark_report" in outcome.materialized
        and not all(outcome.checks.values())
    )
    outcome.success &= loop.success or blocked_by_gate

    outcome.candidate, outcome.production = _aliases(settings)


def _aliases(settings) -> tuple[str | None, str | None]:
    """MLflow's (candidate, production) versions now."""
    tracker = Tracker(str(settings.mlflow_tracking_uri), settings.mlflow_experiment, settings.mlflow_artifact_root)
    cand = tracker.version_by_alias(settings.registered_model_name, CANDIDATE_ALIAS)
    prod = tracker.version_by_alias(settings.registered_model_name, PRODUCTION_ALIAS)
    return (cand.version if cand else None), (prod.version if prod else None)


def _roll_out_to_agents(defs, instance, fleet: LocalFleet, outcome: LoopOutcome, timeout_s: float = 300) -> None:
    """Agents stream again (looping, real time) while the new production model rolls out.

    The rollout is driven through the gateway's evaluate endpoint — the same call the
    rollout-health sensor makes every 30 s under ``dagster dev``, here every second.
    """
    from resources import build_resources

    videos, model = _videos_and_model()
    for video in videos:
        fleet.start_agent(
            video.stem, video, model,
            ["--loop", "--realtime", "--threads", "1", "--heartbeat-interval", "2",
             "--update-interval", "1", "--base-rate", "0", "--no-condition-samplers",
             "--hourly-budget", "1"],
        )
    result = defs.resolve_job_def("model_rollout_job").execute_in_process(instance=instance, raise_on_error=False)
    outcome.run_ids.append(result.run_id)
    outcome.success &= result.success
    if not result.success:
        return
    md = result.get_asset_materialization_events()[0].materialization.metadata
    rollout_id = str(md["rollout_id"].value)
    fleet_resource = build_resources()["fleet"]
    deadline = time.monotonic() + timeout_s
    state: dict = {}
    while time.monotonic() < deadline:
        state = fleet_resource.evaluate(rollout_id)
        log.info("rollout %s: %s at %s (%s %%)", rollout_id, state.get("decision"), state.get("stage"), state.get("percent"))
        if state.get("status") in ("complete", "rolled_back", "cancelled"):
            break
        time.sleep(1.0)
    if state.get("rollout"):
        # Dagster's latest state of model_rollout is the gateway's final one (the sensor that
        # records it under `dagster dev` finds it recorded and does not repeat it).
        from sensors.rollout_health import rollout_observation

        instance.report_runless_asset_event(rollout_observation(state))
    time.sleep(5)  # one more heartbeat from every agent
    outcome.rollout = {"rollout_id": rollout_id, **{k: state.get(k) for k in ("status", "stage", "percent")}}
    outcome.rollout["reasons"] = (state.get("health") or {}).get("reasons") or []
    token = (fleet.home / "fleet" / "admin-token").read_text().strip()
    for agent in fleet.agents:
        beat = fleet.latest_heartbeat(agent.camera_id, token) or {}
        outcome.agent_models[agent.camera_id] = str(
            beat.get("serving_model_version") or beat.get("model_version", "?")
        )[:16]
    baseline = sha256_file(model)[:16]  # what the agents served before the rollout
    outcome.rollout["gate_held"] = rollout_gate_held(
        state.get("status"), outcome.rollout["reasons"], outcome.agent_models, baseline
    )
    outcome.success &= state.get("status") == "complete" or outcome.rollout["gate_held"]


def rollout_gate_held(
    status: str | None, reasons: list[str], agent_models: dict[str, str], baseline: str
) -> bool:
    """A rollout the gateway rolled back on its health verdict is the gate working, not a
    failed demo — but only when it says why and every agent serves the baseline again.

    The shadow cohort is one device chosen by a hash of its random id, so which camera judges
    the demo's (weak) model changes from run to run; a rollback is a legitimate outcome.
    """
    return (
        status == "rolled_back"
        and bool(reasons)
        and bool(agent_models)
        and all(version == baseline for version in agent_models.values())
    )


def _review_turn(defs, instance, settings, outcome: LoopOutcome, turn: int, n_reviews: int) -> None:
    """One more turn: simulated reviews → import + new dataset version → learning loop."""
    from roadloop.labeling.oracle import SimulatedAnnotator, simulate_reviews

    t0 = time.monotonic()
    with outcome.timed(f"turn{turn}_simulated_review"):
        store = defs.resources["fiftyone"].store()
        reviewed = simulate_reviews(store, SimulatedAnnotator(), n_reviews)
    with outcome.timed(f"turn{turn}_review_import"):
        result = defs.resolve_job_def("review_import").execute_in_process(
            instance=instance, raise_on_error=False
        )
    outcome.run_ids.append(result.run_id)
    outcome.success &= result.success
    imported, md5 = 0, "?"
    for event in result.get_asset_materialization_events():
        md = event.materialization.metadata
        if event.asset_key.to_user_string() == "reviewed_labels" and "newly_imported" in md:
            imported = int(md["newly_imported"].value)
        if event.asset_key.to_user_string() == "curated_dataset" and "dvc_md5" in md:
            md5 = str(md["dvc_md5"].value)[:12]
    with outcome.timed(f"turn{turn}_learning_loop"):
        _learning_loop_job(defs, instance, settings, outcome, gates_may_block=True)
    outcome.review_turns.append({
        "turn": turn, "reviewed": len(reviewed), "imported": imported, "dataset_md5": md5,
        "candidate": outcome.candidate, "production": outcome.production,
        "checks": dict(outcome.checks), "seconds": time.monotonic() - t0,
    })


def _push_review_queue(defs, instance, outcome: LoopOutcome) -> None:
    """Score the camera frames and push the next review batch to FiftyOne for annotators."""
    from jobs import review_queue_job

    job = defs.resolve_job_def(review_queue_job.name)
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    outcome.run_ids.append(result.run_id)
    outcome.success &= result.success
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == "active_learning_queue":
            md = event.materialization.metadata
            outcome.review_queue = int(md["queued"].value) if "queued" in md else 0
