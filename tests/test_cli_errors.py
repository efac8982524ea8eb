"""The ``roadloop`` CLI on a user's mistakes (found by a black-box audit): one ``error:`` line
and exit code 2 instead of a traceback, and ``clean`` never deleting a folder that is not a
roadloop home (``ROADLOOP_HOME=`` once made it delete the current folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launch.cli import app
from roadloop.settings import get_settings


@pytest.fixture()
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    # ``demo`` writes these into os.environ itself (for its child processes): recorded here
    # so that they are put back after the test.
    for key in ("ROADLOOP_PROFILE", "ROADLOOP_HOME", "ROADLOOP_SHARED_DIR", "DAGSTER_HOME"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:  # setenv records "unset" (delenv of an unset name records nothing)
            monkeypatch.setenv(key, "")
            monkeypatch.delenv(key)

    def _run(*args: str, **env: str):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(app, list(args))
        finally:
            get_settings.cache_clear()

    return _run


def test_an_empty_home_is_refused_and_clean_deletes_nothing(run, tmp_path: Path) -> None:
    (tmp_path / "keepme").write_text("x")
    r = run("clean", "--yes", ROADLOOP_HOME="")
    assert r.exit_code == 2 and "ROADLOOP_HOME" in r.output and "empty" in r.output
    assert "Traceback" not in r.output
    assert (tmp_path / "keepme").is_file()


@pytest.mark.parametrize("layout", ["cwd", "file", "stranger"])
def test_clean_refuses_what_is_not_a_roadloop_home(run, tmp_path: Path, layout: str) -> None:
    target = {"cwd": tmp_path, "file": tmp_path / "f", "stranger": tmp_path / "project"}[layout]
    if layout == "file":
        target.write_text("x")
    elif layout == "stranger":
        (target / "src").mkdir(parents=True)
        (target / "frames").mkdir()  # one marker is not enough
    r = run("clean", "--yes", ROADLOOP_HOME=str(target))
    assert r.exit_code == 2 and "not deleting" in r.output, r.output
    assert target.exists()


def test_clean_deletes_a_used_home(run, tmp_path: Path) -> None:
    home = tmp_path / "state"
    for name in ("dagster", "frames", "mlflow"):
        (home / name).mkdir(parents=True)
    r = run("clean", "--yes", ROADLOOP_HOME=str(home))
    assert r.exit_code == 0 and not home.exists(), r.output


@pytest.mark.parametrize(("args", "env", "words"), [
    (["settings"], {"ROADLOOP_DAGSTER_PORT": "abc"}, ["ROADLOOP_DAGSTER_PORT", "integer"]),
    (["dataset", "restore", "zzz", "out"], {}, ["not a DVC md5"]),
])
def test_a_mistake_is_one_error_line(run, args: list[str], env: dict[str, str],
                                     words: list[str]) -> None:
    r = run(*args, **env)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.count("\n") <= 2, r.output
    for word in words:
        assert word in r.output


def test_a_demo_with_an_unknown_profile_writes_nothing(run, tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = run("demo", "--profile", "bogus", "--no-serve", ROADLOOP_HOME=str(home))
    assert r.exit_code == 2 and "ROADLOOP_PROFILE" in r.output, r.output
    assert not home.exists()
