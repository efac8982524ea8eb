"""The federation's ServerApp: ask the sites who they are, run the configured strategy over
them, evaluate the global model on a held-out set after every round, and write the final
model (an Ultralytics checkpoint) and the round records.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden by ``flwr run
--run-config``): the fields of :class:`roadloop.federation.models.FederationConfig` in
kebab case, plus ``initial-weights`` (checkpoint the federation starts from),
``eval-yaml`` / ``eval-split`` (held-out frames the server evaluates on; empty: none) and
``result-path`` (where ``result.json`` goes; the model is written beside it as ``global.pt``)
and ``site-records`` (optional JSON of the platform's view of each site: whether the gateway
hears from its cameras; a site it does not hear from is not drawn).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from federated.records import Layout, pack, weights_of
from federated.strategy import build_strategy
from roadloop.federation.flower_config import InvalidConfigError
from roadloop.federation.models import FederationConfig, FederationResult
from roadloop.federation.privacy import SitePrivacyLedger
from roadloop.federation.selection import (
    PlatformSiteRecord,
    SiteRecord,
    merge_platform_records,
)
from roadloop.fsutil import atomic_path

logger = logging.getLogger("flwr").getChild("roadloop")

app = ServerApp()

QUERY_TIMEOUT_S = 120.0


def discover_sites(grid: Grid, want: int, timeout_s: float) -> dict[int, SiteRecord]:
    """Ask every connected node for its site's name and labelled frames (a QUERY message)."""
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(1.0)
    nodes = list(grid.get_node_ids())
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY,
                dst_node_id=node)
        for node in nodes
    ]
    sites: dict[int, SiteRecord] = {}
    seen: set[str] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("node %d did not say which site it is: %s", node, reply.error.reason)
            continue
        try:
            info = next(iter(reply.content.config_records.values()))
            record = SiteRecord(
                site=str(info["site"]), frames=int(info["frames"]),
                quality=float(info["quality"]),
            )
        except (KeyError, TypeError, ValueError) as exc:  # it cannot describe itself: no training
            logger.warning("node %d sent an unusable site description: %s", node, exc)
            continue
        if record.site in seen:
            logger.warning("node %d claims site %s, already taken: ignored", node, record.site)
            continue
        seen.add(record.site)
        sites[node] = record
    return sites


def sanitize_norm_statistics(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Clamp running variances to be positive (DP noise can push them below zero).

    Post-processing of a released model, so it costs no privacy.
    """
    out = dict(arrays)
    for key, value in arrays.items():
        if key.endswith("running_var"):
            out[key] = np.maximum(value, 1e-6).astype(value.dtype)
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    from roadloop.federation.local_training import evaluate_arrays
    from roadloop.federation.weights import load_detection_model, save_checkpoint, state_arrays
    from roadloop.models.training import read_data_yaml

    run_config = dict(context.run_config)
    cfg = FederationConfig.from_run_config(run_config)
    result_path = Path(str(run_config["result-path"]))
    out_dir = result_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir / "server"
    eval_yaml = str(run_config.get("eval-yaml", "") or "")
    eval_split = str(run_config.get("eval-split", "test"))
    initial = Path(str(run_config["initial-weights"]))
    class_names = read_data_yaml(Path(eval_yaml)) if eval_yaml else None

    sites = discover_sites(grid, cfg.min_available_sites, QUERY_TIMEOUT_S)
    records_path = str(run_config.get("site-records", "") or "")
    if records_path:  # the platform's view of the sites (the gateway's camera records)
        known = {
            site: PlatformSiteRecord.model_validate(rec)
            for site, rec in json.loads(Path(records_path).read_text(encoding="utf-8")).items()
        }
        sites = {node: merge_platform_records(rec, known.get(rec.site)) for node, rec in sites.items()}
        for rec in sites.values():
            if not rec.live:
                logger.info("site %s: the gateway has not heard from its cameras", rec.site)
    logger.info("sites: %s", {rec.site: rec.frames for rec in sites.values()})
    if len(sites) < cfg.min_available_sites:
        raise RuntimeError(
            f"{len(sites)} sites described themselves, fewer than min_available_sites "
            f"{cfg.min_available_sites}"
        )
    if cfg.dp and (problem := cfg.dp_delta_problem(len(sites))):  # N is known only now
        raise InvalidConfigError(f"federation run config: {problem}")
    model = load_detection_model(initial, class_names)
    initial_arrays = state_arrays(model)
    layout = Layout.of(initial_arrays)
    strategy, screening = build_strategy(cfg, sites)
    screening.layout = layout
    ledger = SitePrivacyLedger(cfg.dp_noise_multiplier, cfg.dp_delta) if cfg.dp else None
    evals: dict[int, dict[str, float]] = {}

    def write_result(arrays: dict[str, np.ndarray] | None) -> None:
        rounds = [screening.rounds[r] for r in sorted(screening.rounds)]
        for rec in rounds:
            rec.eval_metrics = evals.get(rec.round, rec.eval_metrics)
        weights = out_dir / "global.pt"
        if arrays is not None:
            save_checkpoint(
                arrays, initial, weights, class_names=class_names or [],
                meta={"federation": cfg.model_dump(), "sites": sorted(r.site for r in sites.values())},
            )
        result = FederationResult(
            config=cfg,
            sites=sorted(rec.site for rec in sites.values()),
            rounds=rounds,
            weights=weights,
            initial_eval=evals.get(0, {}),
            epsilon=ledger.epsilon if ledger else None,
            dp_delta=cfg.dp_delta if ledger else None,
        )
        with atomic_path(result_path) as tmp:
            Path(tmp).write_text(result.model_dump_json(indent=2), encoding="utf-8")

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        record = screening.rounds.get(server_round)
        if ledger is not None and record is not None and record.sites_aggregated:
            record.epsilon = ledger.record_round()
            logger.info("round %d: epsilon %.3f (delta %g)", server_round, record.epsilon,
                        cfg.dp_delta)
        if not eval_yaml:
            return None
        numpy_arrays = sanitize_norm_statistics(weights_of(arrays, layout))
        metrics = evaluate_arrays(
            numpy_arrays, Path(eval_yaml), split=eval_split, template_checkpoint=initial,
            imgsz=cfg.imgsz, work_dir=work_dir / f"eval-{server_round}",
            class_names=class_names,
        )
        evals[server_round] = {k: float(v) for k, v in metrics.items()}
        logger.info("round %d: held-out %s", server_round, evals[server_round])
        if server_round > 0:
            write_result(None)
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    result = strategy.start(
        grid=grid,
        initial_arrays=pack(initial_arrays, layout),
        num_rounds=cfg.rounds,
        timeout=cfg.round_timeout_s,
        train_config=ConfigRecord({"local-epochs": cfg.local_epochs, **layout.to_config()}),
        evaluate_config=ConfigRecord(layout.to_config()),
        evaluate_fn=evaluate,
    )
    if not list(result.arrays.keys()):  # no round aggregated anything
        write_result(None)
        reasons = [
            f"round {r.round}: {'; '.join(r.failures + [x.reason for x in r.rejected]) or 'none'}"
            for r in screening.rounds.values()
        ]
        raise RuntimeError(f"no round produced a model ({', '.join(reasons)})")
    final = sanitize_norm_statistics(weights_of(result.arrays, layout))
    write_result(final)
    logger.info("federation finished: %s", result_path)
