"""The local Flower deployment: run-config quoting, and real SuperLink/SuperNode processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args

from roadloop.federation.deployment import LocalFederation
from roadloop.federation.flower_config import InvalidConfigError, format_run_config
from roadloop.federation.models import SiteSpec
from roadloop.federation.pki import write_node_keys

TOY_APP = Path(__file__).parent / "data" / "flower_toy_app"


def _parsed_by_flower(config: dict) -> dict:
    """What Flower's own parser (used for --run-config and --node-config) makes of it."""
    return parse_config_args([format_run_config(config)])


# --- format_run_config -----------------------------------------------------------------


def test_scalars_round_trip_through_flowers_parser() -> None:
    config = {
        "rounds": 3,
        "negative": -7,
        "lr0": 0.002,
        "tiny": 1e-05,
        "whole-float": 2.0,
        "dp": True,
        "fedbn": False,
        "strategy": "fedavg",
        "empty": "",
    }
    parsed = _parsed_by_flower(config)
    assert parsed == config
    assert type(parsed["whole-float"]) is float and type(parsed["dp"]) is bool


@pytest.mark.parametrize(
    "hostile",
    [
        "/data/my site/data.yaml",  # spaces
        'say "hi"',  # double quotes
        "it's",  # single quote
        "C:\\temp\\new",  # backslashes (no escape sequences may be interpreted)
        "it's C:\\x",  # single quote and backslash
        "a=1 b=2",  # looks like more key=value pairs
        "x' injected=true '",  # tries to close the quote and add a key
        'x" injected=true "',
        "tab\there ünïcödé",
    ],
)
def test_hostile_strings_survive_as_one_value(hostile: str) -> None:
    parsed = _parsed_by_flower({"result-path": hostile, "after": 1})
    assert parsed == {"result-path": hostile, "after": 1}


@pytest.mark.parametrize(
    "bad",
    [
        "line\nbreak",
        "carriage\rreturn",
        "nul\x00",
        "both ' and \" quotes",
        float("nan"),
        float("inf"),
        None,
        [1, 2],
    ],
)
def test_unrepresentable_values_are_refused(bad: object) -> None:
    with pytest.raises(InvalidConfigError):
        format_run_config({"key": bad})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", ["", "two words", "k=v", 'q"', "new\nline", "a..b"])
def test_keys_must_be_bare(key: str) -> None:
    with pytest.raises(InvalidConfigError):
        format_run_config({key: 1})


def test_node_keys_are_what_flower_loads(tmp_path: Path) -> None:
    keys = write_node_keys(tmp_path, "site")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert private.curve.name == "secp384r1"
    assert try_load_public_key(keys.public_key)  # `flwr supernode register`'s own loader


def test_node_auth_without_tls_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="TLS"):
        LocalFederation(work_dir=tmp_path, sites=[], node_auth=True, tls=False)


def test_site_names_must_be_unique(tmp_path: Path) -> None:
    site = SiteSpec(name="a", data_yaml=Path("a.yaml"), frames=1)
    with pytest.raises(InvalidConfigError, match="unique"):
        LocalFederation(work_dir=tmp_path, sites=[site, site])


# --- real processes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    work_dir = tmp_path_factory.mktemp("federation")
    sites = [
        SiteSpec(name="atl_day", data_yaml=work_dir / "atl" / "data.yaml", frames=10),
        SiteSpec(name="manaus", data_yaml=work_dir / "manaus" / "data.yaml", frames=30),
    ]
    with LocalFederation(work_dir=work_dir, sites=sites, node_auth=True) as fed:
        fed.start(timeout_s=120)
        yield fed


@pytest.mark.e2e
def test_registered_sites_complete_two_fedavg_rounds(federation: LocalFederation) -> None:
    result_path = federation.work_dir / "toy result.json"
    outcome = federation.run(TOY_APP, {"result-path": str(result_path)}, timeout_s=180)

    assert outcome.status == "completed", outcome.log
    assert "[ROUND 2/2]" in outcome.log
    result = json.loads(result_path.read_text())
    assert result["rounds"] == [
        {"round": 1, "sites": ["atl_day", "manaus"]},
        {"round": 2, "sites": ["atl_day", "manaus"]},
    ]
    assert result["final"] == [2.0, 2.0, 2.0]  # two rounds of "+1" from zeros


@pytest.mark.e2e
def test_a_failing_server_app_is_reported_failed(federation: LocalFederation) -> None:
    result_path = federation.work_dir / "never written.json"
    run_config = {"result-path": str(result_path), "fail-on-purpose": True}
    outcome = federation.run(TOY_APP, run_config, timeout_s=120)

    assert outcome.status == "failed", outcome.status_text
    assert outcome.status_text == "finished:failed"
    assert "failing on purpose" in outcome.log
    assert not result_path.exists()


@pytest.mark.e2e
def test_unregistered_key_is_refused(federation: LocalFederation) -> None:
    registered = set(federation.node_ids().values())
    assert len(registered) == 2 and None not in registered

    intruder = SiteSpec(name="intruder", data_yaml=Path("/nowhere/data.yaml"), frames=5)
    exit_code, log = federation.start_unregistered_node(intruder, timeout_s=60)

    assert exit_code not in (None, 0), log
    assert "Failed to activate SuperNode" in log
    nodes = federation.list_nodes()
    assert {int(row["node-id"]) for row in nodes} == registered
    assert all(row["status"] == "online" for row in nodes)


@pytest.mark.e2e
def test_stop_leaves_no_process(federation: LocalFederation) -> None:
    # Last in this file on purpose: it stops the module's federation.
    pids = federation.process_ids()
    # SuperLink, 2 SuperNodes and the SuperExec each of them runs (detached from us).
    assert len(pids) >= 5

    federation.stop()

    alive = [pid for pid in pids if psutil.pid_exists(pid) and _not_zombie(pid)]
    assert alive == []
    assert federation.process_ids() == set()
    assert (federation.work_dir / "logs" / "superlink.log").stat().st_size > 0


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
