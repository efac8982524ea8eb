"""The federated source of ``trained_model``: a Flower federation across camera sites.

Sites keep their frames; only weights travel. The federation starts from the current
production model (else the trainer's start weights), is evaluated after every round on the
curated dataset's held-out split, logs each round to MLflow (step = round) and the Dagster
log as it finishes, and its final model becomes the ``candidate`` — the same asset, so the
same export, benchmark gates, promotion and staged rollout follow.
"""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from assets.active_learning import current_model
from federated import APP_DIR
from resources import (
    ArtifactStoreResource,
    FederationResource,
    FleetResource,
    MlflowResource,
    TrainerResource,
)
from roadloop.federation.models import FederationResult, RoundRecord, SiteSpec
from roadloop.federation.runner import run_federation
from roadloop.federation.selection import sites_live_at_gateway
from roadloop.federation.sites import build_site_datasets, sites_in
from roadloop.models.tracking import Tracker
from roadloop.models.training import resolve_start_weights
from roadloop.settings import get_settings

from .records import CuratedDatasetVersion


def round_metrics(rec: RoundRecord) -> dict[str, float]:
    """One round as flat MLflow metrics."""
    out: dict[str, float] = {f"heldout/{k}": float(v) for k, v in rec.eval_metrics.items()}
    out["sites/aggregated"] = float(len(rec.sites_aggregated))
    out["sites/rejected"] = float(len(rec.rejected))
    out["sites/failed"] = float(len(rec.failures))
    out["bytes/to_site"] = float(rec.bytes_to_site)
    if rec.bytes_from_site:
        out["bytes/from_site_mean"] = sum(rec.bytes_from_site.values()) / len(rec.bytes_from_site)
    losses = [v for k, v in rec.train_metrics.items() if k.endswith("/train-loss")]
    if losses:
        out["train/loss_mean"] = sum(losses) / len(losses)
    if rec.epsilon is not None:
        out["dp/epsilon"] = rec.epsilon
    out["seconds"] = rec.seconds
    return out


def rounds_table(result: FederationResult) -> str:
    lines = [
        "| round | sites sampled | sites aggregated | refused | mAP50 held-out | epsilon |",
        "|---|---|---|---|---|---|",
        f"| 0 (start) | | | | {result.initial_eval.get('mAP50', float('nan')):.4f} | |",
    ]
    for rec in result.rounds:
        refused = "; ".join(f"{r.site}: {r.reason}" for r in rec.rejected) or ""
        eps = f"{rec.epsilon:.2f}" if rec.epsilon is not None else ""
        lines.append(
            f"| {rec.round} | {', '.join(rec.sites_sampled)} | {', '.join(rec.sites_aggregated)} | "
            f"{refused} | "
            f"{rec.eval_metrics.get('mAP50', float('nan')):.4f} | {eps} |"
        )
    return "\n".join(lines)


def _start_weights(tracker: Tracker, registered: str, trainer: TrainerResource,
                   cache: Path) -> tuple[Path, str]:
    try:
        model = current_model(tracker, registered, cache)
        return model.weights, f"{model.alias} v{model.version}"
    except dg.Failure:
        start = resolve_start_weights(trainer.train_config())
        return Path(start.path_or_name), f"{start.kind}: {start.note}"


def _sites(federation: FederationResource, artifacts: ArtifactStoreResource) -> list[SiteSpec]:
    if federation.sites_path() is not None:
        return sites_in(federation.sites_path())
    plan = build_site_datasets(
        get_settings().datasets_dir, artifacts.path("federation", "sites"),
        manaus_sites=federation.manaus_sites,
    )
    return plan.sites


def _site_records(federation: FederationResource, fleet: FleetResource, dest: Path) -> Path | None:
    """The gateway's view of each site (are its cameras heard from), for site selection."""
    if not federation.site_cameras:
        return None
    records = sites_live_at_gateway(
        {site: list(cams) for site, cams in federation.site_cameras.items()},
        fleet.live_cameras(), datetime.now(UTC), timedelta(hours=federation.live_within_hours),
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({k: v.model_dump() for k, v in records.items()}, indent=2))
    return dest


def federate_candidate(
    context: dg.AssetExecutionContext,
    curated_dataset: CuratedDatasetVersion,
    federation: FederationResource,
    trainer: TrainerResource,
    fleet: FleetResource,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
    run_id: str,
) -> tuple[FederationResult, str]:
    """Run the federation for ``trained_model``; returns the result and where it started."""
    tracker = mlflow.tracker()
    cfg = federation.federation_config()
    sites = _sites(federation, artifacts)
    start, start_note = _start_weights(
        tracker, mlflow.registered_model_name, trainer, artifacts.path("production_cache")
    )
    tracker.log_params(run_id, {**cfg.model_dump(), "sites": ",".join(s.name for s in sites),
                                "start": start_note})
    context.log.info(
        f"federating {cfg.strategy} over {len(sites)} sites "
        f"({', '.join(f'{s.name}: {s.frames}' for s in sites)}) from {start_note}"
    )
    split = "test" if (curated_dataset.dataset.path / "images" / "test").is_dir() else "val"

    def on_round(rec: RoundRecord) -> None:
        tracker.log_metrics(run_id, round_metrics(rec), step=rec.round)
        refused = f"; refused {[(r.site, r.reason) for r in rec.rejected]}" if rec.rejected else ""
        context.log.info(
            f"round {rec.round}/{cfg.rounds}: aggregated {rec.sites_aggregated}, held-out "
            f"mAP50 {rec.eval_metrics.get('mAP50', float('nan')):.4f}{refused}"
        )

    work_dir = artifacts.path("federation", "runs", run_id)
    records = _site_records(federation, fleet, work_dir / "site_records.json")
    if records is not None:
        context.log.info(f"sites at the gateway: {records.read_text()}")
    result = run_federation(
        sites, cfg, app_dir=APP_DIR, initial_weights=start, work_dir=work_dir,
        site_records=records,
        eval_yaml=curated_dataset.data_yaml, eval_split=split, on_round=on_round,
        node_overrides={site: {"attack": str(attack)} for site, attack in federation.drills.items()},
    )
    if result.initial_eval:
        tracker.log_metrics(run_id, {f"heldout/{k}": v for k, v in result.initial_eval.items()},
                            step=0)
    summary = result.model_dump(mode="json")
    summary_path = result.weights.parent / "federation.json"
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tracker.log_artifact(run_id, summary_path, "federation")
    return result, start_note
