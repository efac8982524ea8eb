"""Run one federation on a local deployment and hand back its result.

The asset, the demo and the benchmark all go through :func:`run_federation`: start a
SuperLink and one SuperNode per site (:class:`~roadloop.federation.deployment.LocalFederation`),
``flwr run`` the app, follow ``result.json`` as rounds finish (``on_round``), and return the
validated :class:`~roadloop.federation.models.FederationResult`. A failed run raises with the
tail of its log; nothing is returned half-written (the ServerApp writes atomically).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from roadloop.errors import RoadloopError
from roadloop.federation.models import FederationConfig, FederationResult, RoundRecord, SiteSpec

logger = logging.getLogger(__name__)

POLL_S = 2.0


class FederationFailed(RoadloopError):
    """The federation did not finish; the message carries the run's log tail."""


def read_result(path: Path) -> FederationResult | None:
    try:
        return FederationResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValidationError, ValueError):
        return None


def run_federation(
    sites: Sequence[SiteSpec],
    cfg: FederationConfig,
    *,
    app_dir: Path,
    initial_weights: Path,
    work_dir: Path,
    eval_yaml: Path | None = None,
    eval_split: str = "test",
    node_overrides: dict[str, dict[str, Any]] | None = None,
    site_records: Path | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    timeout_s: float = 6 * 3600,
    start_timeout_s: float = 180.0,
) -> FederationResult:
    """One federation from ``initial_weights`` over ``sites``; see the module doc.

    ``node_overrides`` adds node-config keys per site (e.g. a red-team ``attack`` for drills);
    ``site_records`` is the platform's view of the sites (``selection.PlatformSiteRecord``).
    """
    from roadloop.federation.deployment import LocalFederation

    work_dir = Path(work_dir).absolute()
    result_path = work_dir / "result" / "result.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    (result_path.parent / "global.pt").unlink(missing_ok=True)  # never a previous run's model
    run_config: dict[str, str | int | float | bool] = {
        **cfg.to_run_config(),
        "initial-weights": str(Path(initial_weights).absolute()),
        "eval-yaml": str(Path(eval_yaml).absolute()) if eval_yaml else "",
        "eval-split": eval_split,
        "result-path": str(result_path),
        "site-records": str(Path(site_records).absolute()) if site_records else "",
    }
    outcome: dict[str, Any] = {}
    seen: set[int] = set()

    def follow() -> None:
        partial = read_result(result_path)
        if partial is None or on_round is None:
            return
        for rec in partial.rounds:
            if rec.round not in seen and rec.eval_metrics:
                seen.add(rec.round)
                on_round(rec)

    with LocalFederation(
        work_dir / "deployment", list(sites), node_overrides=node_overrides or {}
    ) as federation:
        seconds = federation.start(timeout_s=start_timeout_s)
        logger.info("federation of %d sites online in %.1f s", len(sites), seconds)

        def run() -> None:
            try:
                outcome["run"] = federation.run(Path(app_dir), run_config, timeout_s=timeout_s)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="flwr-run", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(POLL_S)
            follow()
    if "error" in outcome:
        raise FederationFailed(f"federation run failed: {outcome['error']}") from outcome["error"]
    run_outcome = outcome["run"]
    result = read_result(result_path)
    if not run_outcome.ok or result is None or not result.weights.is_file():
        rounds = "".join(
            f"\n  round {r.round}: aggregated {r.sites_aggregated}, failures {r.failures}, "
            f"refused {[(x.site, x.reason) for x in r.rejected]}"
            for r in (result.rounds if result else [])
        )
        tail = "\n".join(run_outcome.log.splitlines()[-40:])
        raise FederationFailed(
            f"federation run {run_outcome.run_id} ended {run_outcome.status}; no model at "
            f"{result_path.parent}.{rounds}\n{tail}"
        )
    follow()
    return result
