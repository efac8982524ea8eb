"""Site selection, update screening and the strategy wrapper, without processes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federated.mods import poison
from federated.records import from_array_record, to_array_record
from federated.strategy import SiteScreening, build_strategy
from roadloop.federation.models import FederationConfig
from roadloop.federation.privacy import SitePrivacyLedger
from roadloop.federation.selection import SelectionPolicy, SiteRecord, select_sites
from roadloop.federation.updates import CandidateUpdate, check_update, screen_updates

REF = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def _upd(key: str, delta: float, n=10, **arrays) -> CandidateUpdate:
    base = {k: v + delta for k, v in REF.items()}
    base.update(arrays)
    return CandidateUpdate(key=key, arrays=base, num_examples=n)


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        (_upd("a", 0.1, w=np.full((3, 2), np.nan, np.float32)), "non-finite"),
        (_upd("a", 0.1, w=np.zeros((2, 3), np.float32)), "shape"),
        (_upd("a", 0.1, w=np.zeros((3, 2), np.int64)), "dtype"),
        (_upd("a", 0.1, extra=np.zeros(1, np.float32)), "unexpected"),
        (CandidateUpdate(key="a", arrays={"w": REF["w"]}, num_examples=3), "missing"),
        (_upd("a", 0.1, w=[[0.0, 0.0]] * 3), "not an array"),
        (_upd("a", 0.1, n=True), "not a number"),
        (_upd("a", 0.1, n=0), "positive whole"),
        (_upd("a", 0.1, n=2.5), "positive whole"),
        (_upd("a", 0.1, n=float("nan")), "positive whole"),
        (_upd("a", 0.1, n="10"), "not a number"),
        (CandidateUpdate(key="a", arrays=dict(REF), num_examples=50, max_examples=40), "declared"),
        (_upd("a", 1e6), "exceeds the cap"),
    ],
)
def test_a_malformed_update_is_refused_with_its_reason(candidate, reason):
    why, _ = check_update(candidate, REF, max_norm=1e4)
    assert why is not None and reason in why


def test_honest_updates_pass_and_a_far_outlier_is_refused_against_the_median():
    honest = [_upd(f"s{i}", 0.1 * (1 + i / 10)) for i in range(4)]
    loud = _upd("loud", 5.0)  # ~40x the median norm, far below the absolute cap
    result = screen_updates([*honest, loud], REF, max_norm=1e4, max_norm_ratio=10)
    assert result.accepted == [c.key for c in honest]
    assert "median" in result.rejected["loud"]
    # Two replies are too few for a median: only the absolute cap applies.
    two = screen_updates([honest[0], loud], REF, max_norm=1e4, max_norm_ratio=10)
    assert two.accepted == ["s0", "loud"]


def test_a_second_reply_from_one_sender_is_refused():
    result = screen_updates([_upd("a", 0.1), _upd("a", 0.2)], REF, max_norm=10, max_norm_ratio=10)
    assert result.accepted == ["a"] and "second reply" in result.rejected["a"]


def test_selection_keeps_floors_and_favours_large_clean_sites():
    records = [
        SiteRecord(site="big", frames=400, quality=1.0),
        SiteRecord(site="small", frames=40, quality=1.0),
        SiteRecord(site="noisy", frames=400, quality=0.3),
        SiteRecord(site="tiny", frames=3),
        SiteRecord(site="dark", frames=400, live=False),
    ]
    policy = SelectionPolicy(min_frames=10, min_quality=0.5, fraction=0.5, min_sites=1)
    picks = [select_sites(records, policy, seed=s).chosen for s in range(200)]
    first = select_sites(records, policy, seed=0)
    assert set(first.excluded) == {"noisy", "tiny", "dark"}
    assert all(len(p) == 1 and p[0] in {"big", "small"} for p in picks)
    assert sum(p == ["big"] for p in picks) > sum(p == ["small"] for p in picks) * 3
    everyone = SelectionPolicy(min_frames=10, min_quality=0.5, fraction=1.0, min_sites=2)
    assert select_sites(records, everyone, seed=0).chosen == ["big", "small"]


def test_privacy_ledger_composes_rounds():
    ledger = SitePrivacyLedger(noise_multiplier=1.1, delta=1e-5)
    eps = [ledger.record_round() for _ in range(10)]
    assert all(b > a > 0 for a, b in itertools.pairwise(eps))
    quieter = SitePrivacyLedger(noise_multiplier=4.0, delta=1e-5)
    for _ in range(10):
        quieter.record_round()
    assert quieter.epsilon < eps[-1]


def test_config_validation_and_run_config_round_trip():
    cfg = FederationConfig(strategy="fedprox", proximal_mu=0.1, rounds=4, min_train_sites=3,
                           min_available_sites=5)
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(ValueError, match="Bulyan"):
        FederationConfig(strategy="bulyan", min_train_sites=5, min_available_sites=5)
    with pytest.raises(ValueError, match="DP"):
        FederationConfig(strategy="median", dp=True)
    with pytest.raises(ValueError, match="proximal"):
        FederationConfig(strategy="fedprox")


def test_poison_attacks():
    sent = {"w": np.zeros(4, np.float32)}
    trained = {"w": np.ones(4, np.float32)}
    rng = np.random.default_rng(0)
    assert np.allclose(poison(sent, trained, "sign_flip", 3.0, rng)["w"], -3.0)
    assert np.allclose(poison(sent, trained, "scale", 100.0, rng)["w"], 100.0)
    noisy = poison(sent, trained, "noise", 2.0, rng)["w"]
    assert np.isclose(np.linalg.norm(noisy), 2.0 * np.linalg.norm(trained["w"]), rtol=1e-5)
    assert np.isnan(poison(sent, trained, "nan", 1.0, rng)["w"]).any()
    assert poison(sent, trained, "wrong_shape", 1.0, rng)["w"].shape == (3,)


# --- the wrapper, with Flower messages -------------------------------------------------


@pytest.fixture()
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _reply(msg: Message, arrays: dict, metrics: dict) -> Message:
    return Message(
        content=RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)}),
        reply_to=msg,
    )


SITES = {
    1: SiteRecord(site="a", frames=30),
    2: SiteRecord(site="b", frames=30),
    3: SiteRecord(site="c", frames=30),
    4: SiteRecord(site="d", frames=30),
    5: SiteRecord(site="e", frames=30),
    6: SiteRecord(site="thin", frames=2),
}


def _round(strategy, screening, replies_for):
    sent = to_array_record(REF)
    messages = list(strategy.configure_train(1, sent, ConfigRecord({}), _Grid(SITES)))
    replies = [replies_for(m, screening.site_of(m.metadata.dst_node_id)) for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    return messages, arrays


def test_wrapper_selects_eligible_sites_and_aggregates_only_sound_updates(task_identity):
    cfg = FederationConfig(strategy="fedavg", min_train_sites=2, min_available_sites=2)
    strategy, screening = build_strategy(cfg, SITES)
    assert isinstance(strategy, SiteScreening)

    def replies_for(msg, site):
        honest = {k: v + 1.0 for k, v in REF.items()}
        if site == "a":
            return _reply(msg, honest, {"num-examples": 10, "train/box_loss": 1.0,
                                          "train/cls_loss": 0.5, "train/dfl_loss": 0.5})
        if site == "b":
            return _reply(msg, {k: v + 3.0 for k, v in REF.items()}, {"num-examples": 30})
        if site == "c":  # NaN
            return _reply(msg, {**honest, "w": np.full((3, 2), np.nan, np.float32)},
                          {"num-examples": 10})
        if site == "d":  # a metric key the others lack, and a wrong-shape array
            return _reply(msg, {**honest, "b": np.zeros(3, np.float32)},
                          {"num-examples": 10, "odd": 1.0})
        return Message(Error(code=0, reason="site crashed"), reply_to=msg)

    messages, arrays = _round(strategy, screening, replies_for)
    assert sorted(screening.site_of(m.metadata.dst_node_id) for m in messages) == list("abcde")
    rec = screening.rounds[1]
    assert rec.sites_aggregated == ["a", "b"]
    assert {r.site for r in rec.rejected} == {"c", "d"}
    assert rec.failures == ["e: site crashed"]
    assert rec.train_metrics["a/train-loss"] == 2.0
    # FedAvg weighted by examples: (10*1 + 30*3) / 40
    assert np.allclose(from_array_record(arrays)["w"], 2.5)


@pytest.mark.parametrize("name", ["median", "krum", "trimmed_mean", "bulyan"])
def test_robust_aggregators_resist_a_sign_flipping_site_that_screening_lets_through(
    name, task_identity
):
    sites = {i: SiteRecord(site=f"s{i}", frames=30) for i in range(1, 8)}
    cfg = FederationConfig(strategy=name, min_train_sites=7, min_available_sites=7,
                           num_malicious=1, trim_beta=0.2)
    strategy, screening = build_strategy(cfg, sites)
    rng = np.random.default_rng(0)

    def replies_for(msg, site):
        honest = {k: v + 1.0 + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
                  for k, v in REF.items()}
        if site == "s1":
            honest = poison(REF, honest, "sign_flip", 5.0, rng)
        return _reply(msg, honest, {"num-examples": 30})

    sent = to_array_record(REF)
    messages = list(strategy.configure_train(1, sent, ConfigRecord({}), _Grid(sites)))
    arrays, _ = strategy.aggregate_train(
        1, [replies_for(m, screening.site_of(m.metadata.dst_node_id)) for m in messages]
    )
    assert screening.rounds[1].rejected == []  # screening alone does not catch it
    assert np.allclose(from_array_record(arrays)["w"], 1.0, atol=0.2)
    plain, plain_screening = build_strategy(
        FederationConfig(min_train_sites=7, min_available_sites=7), sites
    )
    messages = list(plain.configure_train(1, sent, ConfigRecord({}), _Grid(sites)))
    averaged, _ = plain.aggregate_train(
        1, [replies_for(m, plain_screening.site_of(m.metadata.dst_node_id)) for m in messages]
    )
    # FedAvg: (6*1 - 5) / 7 ~ 0.14: the attack cancels most of the honest progress.
    assert from_array_record(averaged)["w"].mean() < 0.5


def test_dp_wrapper_weights_sites_equally_and_noises_the_mean(task_identity):
    sites = {i: SiteRecord(site=f"s{i}", frames=30) for i in range(1, 4)}
    # All three are asked (fraction 1.0); two sound updates are enough to aggregate.
    cfg = FederationConfig(dp=True, dp_clipping_norm=1.0, dp_noise_multiplier=1e-6,
                           min_train_sites=2, min_available_sites=3)
    strategy, screening = build_strategy(cfg, sites)
    sent = to_array_record(REF)
    messages = list(strategy.configure_train(1, sent, ConfigRecord({}), _Grid(sites)))
    assert all(m.content["config"]["clipping_norm"] == 1.0 for m in messages)
    # s2 is a hair over the clip (float32 rounding of its scaling): re-clipped to exactly 1.0;
    # s3 did not clip at all: refused.
    steps = {"s1": 0.1, "s2": 1.001 / np.sqrt(8), "s3": 5.0}

    def reply(m):
        site = screening.site_of(m.metadata.dst_node_id)
        return _reply(m, {k: (v + steps[site]).astype(v.dtype) for k, v in REF.items()},
                      {"num-examples": 10 if site == "s1" else 25})

    arrays, _ = strategy.aggregate_train(1, [reply(m) for m in messages])
    assert [r.site for r in screening.rounds[1].rejected] == ["s3"]
    # Unweighted mean of 0.1 and s2 re-clipped to norm 1 over its 8 values (1/sqrt(8) each).
    expected = (0.1 + 1 / np.sqrt(8)) / 2
    assert np.allclose(from_array_record(arrays)["w"], expected, atol=1e-4)


def test_the_flower_app_config_carries_every_federation_setting():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    config = app["config"]
    defaults = FederationConfig().to_run_config()
    assert {k: config[k] for k in defaults} == defaults
    assert set(config) - set(defaults) == {"initial-weights", "eval-yaml", "eval-split",
                                           "result-path", "site-records"}
    assert app["components"] == {"serverapp": "federated.server_app:app",
                                 "clientapp": "federated.client_app:app"}


def test_a_model_travels_as_one_vector_and_unpacks_to_its_arrays():
    from federated.records import WEIGHTS_KEY, Layout, pack, weights_of

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32),
              "s": np.float32(2.0).reshape(())}
    layout = Layout.of(arrays)
    record = pack(arrays, layout)
    assert list(record) == [WEIGHTS_KEY] and layout.size == 11
    back = weights_of(record, Layout.from_config(layout.to_config()))
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    with pytest.raises(ValueError, match="expected"):
        weights_of(to_array_record(arrays), layout)  # unpacked arrays are not a model vector
    with pytest.raises(ValueError, match="shape"):
        weights_of(pack({**arrays, "b": np.ones(4, np.float32)}, Layout.of({"a": arrays["a"]})),
                   layout)
    with pytest.raises(ValueError, match="inconsistent"):
        Layout.from_config({**layout.to_config(), "layout-ndims": [2, 1]})
    assert [layout.locate(i) for i in (0, 5, 6, 9, 10)] == ["a", "a", "b", "b", "s"]


def test_a_site_whose_cameras_the_gateway_does_not_hear_from_is_not_drawn():
    from datetime import UTC, datetime, timedelta

    from roadloop.federation.selection import merge_platform_records, sites_live_at_gateway

    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    seen = {"cam-a": now - timedelta(hours=1), "cam-b": now - timedelta(days=3), "cam-c": None}
    platform = sites_live_at_gateway(
        {"north": ["cam-a", "cam-b"], "south": ["cam-b", "cam-c"], "east": ["cam-x"]},
        seen, now, timedelta(hours=24),
    )
    assert {k: v.live for k, v in platform.items()} == {"north": True, "south": False, "east": False}
    assert platform["south"].last_seen == (now - timedelta(days=3)).isoformat()
    reported = [SiteRecord(site=s, frames=100) for s in ("north", "south", "west")]
    merged = [merge_platform_records(r, platform.get(r.site)) for r in reported]
    policy = SelectionPolicy(min_frames=10, min_quality=0.5, fraction=1.0, min_sites=1)
    chosen = select_sites(merged, policy, seed=0)
    assert chosen.chosen == ["north", "west"]  # west: the platform has no record, its report stands
    assert chosen.excluded == {"south": "not live at the gateway"}
