"""The federation audit's findings, each pinned by a cheap test (small arrays, no processes)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from pydantic import ValidationError

from federated.records import from_array_record, to_array_record
from federated.strategy import SiteScreening, build_strategy
from roadloop.federation.flower_config import InvalidConfigError
from roadloop.federation.models import FederationConfig, aggregation_shortfall
from roadloop.federation.selection import SiteRecord
from roadloop.federation.updates import (
    CandidateUpdate,
    capped_weights,
    check_update,
    screen_updates,
)

ZERO = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


from .test_federation_screening import _Grid, task_identity  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("task_identity")


def _sites(n: int, frames: int = 30) -> dict[int, SiteRecord]:
    return {i: SiteRecord(site=f"s{i}", frames=frames) for i in range(1, n + 1)}


def _reply(msg: Message, arrays: dict, examples: int = 30) -> Message:
    content = RecordDict({"arrays": to_array_record(arrays),
                          "metrics": MetricRecord({"num-examples": examples})})
    return Message(content=content, reply_to=msg)


def _step(delta: float, ref=ZERO) -> dict[str, np.ndarray]:
    return {k: (v + delta).astype(v.dtype) for k, v in ref.items()}


def _round(strategy, screening, sites, replies_for, ref=ZERO):
    """One round; ``replies_for(msg, site)`` returns the reply, or None for no reply."""
    messages = list(strategy.configure_train(1, to_array_record(ref), ConfigRecord({}),
                                             _Grid(sites)))
    replies = [r for m in messages
               if (r := replies_for(m, screening.site_of(m.metadata.dst_node_id))) is not None]
    arrays, _ = strategy.aggregate_train(1, replies)
    return screening.rounds[1], (from_array_record(arrays) if arrays is not None else None)


# 1. DP: an error reply no longer throws the round away --------------------------------


def test_with_dp_one_failing_site_is_a_recorded_failure_and_the_others_aggregate():
    sites = _sites(3)
    cfg = FederationConfig(dp=True, dp_clipping_norm=10.0, dp_noise_multiplier=1e-6,
                           min_train_sites=2, min_available_sites=2)
    strategy, screening = build_strategy(cfg, sites)

    def replies_for(msg, site):
        if site == "s3":
            return Message(Error(code=0, reason="site crashed"), reply_to=msg)
        return _reply(msg, _step(0.5))

    rec, arrays = _round(strategy, screening, sites, replies_for)
    assert arrays is not None and np.allclose(arrays["w"], 0.5, atol=1e-3)
    assert rec.sites_aggregated == ["s1", "s2"]
    assert rec.failures == ["s3: site crashed"]


# 2. min_train_sites holds after screening -----------------------------------------------


def test_a_round_with_fewer_sound_updates_than_min_train_sites_produces_no_model():
    sites = _sites(3)
    strategy, screening = build_strategy(
        FederationConfig(min_train_sites=3, min_available_sites=3), sites
    )

    def replies_for(msg, site):
        if site in {"s1", "s2"}:
            return _reply(msg, {**_step(1.0), "w": np.full((3, 2), np.nan, np.float32)})
        return _reply(msg, _step(1.0))

    rec, arrays = _round(strategy, screening, sites, replies_for)
    assert arrays is None and rec.sites_aggregated == []
    assert any("min_train_sites 3" in f for f in rec.failures)


# 3. robust aggregators within their own limits ------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"strategy": "trimmed_mean", "trim_beta": 0.2, "min_train_sites": 4}, "trims nothing"),
        ({"strategy": "trimmed_mean", "trim_beta": 0.0, "min_train_sites": 9}, "trims nothing"),
        ({"strategy": "multikrum", "min_train_sites": 5, "multikrum_keep": 50}, "Multi-Krum"),
        ({"strategy": "multikrum", "min_train_sites": 5, "multikrum_keep": 5}, "Multi-Krum"),
        ({"strategy": "krum", "min_train_sites": 4}, "Krum"),
        ({"strategy": "bulyan", "min_train_sites": 6}, "Bulyan"),
    ],
)
def test_config_refuses_robust_aggregators_below_their_limits(kwargs, reason):
    with pytest.raises(ValidationError, match=reason):
        FederationConfig(min_available_sites=kwargs["min_train_sites"], **kwargs)


def test_config_accepts_robust_aggregators_at_their_limits():
    FederationConfig(strategy="trimmed_mean", trim_beta=0.2, min_train_sites=5,
                     min_available_sites=5)
    FederationConfig(strategy="multikrum", multikrum_keep=4, min_train_sites=5,
                     min_available_sites=5)
    FederationConfig(strategy="bulyan", min_train_sites=7, min_available_sites=7)


def test_each_round_checks_the_aggregator_limits_against_the_accepted_updates():
    cfg = FederationConfig(strategy="trimmed_mean", trim_beta=0.2, min_train_sites=5,
                           min_available_sites=5)
    assert aggregation_shortfall(cfg, 5) is None
    # A config that slipped past validation is still caught at aggregation time.
    loose = FederationConfig.model_construct(**{**cfg.model_dump(), "min_train_sites": 2})
    assert "trims nothing" in aggregation_shortfall(loose, 4)
    krum = FederationConfig.model_construct(
        **{**FederationConfig().model_dump(), "strategy": "krum", "min_train_sites": 1}
    )
    assert "2*num_malicious + 3" in aggregation_shortfall(krum, 4)


def test_krum_does_not_run_on_fewer_than_2f_plus_3_updates_after_refusals():
    sites = _sites(5)
    cfg = FederationConfig(strategy="krum", num_malicious=1, min_train_sites=5,
                           min_available_sites=5)
    strategy, screening = build_strategy(cfg, sites)

    def replies_for(msg, site):
        if site == "s1":
            return _reply(msg, {**_step(1.0), "b": np.full(2, np.inf, np.float32)})
        return _reply(msg, _step(1.0))

    rec, arrays = _round(strategy, screening, sites, replies_for)
    assert arrays is None and rec.sites_aggregated == []
    assert any(f.startswith("round skipped") for f in rec.failures)


# 4. sites_aggregated only when a model came back ----------------------------------------


class _Declining(FedAvg):
    """An aggregator that skips the round (as Bulyan does below its limit)."""

    def aggregate_train(self, server_round, replies):
        list(replies)
        return None, None


def test_a_round_whose_aggregator_returns_nothing_aggregated_no_site():
    sites = _sites(3)
    cfg = FederationConfig(min_train_sites=3, min_available_sites=3)
    screening = SiteScreening(_Declining(fraction_evaluate=0.0, min_train_nodes=3,
                                         min_available_nodes=3), cfg, sites)
    rec, arrays = _round(screening, screening, sites, lambda m, s: _reply(m, _step(1.0)))
    assert arrays is None and rec.sites_aggregated == []
    assert any("returned no model" in f for f in rec.failures)


# 5. one site's example count cannot buy the average ---------------------------------------


def test_example_counts_are_capped_relative_to_the_low_median():
    assert capped_weights({"a": 30, "b": 30, "c": 10**9}, 4.0) == {"a": 30, "b": 30, "c": 120}
    assert capped_weights({"a": 30, "b": 10**9}, 4.0) == {"a": 30, "b": 120}  # limits, no more
    assert capped_weights({"a": 10, "b": 30, "c": 50}, 4.0) == {"a": 10, "b": 30, "c": 50}
    assert capped_weights({}, 4.0) == {}


def test_a_site_claiming_a_billion_examples_does_not_dominate_fedavg():
    sites = _sites(3)
    sites[3] = SiteRecord(site="s3", frames=10**9)  # it declared the billion frames, too
    strategy, screening = build_strategy(FederationConfig(), sites)

    def replies_for(msg, site):
        if site == "s3":
            return _reply(msg, _step(-5.0), examples=10**9)
        return _reply(msg, _step(1.0))

    rec, arrays = _round(strategy, screening, sites, replies_for)
    # s3 weighs 4 x 30 = 120 against 30 + 30: (30 + 30 - 5 * 120) / 180 = -3, not -5.
    assert np.allclose(arrays["w"], -3.0)
    assert [(c.site, c.claimed, c.used) for c in rec.capped_weights] == [("s3", 10**9, 120)]


# 6. an update that replaces the model is refused, even with two replies -------------------


def test_an_update_long_against_the_global_model_is_refused_with_two_replies():
    model = {"w": np.full((3, 2), 2.0, np.float32), "b": np.full(2, -2.0, np.float32)}
    zeroed = CandidateUpdate(key="zero", arrays={k: np.zeros_like(v) for k, v in model.items()},
                             num_examples=30)
    honest = CandidateUpdate(key="honest", arrays=_step(0.05, model), num_examples=30)
    result = screen_updates([honest, zeroed], model, max_norm=1e4, max_norm_ratio=10,
                            max_model_ratio=0.5)
    assert result.accepted == ["honest"]
    assert "model's norm" in result.rejected["zero"]
    # A model of norm 0 gives no scale: the absolute cap alone applies.
    why, _ = check_update(CandidateUpdate(key="a", arrays=_step(1.0), num_examples=3), ZERO,
                          max_norm=1e4, max_model_ratio=0.5)
    assert why is None


def test_the_default_config_refuses_an_all_zero_model_from_one_of_two_sites():
    model = {"w": np.full((3, 2), 2.0, np.float32), "b": np.full(2, -2.0, np.float32)}
    sites = _sites(2)
    strategy, screening = build_strategy(FederationConfig(), sites)

    def replies_for(msg, site):
        if site == "s2":
            return _reply(msg, {k: np.zeros_like(v) for k, v in model.items()})
        return _reply(msg, _step(0.05, model))

    rec, arrays = _round(strategy, screening, sites, replies_for, ref=model)
    assert arrays is None  # one sound update < min_train_sites 2
    assert [r.site for r in rec.rejected] == ["s2"]


# 7. the model's dtype, exactly ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_an_update_in_another_float_dtype_is_refused(dtype):
    arrays = {k: v.astype(dtype) for k, v in _step(0.1).items()}
    why, _ = check_update(CandidateUpdate(key="a", arrays=arrays, num_examples=3), ZERO,
                          max_norm=1e4)
    assert why is not None and "expected float32" in why


# 8./9. config values numpy and Flower can use -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dp": True, "dp_noise_multiplier": float("inf")},
        {"dp": True, "dp_clipping_norm": float("inf")},
        {"round_timeout_s": float("inf")},
        {"max_update_norm": float("inf")},
        {"max_norm_ratio": float("inf")},
        {"max_update_to_model_ratio": float("nan")},
        {"max_examples_ratio": float("inf")},
        {"strategy": "fedprox", "proximal_mu": float("inf")},
        {"seed": -1},
    ],
)
def test_config_refuses_infinite_nan_and_negative_seed_values(kwargs):
    with pytest.raises(ValidationError):
        FederationConfig(**kwargs)
    # From Flower's run config the same values are an InvalidConfigError naming the key.
    key = next(k for k in kwargs if k not in ("dp", "strategy")).replace("_", "-")
    with pytest.raises(InvalidConfigError, match=f"'{key}'"):
        FederationConfig.from_run_config({k.replace("_", "-"): v for k, v in kwargs.items()})


# 10. a sampled site that never replies is a recorded failure ---------------------------------


def test_a_sampled_site_that_never_replies_is_recorded_as_failed():
    sites = _sites(3)
    strategy, screening = build_strategy(FederationConfig(), sites)
    rec, arrays = _round(strategy, screening, sites,
                         lambda m, s: None if s == "s3" else _reply(m, _step(1.0)))
    assert arrays is not None and rec.sites_aggregated == ["s1", "s2"]
    assert rec.failures == ["s3: no reply (timed out or disconnected)"]
