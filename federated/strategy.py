"""Strategies by configuration, behind a wrapper that selects sites and screens their updates.

``build_strategy`` returns :class:`SiteScreening` around Flower's
``DifferentialPrivacyClientSideFixedClipping`` when DP is on, around Flower's own aggregator
(FedAvg, FedProx, FedTrimmedAvg, FedMedian, Krum, MultiKrum, Bulyan) in either case.
Screening is the outer layer so that the DP wrapper, which abandons a round at the first
error reply, only ever sees sound replies. The wrapper:

- chooses which sites train this round (``roadloop.federation.selection``) and lets the
  inner strategy sample only among their nodes;
- screens every reply (``roadloop.federation.updates``): an error reply or a sampled site
  that never replied is a failure; an undecodable or misshapen array, a wrong dtype, NaN, an
  absurd norm (absolute, against the global model's norm, against the round's median) or a
  bad example count is refused; both are logged with their reason;
- skips the round (recording why) when fewer updates pass than ``min_train_sites`` or than
  the aggregator's own limits (``aggregation_shortfall``), instead of letting a robust
  aggregator quietly average too few updates;
- hands the inner strategy the others, each rebuilt as one ArrayRecord + one MetricRecord
  holding only the example count, capped against the round's others (``capped_weights``; one
  odd reply cannot make Flower's consistency check abandon the round);
- records what happened per round (:class:`roadloop.federation.models.RoundRecord`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from federated.records import (
    NUM_EXAMPLES,
    WEIGHTS_KEY,
    Layout,
    from_array_record,
    payload_bytes,
    to_array_record,
)
from roadloop.federation.models import (
    CappedWeight,
    FederationConfig,
    RejectedUpdate,
    RoundRecord,
    aggregation_shortfall,
)
from roadloop.federation.selection import SelectionPolicy, SiteRecord, select_sites
from roadloop.federation.updates import (
    CandidateUpdate,
    capped_weights,
    model_norm,
    screen_updates,
)

# A child of Flower's logger, so lines land in the run's log (`flwr log`).
logger = logging.getLogger("flwr").getChild("roadloop")

# Train-reply metrics a site may report besides the example count (kept per site).
SITE_METRIC_KEYS = (
    "train/box_loss", "train/cls_loss", "train/dfl_loss", "seconds", "optimizer_steps",
)
LOSS_PARTS = ("train/box_loss", "train/cls_loss", "train/dfl_loss")
DP_CLIP_SLACK = 1.01


class _SelectedGrid(Grid):
    """A view of ``grid`` whose nodes are only those chosen for this round."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def set_run(self, run: Any) -> None:  # pragma: no cover - never called on a view
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Iterable[Message]:  # pragma: no cover
        return self._grid.send_and_receive(*args, **kwargs)


class SiteScreening(Strategy):
    """Site selection and update screening around any Flower strategy (see module doc)."""

    def __init__(
        self,
        inner: Strategy,
        cfg: FederationConfig,
        sites: dict[int, SiteRecord],
    ) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = cfg
        self.sites = sites  # node id -> the site's record (from its query reply)
        self.rounds: dict[int, RoundRecord] = {}
        self._reference: dict[int, dict[str, np.ndarray]] = {}
        self._sampled: dict[int, set[int]] = {}
        self._started: dict[int, float] = {}
        # The DP wrapper, when it is the inner strategy: its noise is calibrated to the
        # number of sites actually averaged, and every site weighs the same (the mean's
        # sensitivity to one site is then clip / sites).
        self.dp_wrapper = (
            inner if isinstance(inner, DifferentialPrivacyClientSideFixedClipping) else None
        )
        # The packed model's layout (set by the ServerApp): names the layer a refusal is about.
        self.layout: Layout | None = None
        self.max_norm = cfg.max_update_norm
        if cfg.dp:
            # Clipped on the site: an update much longer did not clip and is refused; one a
            # hair over (float32 rounding of the site's scaling) is re-clipped here, so the
            # noise's sensitivity bound holds exactly.
            self.max_norm = min(self.max_norm, cfg.dp_clipping_norm * DP_CLIP_SLACK)

    def site_of(self, node_id: int) -> str:
        rec = self.sites.get(node_id)
        return rec.site if rec else f"node-{node_id}"

    def summary(self) -> None:
        logger.info(
            "site screening: max update norm %.4g, %.4gx the model's norm, %.4gx the round's "
            "median; weights capped at %.4gx the low median count", self.max_norm,
            self.cfg.max_update_to_model_ratio, self.cfg.max_norm_ratio,
            self.cfg.max_examples_ratio,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._started[server_round] = time.monotonic()
        by_site = {rec.site: node for node, rec in self.sites.items()}
        online = set(grid.get_node_ids())
        records = [
            rec.model_copy(update={"live": rec.live and node in online})
            for node, rec in self.sites.items()
        ]
        policy = SelectionPolicy(
            min_frames=self.cfg.min_site_frames,
            min_quality=self.cfg.min_site_quality,
            fraction=self.cfg.fraction_train,
            min_sites=self.cfg.min_train_sites,
        )
        selection = select_sites(records, policy, seed=self.cfg.seed * 100_003 + server_round)
        for site, why in selection.excluded.items():
            logger.info("round %d: site %s not eligible: %s", server_round, site, why)
        chosen = [by_site[s] for s in selection.chosen]
        if len(chosen) < self.cfg.min_train_sites:
            logger.warning(
                "round %d: %d eligible sites < min_train_sites %d; round skipped",
                server_round, len(chosen), self.cfg.min_train_sites,
            )
            self.rounds[server_round] = RoundRecord(
                round=server_round, sites_sampled=[], sites_aggregated=[],
                failures=[f"only {len(chosen)} eligible sites"],
            )
            return []
        reference = from_array_record(arrays)
        self._reference[server_round] = reference
        if self.dp_wrapper is not None:
            bound = self.cfg.max_update_to_model_ratio * model_norm(reference)
            if 0 < bound < self.cfg.dp_clipping_norm:
                logger.warning(
                    "round %d: dp_clipping_norm %.4g is above max_update_to_model_ratio x the "
                    "model's norm (%.4g): updates clipped near the clip will be refused",
                    server_round, self.cfg.dp_clipping_norm, bound,
                )
        messages = list(self.inner.configure_train(
            server_round, arrays, config, _SelectedGrid(grid, chosen)
        ))
        self._sampled[server_round] = {m.metadata.dst_node_id for m in messages}
        self.rounds[server_round] = RoundRecord(
            round=server_round,
            sites_sampled=sorted(self.site_of(m.metadata.dst_node_id) for m in messages),
            sites_aggregated=[],
            bytes_to_site=payload_bytes(arrays),
        )
        return messages

    def _candidate(self, msg: Message) -> tuple[CandidateUpdate | None, str | None, dict]:
        """The reply as a candidate update, or why it cannot be one."""
        site = self.site_of(msg.metadata.src_node_id)
        content = msg.content
        if len(content.array_records) != 1:
            return None, f"{len(content.array_records)} ArrayRecords, expected 1", {}
        if len(content.metric_records) != 1:
            return None, f"{len(content.metric_records)} MetricRecords, expected 1", {}
        try:
            arrays = from_array_record(next(iter(content.array_records.values())))
        except ValueError as exc:
            return None, str(exc), {}
        metrics = next(iter(content.metric_records.values()))
        extra = {}
        for key in SITE_METRIC_KEYS:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                extra[key] = float(value)
        rec = self.sites.get(msg.metadata.src_node_id)
        return (
            CandidateUpdate(
                key=site,
                arrays=arrays,
                num_examples=metrics.get(NUM_EXAMPLES),
                max_examples=rec.frames if rec else None,
            ),
            None,
            extra,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.rounds.setdefault(
            server_round, RoundRecord(round=server_round, sites_sampled=[], sites_aggregated=[])
        )
        reference = self._reference.pop(server_round, None)
        sampled = self._sampled.pop(server_round, set())
        replied: set[int] = set()
        candidates: list[CandidateUpdate] = []
        messages: dict[str, Message] = {}
        site_metrics: dict[str, dict[str, float]] = {}
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            replied.add(msg.metadata.src_node_id)
            if msg.has_error():
                record.failures.append(f"{site}: {msg.error.reason}")
                logger.warning("round %d: %s failed: %s", server_round, site, msg.error.reason)
                continue
            record.bytes_from_site[site] = sum(
                payload_bytes(r) for r in msg.content.array_records.values()
            )
            candidate, reason, extra = self._candidate(msg)
            if candidate is None:
                self._reject(record, site, msg, reason or "malformed reply")
                continue
            candidates.append(candidate)
            messages[site] = msg
            site_metrics[site] = extra
        for node in sorted(sampled - replied):  # timed out or disconnected: Flower drops them
            site = self.site_of(node)
            record.failures.append(f"{site}: no reply (timed out or disconnected)")
            logger.warning("round %d: %s sent no reply", server_round, site)
        if reference is None:  # not configured by this wrapper: nothing to screen against
            self._finish(record, server_round)
            return None, None
        screened = screen_updates(
            candidates, reference, max_norm=self.max_norm, max_norm_ratio=self.cfg.max_norm_ratio,
            max_model_ratio=self.cfg.max_update_to_model_ratio,
        )
        by_site = {c.key: c for c in candidates}
        for site, reason in screened.rejected.items():
            if site in messages:
                self._reject(record, site, messages[site], self._where(reason, by_site[site]))
        for site in screened.accepted:
            for key, value in site_metrics[site].items():
                record.train_metrics[f"{site}/{key}"] = value
            if all(k in site_metrics[site] for k in LOSS_PARTS):
                record.train_metrics[f"{site}/train-loss"] = sum(
                    site_metrics[site][k] for k in LOSS_PARTS
                )
            record.train_metrics[f"{site}/update-norm"] = screened.norms[site]
        shortfall = aggregation_shortfall(self.cfg, len(screened.accepted))
        if shortfall:
            record.failures.append(f"round skipped: {shortfall}")
            logger.warning("round %d skipped: %s", server_round, shortfall)
            self._finish(record, server_round)
            return None, None
        accepted: list[Message] = []
        for site, weight in self._weights(record, screened.accepted, by_site).items():
            msg = messages[site]
            arrays = next(iter(msg.content.array_records.values()))
            if self.dp_wrapper is not None and screened.norms[site] > self.cfg.dp_clipping_norm:
                arrays = _reclip(by_site[site].arrays, reference, self.cfg.dp_clipping_norm,
                                 screened.norms[site])
            msg.content = RecordDict(
                {"arrays": arrays, "metrics": MetricRecord({NUM_EXAMPLES: weight})}
            )
            accepted.append(msg)
        if self.dp_wrapper is not None:
            self.dp_wrapper.num_sampled_clients = len(accepted)
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        if arrays is None:  # e.g. an aggregator that declined: nothing was aggregated
            record.failures.append(f"round skipped: the {self.cfg.strategy} aggregator "
                                   "returned no model")
            logger.warning("round %d: %s returned no model", server_round, self.cfg.strategy)
        else:
            record.sites_aggregated = sorted(screened.accepted)
        self._finish(record, server_round)
        return arrays, metrics

    def _weights(
        self, record: RoundRecord, sites: list[str], by_site: dict[str, CandidateUpdate]
    ) -> dict[str, int]:
        """Each accepted site's aggregation weight: 1 under DP, else its capped count."""
        if self.dp_wrapper is not None:
            return dict.fromkeys(sites, 1)
        claimed = {site: int(by_site[site].num_examples) for site in sites}
        weights = capped_weights(claimed, self.cfg.max_examples_ratio)
        for site in sites:
            if weights[site] < claimed[site]:
                record.capped_weights.append(
                    CappedWeight(site=site, claimed=claimed[site], used=weights[site])
                )
                logger.warning(
                    "round %d: %s claims %d examples, weighted as %d (%gx the round's low "
                    "median)", record.round, site, claimed[site], weights[site],
                    self.cfg.max_examples_ratio,
                )
        return weights

    def _where(self, reason: str, candidate: CandidateUpdate) -> str:
        """Name the first non-finite layer of a packed update refused for NaN/Inf."""
        flat = candidate.arrays.get(WEIGHTS_KEY)
        if self.layout is None or "non-finite" not in reason or not isinstance(flat, np.ndarray):
            return reason
        bad = np.flatnonzero(~np.isfinite(flat))
        if bad.size == 0 or flat.shape != (self.layout.size,):
            return reason
        return f"{reason} (first in {self.layout.locate(int(bad[0]))})"

    def _reject(self, record: RoundRecord, site: str, msg: Message, reason: str) -> None:
        logger.warning("round %d: update from %s refused: %s", record.round, site, reason)
        record.rejected.append(
            RejectedUpdate(site=site, node_id=msg.metadata.src_node_id, reason=reason)
        )

    def _finish(self, record: RoundRecord, server_round: int) -> None:
        started = self._started.pop(server_round, None)
        if started is not None:
            record.seconds = time.monotonic() - started

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ok = [m for m in replies if not m.has_error()]
        return self.inner.aggregate_evaluate(server_round, ok) if ok else None


def _reclip(
    arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray], clip: float, norm: float
) -> ArrayRecord:
    """``reference + (arrays - reference) * clip / norm``: the update at exactly the clip."""
    scale = clip / norm
    return to_array_record({
        k: (reference[k] + (np.asarray(v, np.float64) - reference[k]) * scale).astype(v.dtype)
        for k, v in arrays.items()
    })


def _inner(cfg: FederationConfig) -> Strategy:
    common: dict[str, Any] = {
        # Selection happened in SiteScreening: the inner strategy takes every chosen node.
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,  # the ServerApp evaluates the global model centrally
        "min_train_nodes": cfg.min_train_sites,
        "min_available_nodes": cfg.min_train_sites,
    }
    match cfg.strategy:
        case "fedavg":
            return FedAvg(**common)
        case "fedprox":
            return FedProx(**common, proximal_mu=cfg.proximal_mu)
        case "trimmed_mean":
            return FedTrimmedAvg(**common, beta=cfg.trim_beta)
        case "median":
            return FedMedian(**common)
        case "krum":
            return Krum(**common, num_malicious_nodes=cfg.num_malicious)
        case "multikrum":
            return MultiKrum(
                **common, num_malicious_nodes=cfg.num_malicious,
                num_nodes_to_select=cfg.multikrum_selected(),
            )
        case "bulyan":
            return Bulyan(**common, num_malicious_nodes=cfg.num_malicious)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")  # pragma: no cover - Literal


def build_strategy(
    cfg: FederationConfig, sites: dict[int, SiteRecord]
) -> tuple[Strategy, SiteScreening]:
    """The strategy to start, and the screening layer whose round records it fills.

    Both are the same object: screening is outermost (see the module doc).
    """
    inner = _inner(cfg)
    if cfg.dp:
        sampled = max(cfg.min_train_sites, round(cfg.fraction_train * len(sites)))
        inner = DifferentialPrivacyClientSideFixedClipping(
            inner,
            noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_clipping_norm,
            num_sampled_clients=max(1, min(sampled, len(sites))),
        )
    screening = SiteScreening(inner, cfg, sites)
    return screening, screening
