"""The federation's config is strict about types and refuses a meaningless dp_delta.

Found by an audit: values from Flower's run config were coerced (``dp = "yes"`` was taken as
True, ``rounds = "3"`` as 3), and ``dp_delta = 0.5`` (a guarantee that fails for half the
sites) was accepted.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from roadloop.federation.flower_config import InvalidConfigError
from roadloop.federation.models import FederationConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.mark.parametrize(("key", "value"), [
    ("dp", "yes"),
    ("dp", "true"),
    ("dp", 1),
    ("rounds", "3"),
    ("rounds", 3.0),
    ("rounds", True),
    ("lr0", "0.01"),
    ("dp-delta", "1e-5"),
    ("min-site-quality", False),
])
def test_run_config_values_of_the_wrong_type_name_their_key(key, value):
    with pytest.raises(InvalidConfigError) as err:
        FederationConfig.from_run_config({key: value})
    assert f"'{key}' = {value!r}" in str(err.value)


def test_a_typed_run_config_loads_and_an_int_may_stand_for_a_float():
    cfg = FederationConfig.from_run_config(
        {"dp": True, "rounds": 4, "lr0": 1, "proximal-mu": 0, "round-timeout-s": 60,
         "eval-yaml": "", "result-path": "/tmp/r.json"})  # the app's own keys are ignored
    assert cfg.dp is True and cfg.rounds == 4
    assert cfg.lr0 == 1.0 and isinstance(cfg.lr0, float)
    assert cfg.round_timeout_s == 60.0 and isinstance(cfg.round_timeout_s, float)


def test_the_shipped_pyproject_run_config_is_strictly_typed():
    run_config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"][
        "config"]
    assert FederationConfig.from_run_config(run_config) == FederationConfig()


def test_direct_construction_is_strict_too():
    with pytest.raises(ValidationError, match="dp"):
        FederationConfig(dp="yes")
    with pytest.raises(ValidationError, match="rounds"):
        FederationConfig(rounds="3")
    assert FederationConfig(dp_clipping_norm=2).dp_clipping_norm == 2.0


@pytest.mark.parametrize("delta", [0.5, 0.1, 0.02, 0.999])
def test_a_meaningless_dp_delta_is_refused_at_config_load(delta):
    with pytest.raises(InvalidConfigError, match="'dp-delta'"):
        FederationConfig.from_run_config({"dp": True, "dp-delta": delta})
    with pytest.raises(ValidationError, match="dp_delta"):
        FederationConfig(dp_delta=delta)


def test_dp_delta_must_stay_well_below_one_over_the_sites():
    # delta x sites <= 0.01: at least min_available_sites sites at config load ...
    assert FederationConfig(dp=True, dp_delta=0.004, min_available_sites=2).dp_delta == 0.004
    with pytest.raises(InvalidConfigError, match="well below 1/sites"):
        FederationConfig.from_run_config(
            {"dp": True, "dp-delta": 0.004, "min-available-sites": 3})
    # ... and the sites a federation actually has at training time.
    cfg = FederationConfig(dp=True, dp_delta=1e-3, min_available_sites=2)
    assert cfg.dp_delta_problem(10) is None
    problem = cfg.dp_delta_problem(11)
    assert problem is not None and "11 site(s)" in problem
    # The default is fine for any federation this platform runs.
    assert FederationConfig(dp=True).dp_delta_problem(1000) is None
