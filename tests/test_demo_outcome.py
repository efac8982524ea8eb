"""The demo's verdict on a rollout (launch.demo.rollout_gate_held): a health rollback that the
fleet recovered from is the gate working; anything else that is not complete is a failure."""

from __future__ import annotations

from launch.demo import LoopOutcome, rollout_gate_held

BASE = "6a6d7b736487d71f"
REASONS = ["device dev-1: shadow agreement F1 0.202 < floor 0.5"]


def test_health_rollback_with_every_agent_back_on_the_baseline_is_the_gate_holding() -> None:
    agents = {"cctv_street": BASE, "window_street": BASE}
    assert rollout_gate_held("rolled_back", REASONS, agents, BASE) is True


def test_rollback_without_a_reason_or_with_an_agent_elsewhere_is_a_failure() -> None:
    assert rollout_gate_held("rolled_back", [], {"a": BASE}, BASE) is False
    assert rollout_gate_held("rolled_back", REASONS, {"a": BASE, "b": "1"}, BASE) is False
    assert rollout_gate_held("rolled_back", REASONS, {}, BASE) is False


def test_other_statuses_are_not_a_held_gate() -> None:
    for status in ("active", "paused", None, "complete"):
        assert rollout_gate_held(status, REASONS, {"a": BASE}, BASE) is False


def test_summary_says_the_gate_held() -> None:
    outcome = LoopOutcome(success=True)
    outcome.rollout = {"rollout_id": "ro-1", "status": "rolled_back", "stage": "shadow",
                       "percent": 5.0, "reasons": REASONS, "gate_held": True}
    assert "rolled back by its health gate" in outcome.summary()


def test_summary_shows_the_federated_turn() -> None:
    from launch.federated_turn import FederatedTurnOutcome

    outcome = LoopOutcome(success=True)
    outcome.federated = FederatedTurnOutcome(
        success=True, candidate="3", promoted=False, sites="atl_day, atl_night",
        checks={"candidate_not_worse_than_production": False},
        rounds="| round | sites aggregated |\n| 1 | atl_day, atl_night |",
    )
    text = outcome.summary()
    assert "federated turn: sites atl_day, atl_night; candidate=v3 not promoted" in text
    assert "candidate_not_worse_than_production=FAIL" in text
    assert "| 1 | atl_day, atl_night |" in text
    failed = FederatedTurnOutcome(success=False, error="trained_model did not materialize")
    assert "FAILED (trained_model did not materialize)" in "\n".join(failed.lines())
