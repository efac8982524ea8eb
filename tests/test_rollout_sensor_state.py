"""rollout_health_sensor keeps model_rollout's latest state equal to the gateway's: a rollout
that finished (with or without the sensor) is observed once with its final status, on a real
(ephemeral) Dagster instance; the gateway is a stand-in (the live one: test_rollouts.py)."""

from typing import Any

import dagster as dg
import pytest

STAGES = [{"name": "shadow", "mode": "shadow", "percent": 5.0},
          {"name": "full", "mode": "serve", "percent": 100.0}]


def _rollout(status: str, stage: str = "full") -> dict[str, Any]:
    return {"rollout_id": "ro-1", "model_version": "2", "status": status, "stage": stage,
            "stage_index": [s["name"] for s in STAGES].index(stage), "percent": 100.0,
            "cohort_size": 3, "devices": 3, "stages": STAGES, "history": [], "health": {}}


class FakeGateway:
    """What the fleet resource would read: the live rollout and /evaluate's answer."""

    def __init__(self) -> None:
        self.rollout = _rollout("active", "shadow")
        self.decision = "hold"
        self.evaluated = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from resources.fleet_resource import FleetResource

        live = ("active", "paused")
        monkeypatch.setattr(FleetResource, "active_rollout",
                            lambda _: self.rollout if self.rollout["status"] in live else None)
        monkeypatch.setattr(FleetResource, "status", lambda _, rollout_id=None: self.rollout)
        monkeypatch.setattr(FleetResource, "evaluate", lambda _, rollout_id: self._evaluate())

    def _evaluate(self) -> dict[str, Any]:
        self.evaluated += 1
        return {"rollout": self.rollout, "decision": self.decision,
                "health": {"verdict": "pass", "reasons": []}}


def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    from resources.fleet_resource import FleetResource
    from sensors.rollout_health import rollout_health_sensor

    fleet = FleetResource(gateway_url="http://127.0.0.1:9", admin_token="t")
    out = rollout_health_sensor(dg.build_sensor_context(
        resources={"fleet": fleet}, cursor=cursor, instance=instance))
    if isinstance(out, dg.SensorResult):  # what the daemon would store
        for event in out.asset_events or []:
            instance.report_runless_asset_event(event)
    return out


def _statuses(instance: dg.DagsterInstance) -> list[str]:
    from assets.rollout import model_rollout

    records = instance.fetch_observations(model_rollout.key, limit=100, ascending=True).records
    return [str(r.asset_observation.metadata["status"].value) for r in records
            if r.asset_observation is not None]


def test_a_completed_rollout_is_observed_once_with_status_complete(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gw = FakeGateway()
    gw.install(monkeypatch)
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(instance, None)
    assert isinstance(first, dg.SensorResult) and _statuses(instance) == ["active"]

    gw.rollout, gw.decision = _rollout("complete"), "complete"  # /evaluate advanced it to the end
    done = _tick(instance, first.cursor)
    assert isinstance(done, dg.SensorResult)
    (obs,) = done.asset_events
    assert obs.metadata["status"].value == "complete" and obs.metadata["stage"].value == "full"
    assert obs.metadata["percent"].value == 100.0
    assert _statuses(instance) == ["active", "complete"]

    evaluated = gw.evaluated
    for _ in range(2):  # no live rollout any more: read, not re-recorded
        again = _tick(instance, done.cursor)
        assert isinstance(again, dg.SkipReason)
        assert again.skip_message == "no active rollout (ro-1: complete, recorded)"
    assert gw.evaluated == evaluated and _statuses(instance) == ["active", "complete"]


def test_a_rollout_finished_without_the_sensor_is_recorded_on_its_first_tick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo: the gateway finished the rollout while dagster dev was not running."""
    gw = FakeGateway()
    gw.rollout = _rollout("rolled_back", "shadow")
    gw.install(monkeypatch)
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(instance, None)
    assert isinstance(first, dg.SensorResult) and _statuses(instance) == ["rolled_back"]
    assert first.asset_events[0].metadata["decision"].value == "rolled_back"
    assert gw.evaluated == 0  # a finished rollout is read, not evaluated
    # A reset cursor (or the demo having recorded it): the instance already has it.
    reset = _tick(instance, None)
    assert isinstance(reset, dg.SensorResult) and not reset.asset_events
    assert reset.cursor == first.cursor and _statuses(instance) == ["rolled_back"]


def test_no_rollout_at_all_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    from resources.fleet_resource import FleetResource

    monkeypatch.setattr(FleetResource, "active_rollout", lambda _: None)
    monkeypatch.setattr(FleetResource, "status", lambda _, rollout_id=None: None)
    out = _tick(dg.DagsterInstance.ephemeral(), None)
    assert isinstance(out, dg.SkipReason) and out.skip_message == "no rollout yet"
