"""Test-wide set-up: every test runs against a throw-away roadloop home, never the repo's."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="roadloop-test-home-"))


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test module imports `definitions` (which reads the settings).
    os.environ.setdefault("ROADLOOP_HOME", str(_SESSION_HOME))
    os.environ.setdefault("ROADLOOP_PROFILE", "test")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(_SESSION_HOME / "ultralytics"))
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    from roadloop.settings import get_settings

    path = get_settings().shared_dir
    if not (path / "datasets").is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture()
def roadloop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh settings home for one test (the settings cache is reset around it)."""
    from roadloop.settings import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("ROADLOOP_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def fiftyone_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary FiftyOne database (mongod) for the whole session (~10 s cold start)."""
    fodb = sys.modules.get("fiftyone.core.odm.database")
    if fodb is not None and fodb._client is not None:  # something else in the process started it
        import fiftyone as fo

        return Path(fo.config.database_dir)
    from roadloop.review import configure_fiftyone

    db = tmp_path_factory.mktemp("fiftyone-db")
    fo = configure_fiftyone(db)
    try:
        fo.list_datasets()  # starts mongod now, once
    except Exception as exc:  # noqa: BLE001 - environment problem, reported clearly
        pytest.fail(f"FiftyOne's MongoDB could not start in {db}: {exc}")
    return db
