"""Test-wide set-up: every test runs against a throw-away roadloop home, never the repo's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .helpers import SHARED_DIR, require_shared

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="roadloop-test-home-"))


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test module imports `definitions` (which reads the settings).
    os.environ.setdefault("ROADLOOP_HOME", str(_SESSION_HOME))
    os.environ.setdefault("ROADLOOP_PROFILE", "test")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(_SESSION_HOME / "ultralytics"))
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Everything the tests start listens on loopback, and the agent honours the environment's
    # proxies (as httpx does): a CI runner's proxy must not carry requests meant for 127.0.0.1.
    if any(os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                       "http_proxy", "https_proxy", "all_proxy")):
        for key in ("NO_PROXY", "no_proxy"):
            os.environ[key] = ",".join(filter(None, (os.environ.get(key),
                                                     "127.0.0.1,localhost,::1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """End-to-end test files first, each file's tests in their own order. ``make test`` hands
    whole files to two workers (``--dist loadfile``) in this order; the e2e files take up to
    ~95 s each, and when one of them came last the other worker sat idle for minutes."""
    files: dict[str, bool] = {}
    for item in items:
        key = item.nodeid.split("::", 1)[0]
        files[key] = files.get(key, False) or item.get_closest_marker("e2e") is not None
    rank = {key: (not e2e, i) for i, (key, e2e) in enumerate(files.items())}
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With ``ROADLOOP_TEST_CPU_LOG=<file>``, append each test's CPU seconds (this process and
    the subprocesses it waited for: gateways, agents, Flower) as a JSON line: on 2 cores the
    suite's wall time is its CPU time over two, so this is what to cut to keep it short."""
    log = os.environ.get("ROADLOOP_TEST_CPU_LOG")
    before, started = (_cpu_seconds(), time.monotonic()) if log else (0.0, 0.0)
    yield
    if log:
        import json

        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": item.nodeid, "cpu_s": round(_cpu_seconds() - before, 3),
                                "wall_s": round(time.monotonic() - started, 3)}) + "\n")


@pytest.fixture(autouse=True)
def _multiprocess_metrics_folder_does_not_leak() -> Iterator[None]:
    """``gateway serve --workers N`` names a metrics folder in ``PROMETHEUS_MULTIPROC_DIR``;
    leaked into this process, every later gateway subprocess would share it and sum each
    other's counters."""
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == before, (
        "PROMETHEUS_MULTIPROC_DIR leaked from this test: restore it (monkeypatch)")


@pytest.fixture()
def leftovers_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreadable frames count as leftovers as soon as they are written (``IN_FLIGHT_GRACE``
    0): for tests whose image without its record stands for what a crash left, not for an
    upload in flight (an object store's LastModified cannot be set back)."""
    from datetime import timedelta

    monkeypatch.setattr("roadloop.data.frame_records.IN_FLIGHT_GRACE", timedelta(0))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data (``tests.helpers.SHARED_DIR``); skips without its datasets."""
    require_shared(SHARED_DIR / "datasets")
    return SHARED_DIR


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
    from roadloop.labeling.fiftyone_setup import configure_fiftyone

    db = tmp_path_factory.mktemp("fiftyone-db")
    fo = configure_fiftyone(db)
    try:
        fo.list_datasets()  # starts mongod now, once
    except Exception as exc:  # noqa: BLE001 - environment problem, reported clearly
        pytest.fail(f"FiftyOne's MongoDB could not start in {db}: {exc}")
    return db


# --------------------------------------------------------------------------- PostgreSQL
@dataclass(frozen=True)
class PostgresServer:
    """A throw-away PostgreSQL cluster on loopback (trust auth, superuser ``postgres``)."""

    host: str
    port: int

    def new_database(self, prefix: str) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        import psycopg2

        name = f"{prefix}_{time.monotonic_ns()}"
        conn = psycopg2.connect(host=self.host, port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{name}"


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as ``nobody`` then."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: PostgreSQL will not start as root")
    return [runuser, "-u", "nobody", "--", *cmd]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """``initdb`` + ``pg_ctl start`` in a temp folder; skips without the server binaries."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    from launch.localfleet import free_port

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_as_server_user(cmd), cwd="/", capture_output=True, text=True,
                              timeout=120, check=False)

    # Not under pytest's tmp root: that is private to root, and the server may run as nobody.
    root = Path(tempfile.mkdtemp(prefix="roadloop-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "nobody")
    data, port = root / "data", free_port()
    r = run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres"])
    assert r.returncode == 0, r.stderr[-2000:]
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = run([pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"])
    assert r.returncode == 0, r.stderr[-2000:] + (root / "log").read_text()[-2000:]
    try:
        yield PostgresServer("127.0.0.1", port)
    finally:
        run([pg_ctl, "-D", str(data), "-m", "fast", "stop"])
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- S3 (moto)
@dataclass(frozen=True)
class S3Server:
    """moto's S3-compatible server on loopback (any credentials are accepted)."""

    endpoint_url: str

    env: ClassVar[dict[str, str]] = {"AWS_ACCESS_KEY_ID": "roadloop-test", "AWS_SECRET_ACCESS_KEY": "roadloop-test",
           "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url,
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.env["AWS_DEFAULT_REGION"])

    def new_bucket(self, prefix: str) -> str:
        """Create an empty bucket; returns its name."""
        name = f"{prefix}-{time.monotonic_ns()}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """``moto[server]`` (a dev dependency) in a thread of this process, on a free port."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
