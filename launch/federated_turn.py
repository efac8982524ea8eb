"""The demo's federated turn: camera sites train together without sharing frames.

One SuperLink and a SuperNode per site (ATL day, ATL night, Manaus cameras; node
authentication on) run on loopback; ``federated_learning_loop`` federates, exports,
quantizes and benchmarks the result, and the same gates decide whether it is promoted.
A gate that blocks the federated candidate is the loop working, not a failed demo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

FEDERATED_JOB = "federated_learning_loop"


@dataclass
class FederatedTurnOutcome:
    success: bool
    run_id: str | None = None
    candidate: str | None = None
    promoted: bool = False
    checks: dict[str, bool] = field(default_factory=dict)
    sites: str = ""
    rounds: str = ""  # the trained_model's rounds table (markdown)
    error: str | None = None

    def lines(self) -> list[str]:
        if self.error:
            return [f"  federated turn: FAILED ({self.error})"]
        checks = ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in sorted(self.checks.items()))
        verdict = "promoted to production" if self.promoted else "not promoted"
        out = [f"  federated turn: sites {self.sites}; candidate=v{self.candidate} {verdict} ({checks})"]
        out += [f"    {line}" for line in self.rounds.splitlines()]
        return out


def run_federated_turn(defs, instance) -> FederatedTurnOutcome:
    """Run ``federated_learning_loop`` on the instance and read what it did."""
    job = defs.resolve_job_def(FEDERATED_JOB)
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    outcome = FederatedTurnOutcome(success=True, run_id=result.run_id)
    materialized = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    outcome.checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    trained = materialized.get("trained_model")
    if trained is None:
        failures = [e.message for e in result.all_events if e.is_failure]
        outcome.success = False
        outcome.error = "; ".join(failures)[:500] or "trained_model did not materialize"
        return outcome
    outcome.candidate = str(trained["model_version"].value)
    outcome.sites = str(trained["sites"].value)
    outcome.rounds = str(trained["rounds"].value)
    outcome.promoted = "production_model" in materialized
    blocked_by_gate = "benchmark_report" in materialized and not all(outcome.checks.values())
    outcome.success = result.success or blocked_by_gate
    log.info("federated turn: candidate v%s, promoted=%s", outcome.candidate, outcome.promoted)
    return outcome
