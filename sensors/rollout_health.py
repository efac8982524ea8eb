"""Rollout-health sensor: asks the gateway to apply the advance/rollback rule to the live
rollout and records what happened as an observation of ``model_rollout``."""

import json
import os

import dagster as dg

from assets.rollout import model_rollout
from resources.fleet_resource import FleetError, FleetResource, stages_markdown

INTERVAL_S = int(os.environ.get("ROADLOOP_ROLLOUT_SENSOR_INTERVAL_S", "30"))


def rollout_observation(result: dict) -> dg.AssetObservation:
    """Stage, cohort size and health per stage of one ``/evaluate`` answer."""
    rollout = result["rollout"]
    health = result.get("health") or {}
    return dg.AssetObservation(
        asset_key=model_rollout.key,
        metadata={
            "rollout_id": rollout["rollout_id"],
            "model_version": rollout["model_version"],
            "decision": result["decision"],
            "status": rollout["status"],
            "stage": rollout["stage"],
            "percent": float(rollout["percent"]),
            "cohort_size": int(rollout["cohort_size"]),
            "devices": int(rollout["devices"]),
            "verdict": health.get("verdict", "n/a"),
            "reasons": "; ".join(health.get("reasons") or []) or (rollout.get("reason") or ""),
            "health_per_stage": dg.MetadataValue.md(stages_markdown(rollout)),
            "history": dg.MetadataValue.json(rollout.get("history", [])),
        },
    )


@dg.sensor(
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Every interval: POST /v1/rollouts/{id}/evaluate on the live rollout (advance after the "
        "hold when healthy, roll back when not) and observe model_rollout with the stage, cohort "
        "size and health per stage. Cursor: the last decision."
    ),
)
def rollout_health_sensor(context: dg.SensorEvaluationContext, fleet: FleetResource):
    try:
        live = fleet.active_rollout()
        if live is None:
            return dg.SkipReason("no active rollout")
        result = fleet.evaluate(live["rollout_id"])
    except FleetError as exc:  # the sensor keeps ticking; the reason shows in the UI
        return dg.SkipReason(str(exc))
    rollout = result["rollout"]
    state = {
        "rollout_id": rollout["rollout_id"],
        "decision": result["decision"],
        "stage": rollout["stage"],
        "status": rollout["status"],
        "verdict": (result.get("health") or {}).get("verdict"),
    }
    cursor = json.dumps(state, sort_keys=True)
    if cursor == context.cursor:  # nothing new: no observation spam
        return dg.SkipReason(f"{state['rollout_id']}: {state['decision']} at {state['stage']}")
    context.log.info(f"rollout {state['rollout_id']}: {state['decision']} -> stage "
                     f"{state['stage']} ({state['status']})")
    return dg.SensorResult(asset_events=[rollout_observation(result)], cursor=cursor)
