"""Rollout-health sensor: asks the gateway to apply the advance/rollback rule to the live
rollout and records what happened as an observation of ``model_rollout``.

``model_rollout``'s materialization records the rollout as it started (shadow, active); the
sensor keeps the asset's latest state in Dagster equal to the gateway's: an observation per
change while the rollout is live, and one when it has finished (``complete``,
``rolled_back``, ``cancelled``) — also when it finished without the sensor (the demo drives
its rollout itself). A finished state is recorded once: the cursor holds it, and without a
cursor (first tick, a reset) the latest observation in the instance is consulted.
"""

import json
import os
from typing import Any

import dagster as dg

from assets.rollout import model_rollout
from resources.fleet_resource import FleetError, FleetResource, stages_markdown

INTERVAL_S = int(os.environ.get("ROADLOOP_ROLLOUT_SENSOR_INTERVAL_S", "30"))
TERMINAL_STATUSES = ("complete", "rolled_back", "cancelled")


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


def rollout_state(result: dict[str, Any]) -> dict[str, Any]:
    """What the cursor compares. A finished rollout is one state however it was reached (the
    last ``/evaluate`` said ``rollback``, a later read says ``rolled_back``)."""
    rollout = result["rollout"]
    if rollout["status"] in TERMINAL_STATUSES:
        return {"rollout_id": rollout["rollout_id"], "status": rollout["status"]}
    return {
        "rollout_id": rollout["rollout_id"],
        "decision": result["decision"],
        "stage": rollout["stage"],
        "status": rollout["status"],
        "verdict": (result.get("health") or {}).get("verdict"),
    }


def already_observed(context: dg.SensorEvaluationContext, state: dict[str, Any]) -> bool:
    """Whether ``model_rollout``'s latest observation in the instance records this finished
    state already (False when the context has no instance)."""
    try:
        instance = context.instance
    except dg.DagsterInvariantViolationError:
        return False
    records = instance.fetch_observations(model_rollout.key, limit=1).records
    obs = records[0].asset_observation if records else None
    if obs is None:
        return False
    md = obs.metadata
    return all(k in md and md[k].value == state[k] for k in ("rollout_id", "status"))


@dg.sensor(
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Every interval: POST /v1/rollouts/{id}/evaluate on the live rollout (advance after the "
        "hold when healthy, roll back when not) and observe model_rollout with the stage, cohort "
        "size and health per stage; a finished rollout (complete, rolled back) is observed once "
        "with its final status. Cursor: the last state recorded."
    ),
)
def rollout_health_sensor(context: dg.SensorEvaluationContext, fleet: FleetResource):
    try:
        live = fleet.active_rollout()
        if live is not None:
            result = fleet.evaluate(live["rollout_id"])
        else:
            newest = fleet.status()
            if newest is None:
                return dg.SkipReason("no rollout yet")
            result = {"rollout": newest, "decision": newest["status"], "health": None}
    except FleetError as exc:  # the sensor keeps ticking; the reason shows in the UI
        return dg.SkipReason(str(exc))
    state = rollout_state(result)
    cursor = json.dumps(state, sort_keys=True)
    rid, status = state["rollout_id"], state["status"]
    if cursor == context.cursor:  # nothing new: no observation spam
        if status in TERMINAL_STATUSES:
            return dg.SkipReason(f"no active rollout ({rid}: {status}, recorded)")
        return dg.SkipReason(f"{rid}: {state['decision']} at {state['stage']}")
    if status in TERMINAL_STATUSES and already_observed(context, state):
        return dg.SensorResult(cursor=cursor)  # recorded before (the demo, a reset cursor)
    rollout = result["rollout"]
    context.log.info(f"rollout {rid}: {result['decision']} -> stage {rollout['stage']} ({status})")
    return dg.SensorResult(asset_events=[rollout_observation(result)], cursor=cursor)
