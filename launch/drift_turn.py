"""The demo's drift turn: one turn of the loop that no person starts.

A camera (``roadside_atl``) joins the fleet after the first rollout and streams the day
frames of ATL's camera-replay share through a real edge agent; once it serves the fleet's
model, its windows become its drift reference. Then the same camera plays night frames. The turn then runs the code location's
own sensors (``drift_window_sensor``, ``drift_sensor``) and executes the runs they request,
as the Dagster daemon would:

window scored → drift → sampling raised through the camera's configuration → the camera's
frames queued for review → the simulated annotator reviews → a new dataset version → the
owed ``learning_loop`` run → a candidate gated (and rolled out when promoted).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from launch.localfleet import AgentProcess, LocalFleet
from roadloop.data.replay import IMAGE_SUFFIXES, NIGHT_MAX_BRIGHTNESS
from roadloop.data.splits import REPLAYABLE_SPLIT, is_replay_frame
from roadloop.monitoring.windows import DRIFT_WINDOW_FORMAT, window_start
from roadloop.settings import Settings

log = logging.getLogger(__name__)

DRIFT_CAMERA = "roadside_atl"
# The demo's drift windows: 1 min, a 3-window reference, 10 s for the last heartbeats.
DEMO_DRIFT_ENV = {
    "ROADLOOP_DRIFT_WINDOW_MINUTES": "1",
    "ROADLOOP_DRIFT_REFERENCE_WINDOWS": "3",
    "ROADLOOP_DRIFT_GRACE_S": "10",
    "ROADLOOP_DRIFT_COOLDOWN_MINUTES": "30",
}
# Takes model updates like any camera: the demo's one rollout, after this turn, reaches it too.
AGENT_ARGS = ["--loop", "--realtime", "--threads", "1", "--heartbeat-interval", "2",
              "--base-rate", "0.1", "--hourly-budget", "3600", "--update-interval", "1"]


@dataclass
class DriftTurnOutcome:
    success: bool = False
    shifted_at: str | None = None
    windows: list[dict[str, Any]] = field(default_factory=list)  # window, verdict, metric, score
    boost: dict[str, Any] = field(default_factory=dict)  # what the agent reported
    queued: int = 0
    reviewed: int = 0
    dataset_md5: str | None = None
    loop_tags: dict[str, str] = field(default_factory=dict)
    candidate: str | None = None
    production: str | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"  drift turn (camera {DRIFT_CAMERA}, day → night at {self.shifted_at}):"]
        for w in self.windows:
            score = "" if w.get("score") is None else f" {w['metric']}={w['score']:.3f}"
            out.append(f"    window {w['window']}: {w['verdict']}{score}")
        if self.boost:
            out.append(f"    sampling raised: config v{self.boost.get('config_version')}, base rate "
                       f"{self.boost.get('sampling_base_rate')} until "
                       f"{self.boost.get('sampling_boost_until')}")
        out.append(f"    review queue for {DRIFT_CAMERA}: {self.queued} frames; simulated "
                   f"annotator reviewed {self.reviewed}; dataset {self.dataset_md5}")
        if self.loop_tags:
            out.append("    learning_loop started by drift_sensor: " + ", ".join(
                f"{k.split('/')[-1]}={v}" for k, v in sorted(self.loop_tags.items())))
            out.append(f"    candidate=v{self.candidate} production=v{self.production} (checks "
                       + ", ".join(f"{k}={'pass' if v else 'FAIL'}"
                                   for k, v in sorted(self.checks.items())) + ")")
        out += [f"    note: {n}" for n in self.notes]
        return out


# --------------------------------------------------------------------------- streams
def _mean_luma(path: Path) -> float | None:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None if img is None else float(np.mean(img))


def prepare_streams(settings: Settings) -> tuple[Path, Path] | None:
    """Day and night image folders (symlinks to ATL's camera-replay share, never a seed,
    val or test frame), split by mean luma like the ``atl_day``/``atl_night`` replay cameras."""
    images = settings.datasets_dir / "atl_v2" / "images" / REPLAYABLE_SPLIT
    if not images.is_dir():
        return None
    root = settings.home / "demo_streams" / DRIFT_CAMERA
    day, night = root / "day", root / "night"
    for folder in (day, night):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    for p in sorted(images.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not is_replay_frame(
                "atl_v2", REPLAYABLE_SPLIT, p.stem, settings.replay_fraction):
            continue
        luma = _mean_luma(p)
        if luma is None:
            continue
        target = night if luma < NIGHT_MAX_BRIGHTNESS else day
        (target / p.name).symlink_to(p.resolve())
    if not any(day.iterdir()) or not any(night.iterdir()):
        return None
    return day, night


def start_camera(fleet: LocalFleet, folder: Path, model: Path) -> AgentProcess:
    return fleet.start_agent(DRIFT_CAMERA, folder, model, AGENT_ARGS)


def _stop_agent(fleet: LocalFleet, agent: AgentProcess) -> None:
    import signal

    agent.process.send_signal(signal.SIGTERM)
    agent.process.wait(timeout=60)
    fleet.agents = [a for a in fleet.agents if a is not agent]


def _wait_until(moment: datetime) -> None:
    delay = (moment - datetime.now(UTC)).total_seconds()
    if delay > 0:
        log.info("drift turn: waiting %.0f s for windows to close", delay)
        time.sleep(delay)


# --------------------------------------------------------------------------- the turn
def run_drift_turn(defs: Any, instance: Any, settings: Settings, fleet: LocalFleet,
                   day_agent: AgentProcess, day_started: datetime, night: Path, model: Path,
                   reviews: int, aliases: Any) -> DriftTurnOutcome:
    """Shift the camera to night, then let the sensors drive the loop (see module doc)."""
    import dagster as dg

    from resources import build_resources
    from sensors.drift import drift_sensor, drift_window_sensor

    out = DriftTurnOutcome()
    length = timedelta(minutes=settings.drift_window_minutes)
    grace = timedelta(seconds=settings.drift_grace_s)
    first = window_start(day_started, settings.drift_window_minutes)
    # the camera first takes the fleet's model; its reference is the windows after that
    settled = _await_settled(fleet, timeout_s=180)
    _wait_until(window_start(settled, settings.drift_window_minutes)
                + (settings.drift_reference_windows + 1) * length + grace)
    _stop_agent(fleet, day_agent)
    shifted = datetime.now(UTC)
    out.shifted_at = shifted.strftime("%H:%M:%S")
    start_camera(fleet, night, model)
    # the first window wholly at night, closed
    _wait_until(window_start(shifted, settings.drift_window_minutes) + 2 * length + grace)

    fleet_resource = build_resources()["fleet"]
    # 1. drift_window_sensor → camera_drift runs, from the camera's first window on
    cursor: str | None = (first - length).isoformat()
    drift_job = defs.resolve_job_def("camera_drift_job")
    while True:
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"fleet": fleet_resource})
        result = drift_window_sensor(ctx)
        if not isinstance(result, dg.SensorResult) or not result.run_requests:
            break
        for req in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        for rr in result.run_requests:
            if rr.tags.get("roadloop/drift_camera") != DRIFT_CAMERA:
                continue  # the other demo cameras are scored by the daemon after the demo
            run = drift_job.execute_in_process(instance=instance, partition_key=rr.partition_key,
                                               tags=rr.tags, raise_on_error=False)
            md = run.get_asset_materialization_events()[0].materialization.metadata \
                if run.success else {}
            out.windows.append({
                "window": rr.tags.get("roadloop/drift_window"),
                "verdict": md["verdict"].value if "verdict" in md else "run failed",
                "metric": md["metric"].value if "metric" in md else "",
                "score": md["score"].value if md.get("alarm") and md["alarm"].value else None,
            })
        cursor = result.cursor
    if not any(w["verdict"] in ("minor", "significant") for w in out.windows):
        out.notes.append("no drift window fired: nothing for the sensors to do")
        return out

    # 2. drift_sensor → sampling boost (gateway) + review queue for the camera
    ctx = dg.build_sensor_context(instance=instance, cursor=None, resources={"fleet": fleet_resource})
    result = drift_sensor(ctx)
    sensor_cursor = result.cursor if isinstance(result, dg.SensorResult) else None
    queue_requests = [r for r in getattr(result, "run_requests", []) or []
                      if r.job_name == "review_queue"]
    out.boost = _await_boost(fleet, timeout_s=30)
    if not queue_requests:
        out.notes.append("drift_sensor requested no review queue (drift was minor)")
        return out
    frames_job = defs.resolve_job_def("sampled_edge_frames_job")
    frames_job.execute_in_process(instance=instance, partition_key=DRIFT_CAMERA)  # new_camera_sensor's part
    rr = queue_requests[0]
    queue = defs.resolve_job_def("review_queue").execute_in_process(
        instance=instance, run_config=rr.run_config, tags=rr.tags, raise_on_error=False)
    for event in queue.get_asset_materialization_events():
        if event.asset_key.to_user_string() == "active_learning_queue":
            out.queued = int(event.materialization.metadata["queued"].value)

    # 3. the simulated annotator reviews; review_import cuts a new dataset version
    from roadloop.labeling.oracle import SimulatedAnnotator, simulate_reviews

    out.reviewed = len(simulate_reviews(defs.resources["fiftyone"].store(), SimulatedAnnotator(),
                                        reviews))
    imported = defs.resolve_job_def("review_import").execute_in_process(
        instance=instance, raise_on_error=False)
    for event in imported.get_asset_materialization_events():
        md = event.materialization.metadata
        if event.asset_key.to_user_string() == "curated_dataset" and "dvc_md5" in md:
            out.dataset_md5 = str(md["dvc_md5"].value)[:12]

    # 4. drift_sensor again: the owed learning_loop, tagged with the drift that fired it
    ctx = dg.build_sensor_context(instance=instance, cursor=sensor_cursor,
                                  resources={"fleet": fleet_resource})
    result = drift_sensor(ctx)
    loops = [r for r in getattr(result, "run_requests", []) or [] if r.job_name == "learning_loop"]
    if not loops:
        out.notes.append("drift_sensor owes learning_loop until the reviews are imported")
        return out
    out.loop_tags = {k: v for k, v in loops[0].tags.items() if k.startswith("roadloop/drift_")}
    loop = defs.resolve_job_def("learning_loop").execute_in_process(
        instance=instance, tags=loops[0].tags, raise_on_error=False)
    out.checks = {e.check_name: e.passed for e in loop.get_asset_check_evaluations()}
    out.candidate, out.production = aliases()
    # a gate holding a weaker candidate back is the loop working; a crashed run is not
    out.success = loop.success or "benchmark_report" in {
        e.materialization.asset_key.to_user_string() for e in loop.get_asset_materialization_events()}
    return out


def _await_settled(fleet: LocalFleet, timeout_s: float) -> datetime:
    """When the camera serves one model for good (its updater no longer downloading or
    shadowing, the same model in two heartbeats running)."""
    token = (fleet.home / "fleet" / "admin-token").read_text().strip()
    deadline = time.monotonic() + timeout_s
    last: str | None = None
    while time.monotonic() < deadline:
        beat = fleet.latest_heartbeat(DRIFT_CAMERA, token) or {}
        version = beat.get("model_version")
        if (version and version == last
                and beat.get("update_status") not in ("downloading", "shadow")):
            return datetime.now(UTC)
        last = version
        time.sleep(2.5)
    log.warning("drift turn: %s did not settle on one model in %.0f s", DRIFT_CAMERA, timeout_s)
    return datetime.now(UTC)


def _await_boost(fleet: LocalFleet, timeout_s: float) -> dict[str, Any]:
    """The camera's heartbeat once it reports the boosted configuration."""
    token = (fleet.home / "fleet" / "admin-token").read_text().strip()
    deadline = time.monotonic() + timeout_s
    beat: dict[str, Any] = {}
    while time.monotonic() < deadline:
        beat = fleet.latest_heartbeat(DRIFT_CAMERA, token) or {}
        if beat.get("sampling_boost_until"):
            break
        time.sleep(1.0)
    return {k: beat.get(k) for k in ("config_version", "sampling_base_rate",
                                     "sampling_hourly_budget", "sampling_boost_until")}


__all__ = ["DEMO_DRIFT_ENV", "DRIFT_CAMERA", "DRIFT_WINDOW_FORMAT", "DriftTurnOutcome",
           "prepare_streams", "run_drift_turn", "start_camera"]
