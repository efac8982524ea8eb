"""The operators' entry points on bad input (audit 12): ``python -m fleet``, the gateway and
platform settings, ``roadloop-agent`` and ``roadloop demo`` refuse a mistake up front, with
one ``error:`` line / exit code 2, instead of a traceback, a crash loop later, or a state
folder written where it does not belong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from edge_agent.cli import build_parser, main
from edge_agent.samplers import SamplerConfig
from fleet.cli import fleet_app, main_app
from fleet.config import GatewaySettings
from roadloop.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[1]
AGENT = ["--gateway", "http://127.0.0.1:9", "--camera-id", "cam-1"]
RUN = ["run", *AGENT, "--source", "x.mp4"]


@pytest.fixture()
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# ------------------------------------------------------------------ D1: python -m fleet
def test_python_m_fleet_bad_setting_is_one_error_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADLOOP_")}
    env.update(ROADLOOP_GATEWAY_PORT="abc", ROADLOOP_HOME=str(tmp_path / "home"),
               PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "fleet", "serve"], env=env, cwd=tmp_path, check=False,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out[-2000:]
    assert out.startswith("error: ") and "ROADLOOP_GATEWAY_PORT" in out


@pytest.mark.parametrize("case", ["home_is_a_file", "bad_database_url"])
def test_main_app_shares_the_user_error_handling(tmp_path: Path, monkeypatch, fresh_settings,
                                                 case: str) -> None:
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "home"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = (["devices", "list", "--home", str(afile)] if case == "home_is_a_file"
            else ["admin-token", "list", "--database-url", "garbage"])
    r = CliRunner().invoke(main_app, args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert ("Not a directory" if case == "home_is_a_file" else "URL") in r.output

    from launch.cli import _LazyCommands
    from roadloop.cli_errors import UserErrorGroup

    assert issubclass(_LazyCommands, UserErrorGroup)  # one implementation, not a copy


# ------------------------------------------------------------------ D2: empty gateway host
def test_an_empty_gateway_host_is_refused(tmp_path: Path, monkeypatch, fresh_settings) -> None:
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("ROADLOOP_GATEWAY_HOST", " ")
    with pytest.raises(ValidationError, match="host"):
        GatewaySettings()
    monkeypatch.delenv("ROADLOOP_GATEWAY_HOST")
    with pytest.raises(ValidationError, match="0.0.0.0"):
        GatewaySettings(host="")
    assert GatewaySettings(host="0.0.0.0").host == "0.0.0.0"  # every interface: on purpose


# ------------------------------------------------------------------ D3: drift durations
@pytest.mark.parametrize(("var", "value"), [
    ("ROADLOOP_DRIFT_GRACE_S", "inf"), ("ROADLOOP_DRIFT_GRACE_S", "1e12"),
    ("ROADLOOP_DRIFT_GRACE_S", "nan"), ("ROADLOOP_DRIFT_GRACE_S", "86401"),
    ("ROADLOOP_DRIFT_BOOST_MINUTES", "inf"), ("ROADLOOP_DRIFT_BOOST_MINUTES", "1e10"),
    ("ROADLOOP_DRIFT_BOOST_MINUTES", "43201"),
    ("ROADLOOP_DRIFT_COOLDOWN_MINUTES", "inf"), ("ROADLOOP_DRIFT_COOLDOWN_MINUTES", "1e12"),
    ("ROADLOOP_DEDUPE_MAX_AGE_S", "nan"),
])
def test_a_drift_duration_that_would_overflow_is_refused(tmp_path: Path, monkeypatch,
                                                         var: str, value: str) -> None:
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path))
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match=var.removeprefix("ROADLOOP_").lower()):
        Settings()


def test_the_largest_drift_durations_still_fit_a_datetime(tmp_path: Path, monkeypatch) -> None:
    from datetime import UTC, datetime, timedelta

    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("ROADLOOP_DRIFT_GRACE_S", "86400")
    monkeypatch.setenv("ROADLOOP_DRIFT_BOOST_MINUTES", "43200")
    monkeypatch.setenv("ROADLOOP_DRIFT_COOLDOWN_MINUTES", str(366 * 1440))
    s = Settings()
    now = datetime.now(UTC)
    assert now + timedelta(minutes=s.drift_boost_minutes) > now
    assert now - timedelta(minutes=s.drift_cooldown_minutes) < now
    assert now + timedelta(seconds=s.drift_grace_s) > now


# ------------------------------------------------------------------ D4: agent numbers
@pytest.mark.parametrize(("flag", "value"), [
    ("--heartbeat-interval", "nan"), ("--heartbeat-interval", "inf"),
    ("--heartbeat-interval", "1e300"),
    ("--latency-budget-ms", "nan"), ("--latency-budget-ms", "inf"),
    ("--outbox-max-mb", "inf"), ("--outbox-max-mb", "nan"), ("--outbox-max-mb", "1e12"),
    ("--hourly-budget", "nan"), ("--hourly-budget", "inf"), ("--hourly-budget", "-1"),
    ("--max-frames", "-1"), ("--max-frames", "0"),
    ("--metrics-port", "-1"), ("--metrics-port", "70000"),
    ("--drain-timeout", "-5"), ("--drain-timeout", "nan"),
    ("--threads", "-1"), ("--threads", "0"),
    ("--capacity", "nan"), ("--capacity", "inf"),
    ("--update-interval", "nan"), ("--status-interval", "nan"), ("--retry-base", "inf"),
    ("--retry-max-delay", "nan"), ("--image-fps", "nan"), ("--image-fps", "0"),
    ("--conf", "nan"), ("--iou", "2"), ("--base-rate", "nan"), ("--max-error-rate", "nan"),
    ("--shadow-rate", "nan"), ("--low-conf-band", "nan,0.5"), ("--crowded-threshold", "-1"),
])
def test_a_bad_agent_number_is_refused_at_parse_time(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*RUN, flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_good_agent_numbers_still_parse() -> None:
    args = build_parser().parse_args([
        *RUN, "--heartbeat-interval", "2", "--latency-budget-ms", "250", "--outbox-max-mb",
        "0.5", "--hourly-budget", "0", "--max-frames", "1", "--metrics-port", "0",
        "--drain-timeout", "0", "--threads", "1", "--capacity", "30", "--update-interval", "0",
        "--conf", "0", "--iou", "1", "--low-conf-band", "0.2,0.4", "--shadow-rate", "1"])
    assert (args.heartbeat_interval, args.max_frames, args.metrics_port, args.threads) == (
        2.0, 1, 0, 1)
    assert args.low_conf_band == (0.2, 0.4) and args.hourly_budget == 0.0


@pytest.mark.parametrize("kwargs", [
    {"hourly_budget": float("nan")}, {"hourly_budget": float("inf")},
    {"max_importance": float("nan")}, {"overdraft_fraction": float("inf")},
    {"low_confidence_band": (0.2, float("nan"))}, {"multipliers": {"crowded": float("inf")}},
])
def test_sampler_config_refuses_non_finite_numbers(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="finite"):
        SamplerConfig(**kwargs)


# ------------------------------------------------------------------ D5, D6: agent paths/ids
@pytest.mark.parametrize(("case", "word"), [
    ("state_dir_is_a_file", "not a folder"), ("state_dir_under_a_file", "a file"),
    ("ipv6_unclosed", "--gateway"), ("no_scheme", "--gateway"), ("ftp", "--gateway"),
    ("no_host", "--gateway"), ("bad_port", "--gateway"),
])
def test_agent_user_error_is_exit_2_not_a_traceback(tmp_path: Path, monkeypatch, capsys,
                                                    case: str, word: str) -> None:
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    gateway = {"ipv6_unclosed": "http://[::1", "no_scheme": "notaurl", "ftp": "ftp://h/",
               "no_host": "http://", "bad_port": "http://h:99999"}.get(case, "http://127.0.0.1:9")
    state = {"state_dir_is_a_file": afile, "state_dir_under_a_file": afile / "s"}.get(
        case, tmp_path / "s")
    rc = main(["enroll", "--gateway", gateway, "--camera-id", "cam-1", "--enroll-token", "t",
               "--state-dir", str(state)])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and word in err, err
    assert not (tmp_path / "s").exists() and afile.read_text() == "x"


@pytest.mark.parametrize("camera_id", ["../../escaped", "{tmp}/abs-escaped", "", ".hidden",
                                       "a/b", "x" * 65])
def test_an_unsafe_camera_id_is_refused_before_any_file_is_made(
        tmp_path: Path, monkeypatch, capsys, camera_id: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    camera_id = camera_id.replace("{tmp}", str(tmp_path))
    rc = main(["run", "--gateway", "http://127.0.0.1:9", "--camera-id", camera_id,
               "--source", str(tmp_path / "missing.mp4")])
    assert rc == 2 and "--camera-id" in capsys.readouterr().err
    assert list(tmp_path.rglob("*")) == [work]  # no state dir anywhere, abs-escaped included


def test_a_good_camera_id_parses() -> None:
    assert build_parser().parse_args(RUN).camera_id == "cam-1"
    assert build_parser().parse_args(
        ["run", "--gateway", "https://gw.example:8700/", "--camera-id", "Cam_2.x-1",
         "--source", "x"]).camera_id == "Cam_2.x-1"


# ------------------------------------------------------------------ D7: demo counts
@pytest.mark.parametrize(("flag", "value"), [("--frames-per-agent", "-5"),
                                             ("--frames-per-camera", "-3"),
                                             ("--frames-per-agent", "0"),
                                             ("--review-turns", "-1"),
                                             ("--reviews-per-turn", "0")])
def test_demo_refuses_counts_that_run_the_loop_on_nothing(tmp_path: Path, monkeypatch,
                                                          fresh_settings, flag: str,
                                                          value: str) -> None:
    import launch.demo
    from launch.cli import app
    from launch.drift_turn import DEMO_DRIFT_ENV

    monkeypatch.chdir(tmp_path)
    for key in ("ROADLOOP_PROFILE", "ROADLOOP_SHARED_DIR", "DAGSTER_HOME", "ROADLOOP_DRIFT_START",
                *DEMO_DRIFT_ENV):  # `demo` writes these into os.environ: undone by monkeypatch
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:  # setenv records "unset"; delenv of an unset name would record nothing
            monkeypatch.setenv(key, "x")
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("ROADLOOP_HOME", str(home))
    called: list[dict] = []
    monkeypatch.setattr(launch.demo, "run_demo_loop", lambda **kw: called.append(kw))
    r = CliRunner().invoke(app, ["demo", "--no-serve", flag, value])
    assert not called and not home.exists()
    assert r.exit_code == 2 and flag in r.output, r.output


# ------------------------------------------------------------------ D8: a mistyped --home
@pytest.mark.parametrize("args", [["devices", "list"], ["devices", "revoke", "dev-1"],
                                  ["devices", "status", "dev-1", "inactive"],
                                  ["admin-token", "list"], ["admin-token", "revoke", "1"]])
def test_admin_commands_refuse_a_missing_database(tmp_path: Path, monkeypatch, fresh_settings,
                                                  args: list[str]) -> None:
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "real"))
    typo = tmp_path / "typo_home"
    r = CliRunner().invoke(fleet_app, [*args, "--home", str(typo)])
    assert not typo.exists(), sorted(p.name for p in typo.rglob("*"))
    assert r.exit_code == 2 and str(typo / "fleet" / "fleet.db") in r.output, r.output


@pytest.mark.parametrize("command", ["current", "check"])
def test_db_status_refuses_a_missing_sqlite_file(tmp_path: Path, command: str) -> None:
    url = f"sqlite:///{tmp_path / 'nowhere' / 'fleet.db'}"
    r = CliRunner().invoke(main_app, ["db", command, "--database-url", url])
    assert r.exit_code == 2 and "no gateway database" in r.output, r.output
    assert not (tmp_path / "nowhere").exists()


def test_token_create_on_a_new_database_says_so(tmp_path: Path, monkeypatch,
                                                fresh_settings) -> None:
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "real"))
    home = tmp_path / "new_home"
    runner = CliRunner()
    r = runner.invoke(fleet_app, ["token", "create", "--home", str(home)])
    assert r.exit_code == 0, r.output
    assert "created a new one" in r.stderr and str(home / "fleet" / "fleet.db") in r.stderr
    assert "created" not in r.stdout and len(r.stdout.split()) == 1  # the token alone
    again = runner.invoke(fleet_app, ["token", "create", "--home", str(home)])
    assert again.exit_code == 0 and "created a new one" not in again.stderr
    listed = runner.invoke(fleet_app, ["devices", "list", "--home", str(home)])
    assert listed.exit_code == 0 and "no devices enrolled" in listed.stdout


# --------------------------------------------------------------------------- settings left over
@pytest.mark.parametrize(("env", "value"), [
    ("ROADLOOP_GATEWAY_HEADER_TIMEOUT_S", "inf"),
    ("ROADLOOP_GATEWAY_RATE_LIMIT_PER_S", "inf"),
    ("ROADLOOP_GATEWAY_S3_READ_TIMEOUT_S", "nan"),
    ("ROADLOOP_GATEWAY_METRICS_TOKEN", " " * 16),
    ("ROADLOOP_GATEWAY_METRICS_TOKEN", "sixteen chars ok"),
])
def test_gateway_settings_refuse_inf_and_a_blank_metrics_token(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str, value: str) -> None:
    monkeypatch.setenv("ROADLOOP_GATEWAY_HOME", str(tmp_path))
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=env.removeprefix("ROADLOOP_GATEWAY_").lower()):
        GatewaySettings()


@pytest.mark.parametrize(("env", "value"), [
    ("ROADLOOP_TRAIN_MODEL", " "), ("ROADLOOP_REGISTERED_MODEL_NAME", ""),
    ("ROADLOOP_MLFLOW_EXPERIMENT", ""), ("ROADLOOP_INT8_MAX_DROP_PCT", "inf"),
])
def test_platform_settings_refuse_empty_names_and_inf(
        monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=env.removeprefix("ROADLOOP_").lower()):
        Settings()
