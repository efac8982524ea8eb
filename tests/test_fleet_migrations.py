"""Gateway schema migrations (``fleet.migrations``) on SQLite and a real PostgreSQL.

"Old database" means one made by a gateway before migrations: the create_all DDL of
fleet/db.py before the one-live-device index, frozen in tests/data/fleet_schema_0001.*.sql,
filled with data as that gateway wrote it — including a camera with several live devices,
which the missing index let through.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from fleet import migrations
from fleet.auth import hash_token
from fleet.cli import main_app
from fleet.db import (
    AuditEvent,
    Base,
    CameraConfigVersionRow,
    CameraDriftRow,
    Database,
    Device,
    FrameRow,
    GatewayStateRow,
    HeartbeatRow,
    ModelManifestRow,
    RolloutRow,
    Token,
    TrafficIntervalRow,
)
from fleet.migrations import runner
from launch.localfleet import GatewayProcess, child_env

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import T0, _hb, bearer, meta, post_frame

make_env = gateway_tests.make_env
frame_jpeg = gateway_tests.frame_jpeg

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
OLD = datetime(2026, 5, 1, 8, 0, 0)  # naive UTC, as the old gateway stored it
LIVE_INDEX = "uq_devices_live_camera"
# What a gateway between the index commit and migrations made: the baseline plus the index.
INDEX_DDL = f"CREATE UNIQUE INDEX {LIVE_INDEX} ON devices (camera_id) WHERE revoked_at IS NULL"


# --------------------------------------------------------------------------- helpers
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a new database on the loopback PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}"
    return request.getfixturevalue("postgres_server").new_database("migrations")


@pytest.fixture()
def open_dbs() -> Any:
    """``Database`` factory; every one is disposed at the end."""
    opened: list[Database] = []

    def _open(url: str) -> Database:
        opened.append(Database(url))
        return opened[-1]

    yield _open
    for db in opened:
        db.dispose()


def old_schema(db: Database, *, with_index: bool = False, skip: tuple[str, ...] = ()) -> None:
    """Run the pre-migration DDL (optionally with the index, or without some tables)."""
    sql = (DATA / f"fleet_schema_0001.{db.engine.dialect.name}.sql").read_text()
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    statements = [s.strip() for s in body.split(";") if s.strip()]
    statements = [s for s in statements
                  if not any(f"TABLE {t} (" in s or f"ON {t} (" in s for t in skip)]
    if with_index:
        statements.append(INDEX_DDL)
    with db.engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _access(device_id: str) -> str:
    return f"legacy-access-{device_id}"


def _device(device_id: str, camera_id: str, enrolled: timedelta, seen: timedelta | None,
            revoked: bool = False) -> dict[str, Any]:
    return {"device_id": device_id, "camera_id": camera_id,
            "status": "inactive" if revoked else "active", "scopes": "camera:write",
            "agent_version": "0.1.0", "hardware": {"cpu": "old"}, "enrolled_at": OLD + enrolled,
            "updated_at": OLD + enrolled, "last_seen_at": OLD + seen if seen else None,
            "revoked_at": OLD + enrolled if revoked else None, "status_reason": None}


OLD_DEVICES = [
    # cam-a: three live devices. dev-a1 was seen last: kept.
    _device("dev-a1", "cam-a", timedelta(0), timedelta(hours=2)),
    _device("dev-a2", "cam-a", timedelta(minutes=1), timedelta(hours=1)),
    _device("dev-a3", "cam-a", timedelta(minutes=2), None),
    # cam-b: a revoked device (does not count) and one live device.
    _device("dev-b0", "cam-b", timedelta(0), timedelta(minutes=5), revoked=True),
    _device("dev-b1", "cam-b", timedelta(hours=1), None),
    # cam-d: two live devices never seen: the later enrollment is kept.
    _device("dev-d1", "cam-d", timedelta(0), None),
    _device("dev-d2", "cam-d", timedelta(minutes=5), None),
]
UNIQUE_DEVICES = [d for d in OLD_DEVICES if d["device_id"] in ("dev-a1", "dev-b0", "dev-b1")]
RETIRED = {"dev-a2": "dev-a1", "dev-a3": "dev-a1", "dev-d1": "dev-d2"}  # retired -> kept


def fill_old_database(db: Database, devices: list[dict[str, Any]]) -> None:
    """Rows as the pre-migration gateway wrote them, through the tables as they are."""
    md = sa.MetaData()
    md.reflect(db.engine)
    t = md.tables
    expires = OLD + timedelta(days=3650)  # valid under the test clock and the real one

    def token(secret: str, kind: str, device_id: str | None, **kw: Any) -> dict[str, Any]:
        return {"token_hash": hash_token(secret), "kind": kind, "device_id": device_id,
                "scopes": kw.pop("scopes", "camera:write"), "camera_id": None,
                "require_verification": False, "label": None, "created_at": OLD,
                "expires_at": expires, "used_at": None, "revoked_at": None, "parent_id": None,
                **kw}

    tokens = [token("legacy-admin", "admin", None, scopes="camera:admin", label="ops")]
    tokens.append(token("legacy-enroll", "enrollment", None, used_at=OLD))
    for d in devices:
        tokens.append(token(_access(d["device_id"]), "access", d["device_id"],
                            revoked_at=d["revoked_at"]))
        tokens.append(token(f"legacy-refresh-{d['device_id']}", "refresh", d["device_id"],
                            revoked_at=d["revoked_at"]))
    frames = [{"camera_id": d["camera_id"], "frame_id": f"f-{d['device_id']}-{i}",
               "device_id": d["device_id"], "captured_at": OLD + timedelta(seconds=i),
               "received_at": OLD + timedelta(seconds=i, milliseconds=5),
               "path": f"{d['camera_id']}/2026-05-01/f-{d['device_id']}-{i}.jpg", "width": 160,
               "height": 120, "size_bytes": 5000 + i, "sha256": "ab" * 32,
               "model_version": "sha256:old", "importance": 1.5, "reasons": ["low_confidence"],
               "n_detections": i, "recovered": False}
              for d in devices for i in range(3)]
    heartbeats = [{"camera_id": d["camera_id"], "device_id": d["device_id"],
                   "sent_at": OLD + timedelta(minutes=i), "received_at": OLD + timedelta(minutes=i),
                   "schema_version": 1, "model_version": "sha256:old", "fps": 9.5,
                   "latency_p50_ms": 20.0, "latency_p95_ms": 41.0, "errors": 0,
                   "dropped_frames": 1, "outbox_depth": 2, "payload": {"n": i}}
                  for d in devices for i in range(2)]
    manifest = {"manifest_sha256": "m" * 64, "file_sha256": "f" * 64, "size": 3 * 2**31,
                "model_version": "v7", "rollout_id": "r-7", "key_id": "k1",
                "manifest": {"model_version": "v7"}, "path": "ff/ffff.onnx",
                "published_at": OLD, "published_by": "ci"}
    rollout = {"rollout_id": "r-7", "manifest_sha256": "m" * 64, "model_version": "v7",
               "status": "active", "stages": [{"name": "canary", "percent": 5, "mode": "shadow"}],
               "stage_index": 0, "stage_started_at": OLD, "cohort_threshold": 0.05,
               "hold_seconds": 600.0, "budgets": {"max_error_rate": 0.05},
               "previous_model_version": "v6", "previous_manifest_sha256": None,
               "created_at": OLD, "updated_at": OLD, "finished_at": None, "reason": None,
               "created_by": "ops", "history": [{"event": "created"}], "health": {}}
    with db.engine.begin() as conn:
        conn.execute(t["devices"].insert(), devices)
        conn.execute(t["tokens"].insert(), tokens)
        conn.execute(t["frames"].insert(), frames)
        conn.execute(t["heartbeats"].insert(), heartbeats)
        conn.execute(t["model_manifests"].insert(), [manifest])
        conn.execute(t["rollouts"].insert(), [rollout])
        conn.execute(t["gateway_state"].insert(), [{"key": "last_reconcile", "value": "ok"}])
        conn.execute(t["audit_log"].insert(), [{"at": OLD, "action": "device_enrolled",
                                                "outcome": "ok", "actor": "dev-a1",
                                                "device_id": "dev-a1", "detail": {"x": 1}}])


def assert_old_data_intact(db: Database, devices: list[dict[str, Any]]) -> None:
    """Everything written before the upgrade reads back through today's models."""
    with db.read() as s:
        got = {d.device_id: d for d in s.scalars(sa.select(Device))}
        assert sorted(got) == sorted(d["device_id"] for d in devices)
        for d in devices:
            row = got[d["device_id"]]
            assert (row.camera_id, row.hardware) == (d["camera_id"], {"cpu": "old"})
            assert row.enrolled_at == d["enrolled_at"].replace(tzinfo=UTC)
        assert s.scalar(sa.select(sa.func.count()).select_from(Token)) == 2 + 2 * len(devices)
        admin = s.scalar(sa.select(Token).where(Token.token_hash == hash_token("legacy-admin")))
        assert admin is not None and admin.revoked_at is None and admin.label == "ops"
        frames = list(s.scalars(sa.select(FrameRow)))
        assert len(frames) == 3 * len(devices)
        assert {(f.frame_id, f.size_bytes, tuple(f.reasons)) for f in frames} == {
            (f"f-{d['device_id']}-{i}", 5000 + i, ("low_confidence",))
            for d in devices for i in range(3)}
        beats = list(s.scalars(sa.select(HeartbeatRow)))
        assert len(beats) == 2 * len(devices) and {b.payload["n"] for b in beats} == {0, 1}
        manifest = s.get(ModelManifestRow, "m" * 64)
        assert manifest is not None and manifest.size == 3 * 2**31
        rollout = s.get(RolloutRow, "r-7")
        assert rollout is not None and rollout.stages[0]["name"] == "canary"
        assert rollout.stage_started_at == OLD.replace(tzinfo=UTC)
        state = s.get(GatewayStateRow, "last_reconcile")
        assert state is not None and state.value == "ok"
        assert s.scalar(sa.select(AuditEvent).where(AuditEvent.actor == "dev-a1")) is not None


def live_device(device_id: str, camera_id: str, revoked: bool = False) -> Device:
    now = datetime.now(UTC)
    return Device(device_id=device_id, camera_id=camera_id, status="active",
                  scopes="camera:write", agent_version="1", enrolled_at=now, updated_at=now,
                  revoked_at=now if revoked else None)


def index_names(db: Database) -> dict[str, bool]:
    return {ix["name"]: bool(ix["unique"]) for ix in sa.inspect(db.engine).get_indexes("devices")}


# --------------------------------------------------------------------------- upgrades
def test_revisions_form_one_numbered_line() -> None:
    """0001 -> 0002 -> ... with file names that say so: two branches adding the same number
    (a merge of two model changes) fail here, by name, before anything else does."""
    scripts = list(reversed(list(runner._scripts().walk_revisions())))
    ids = [s.revision for s in scripts]
    assert ids == [f"{n:04d}" for n in range(1, len(ids) + 1)], ids
    assert [s.down_revision for s in scripts] == [None, *ids[:-1]]
    for script in scripts:
        assert Path(script.path).name.startswith(f"{script.revision}_"), script.path
    files = sorted(p.name for p in (runner.MIGRATIONS_DIR / "versions").glob("[0-9]*.py"))
    assert len(files) == len(ids), files
    assert migrations.head_revision() == ids[-1]



def test_old_database_upgrades_with_data_intact_and_one_live_device_per_camera(
    db_url: str, open_dbs: Any
) -> None:
    db = open_dbs(db_url)
    old_schema(db)
    fill_old_database(db, OLD_DEVICES)
    assert LIVE_INDEX not in index_names(db)

    result = migrations.upgrade(db)
    assert (result.before, result.after, result.adopted) == (None, migrations.head_revision(),
                                                             True)
    assert_old_data_intact(db, OLD_DEVICES)

    # Duplicates resolved as revision 0002 documents: the most recently seen device (else the
    # latest enrolled) keeps the camera; the others are revoked with their tokens, audited.
    with db.read() as s:
        devices = {d.device_id: d for d in s.scalars(sa.select(Device))}
        live = sorted(d.device_id for d in devices.values() if d.revoked_at is None)
        assert live == ["dev-a1", "dev-b1", "dev-d2"]
        assert devices["dev-b0"].revoked_at == OLD.replace(tzinfo=UTC)  # untouched
        for retired, kept in RETIRED.items():
            device = devices[retired]
            assert device.status == "inactive" and device.status_reason is not None
            assert f"superseded by {kept}" in device.status_reason
        tokens = list(s.scalars(sa.select(Token).where(Token.device_id.is_not(None))))
        revoked = {t.device_id for t in tokens if t.revoked_at is not None}
        assert revoked == {"dev-b0", *RETIRED}
        audits = list(s.scalars(sa.select(AuditEvent).where(AuditEvent.actor == "migration:0002")))
        assert {(a.device_id, a.detail["kept_device_id"], a.detail["tokens_revoked"])
                for a in audits} == {(r, k, 2) for r, k in RETIRED.items()}
        assert {a.action for a in audits} == {"device_revoked"}

    # The index exists and the database itself now refuses a second live device.
    assert index_names(db)[LIVE_INDEX] is True
    with db.write() as s:
        s.add(live_device("dev-b2", "cam-b", revoked=True))  # a revoked one does not count
        s.commit()
    with db.write() as s, pytest.raises(IntegrityError):
        s.add(live_device("dev-b3", "cam-b"))
        s.flush()
    with db.write() as s:
        s.add(live_device("dev-e1", "cam-e"))
        s.commit()

    again = migrations.upgrade(db)  # a second start finds it at head
    assert again.before == again.after == migrations.head_revision() and not again.adopted
    assert migrations.status(db).differences == []


def test_a_failed_upgrade_changes_nothing(db_url: str, open_dbs: Any) -> None:
    """All pending revisions run in one transaction: when 0002 cannot create its index (here
    a table has taken the name), the duplicates it had already revoked are live again and no
    version is recorded — the database is exactly the old one, and the error says so."""
    db = open_dbs(db_url)
    old_schema(db)
    fill_old_database(db, OLD_DEVICES)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {LIVE_INDEX} (x INTEGER)")
    with pytest.raises(migrations.MigrationError, match="nothing was changed"):
        migrations.upgrade(db)
    assert migrations.VERSION_TABLE not in sa.inspect(db.engine).get_table_names()
    with db.read() as s:
        live = {d.device_id for d in s.scalars(sa.select(Device).where(
            Device.revoked_at.is_(None)))}
        assert live == {d["device_id"] for d in OLD_DEVICES if d["revoked_at"] is None}
        assert s.scalar(sa.select(AuditEvent).where(AuditEvent.actor == "migration:0002")) is None
    assert_old_data_intact(db, OLD_DEVICES)


def test_database_made_with_the_index_but_no_version_is_stamped_not_recreated(
    db_url: str, open_dbs: Any
) -> None:
    """A gateway from after the index commit but before migrations: nothing to change."""
    db = open_dbs(db_url)
    old_schema(db, with_index=True)
    fill_old_database(db, UNIQUE_DEVICES)
    result = migrations.upgrade(db)
    assert result.adopted and result.after == migrations.head_revision()
    assert_old_data_intact(db, UNIQUE_DEVICES)
    with db.read() as s:
        assert s.scalar(sa.select(AuditEvent).where(AuditEvent.actor == "migration:0002")) is None
    assert migrations.status(db).differences == []


def test_first_release_database_gets_the_rollout_tables(open_dbs: Any, tmp_path: Path) -> None:
    """The first gateway had no model_manifests/rollouts: adopting it creates just those."""
    db = open_dbs(f"sqlite:///{tmp_path / 'fleet.db'}")
    old_schema(db, skip=("model_manifests", "rollouts"))
    with db.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO gateway_state (key, value) VALUES ('k', 'v')"))
    assert "rollouts" not in sa.inspect(db.engine).get_table_names()
    assert migrations.upgrade(db).adopted
    assert {"model_manifests", "rollouts"} <= set(sa.inspect(db.engine).get_table_names())
    with db.read() as s:
        assert s.get(GatewayStateRow, "k") is not None
    assert migrations.status(db).differences == []


CAMERA_TABLES = {"camera_configs", "camera_config_versions"}


def test_0003_adds_the_camera_config_tables_to_a_0002_database(
    db_url: str, open_dbs: Any
) -> None:
    """A database of revision 0002 with data in it: 0003 adds the two configuration tables
    and changes nothing else; the database itself refuses a second row for one (camera,
    version); a downgrade to 0002 drops exactly those tables."""
    db = open_dbs(db_url)
    assert migrations.upgrade(db, "0002").after == "0002"
    fill_old_database(db, UNIQUE_DEVICES)
    assert not CAMERA_TABLES & set(sa.inspect(db.engine).get_table_names())

    result = migrations.upgrade(db)
    assert (result.before, result.after) == ("0002", migrations.head_revision())
    assert CAMERA_TABLES <= set(sa.inspect(db.engine).get_table_names())
    assert_old_data_intact(db, UNIQUE_DEVICES)
    assert migrations.status(db).differences == []

    def version_row(doc: dict[str, Any]) -> CameraConfigVersionRow:
        return CameraConfigVersionRow(camera_id="cam-a", version=1, document=doc,
                                      sha256="0" * 64, created_at=datetime.now(UTC),
                                      created_by="test", reason="r")

    with db.write() as s:
        s.add(version_row({"notes": "first"}))
        s.commit()
    with db.write() as s, pytest.raises(IntegrityError):
        s.add(version_row({"notes": "a racing writer"}))
        s.flush()
    with db.read() as s:
        (row,) = s.scalars(sa.select(CameraConfigVersionRow))
        assert row.document == {"notes": "first"} and row.created_at.tzinfo is not None

    with runner._locked(db) as conn:
        command.downgrade(runner.alembic_config(conn), "0002")
    assert not CAMERA_TABLES & set(sa.inspect(db.engine).get_table_names())
    assert migrations.status(db).current == "0002"
    assert_old_data_intact(db, UNIQUE_DEVICES)


TRAFFIC_TABLES = {"traffic_intervals", "traffic_line_counts", "traffic_zone_stats",
                  "traffic_events"}


def test_0004_adds_the_traffic_tables_to_a_0003_database(db_url: str, open_dbs: Any) -> None:
    """0004 adds the four traffic tables to a 0003 database with data and changes nothing
    else; a record id is stored once; a downgrade to 0003 drops exactly those tables."""
    db = open_dbs(db_url)
    assert migrations.upgrade(db, "0003").after == "0003"
    fill_old_database(db, UNIQUE_DEVICES)
    assert not TRAFFIC_TABLES & set(sa.inspect(db.engine).get_table_names())
    result = migrations.upgrade(db)
    assert (result.before, result.after) == ("0003", migrations.head_revision())
    assert TRAFFIC_TABLES <= set(sa.inspect(db.engine).get_table_names())
    assert_old_data_intact(db, UNIQUE_DEVICES)
    assert migrations.status(db).differences == []

    def interval() -> TrafficIntervalRow:
        now = datetime.now(UTC)
        return TrafficIntervalRow(record_id="cam-a.1.2", camera_id="cam-a", interval_start=now,
                                  interval_s=60, covered_s=60.0, frames=1, config_version=0,
                                  received_at=now, document={"record_id": "cam-a.1.2"})

    with db.write() as s:
        s.add(interval())
        s.commit()
    with db.write() as s, pytest.raises(IntegrityError):
        s.add(interval())
        s.flush()
    with runner._locked(db) as conn:
        command.downgrade(runner.alembic_config(conn), "0003")
    assert not TRAFFIC_TABLES & set(sa.inspect(db.engine).get_table_names())
    assert migrations.status(db).current == "0003"
    assert_old_data_intact(db, UNIQUE_DEVICES)


def test_0005_adds_the_drift_table_to_a_0004_database(db_url: str, open_dbs: Any) -> None:
    """0005 adds ``camera_drift`` to a 0004 database with data and changes nothing else; a
    downgrade to 0004 drops exactly that table."""
    db = open_dbs(db_url)
    assert migrations.upgrade(db, "0004").after == "0004"
    fill_old_database(db, UNIQUE_DEVICES)
    assert "camera_drift" not in sa.inspect(db.engine).get_table_names()
    result = migrations.upgrade(db)
    assert (result.before, result.after) == ("0004", migrations.head_revision())
    assert "camera_drift" in sa.inspect(db.engine).get_table_names()
    assert_old_data_intact(db, UNIQUE_DEVICES)
    assert migrations.status(db).differences == []
    now = datetime.now(UTC)
    with db.write() as s:
        s.add(CameraDriftRow(camera_id="cam-a", window_start=now - timedelta(minutes=15),
                             window_end=now, verdict="minor", drifted=True,
                             scores={"brightness": 0.12}, reported_at=now))
        s.commit()
    with db.read() as s:
        row = s.get(CameraDriftRow, "cam-a")
        assert row is not None and row.drifted is True and row.scores == {"brightness": 0.12}
    with runner._locked(db) as conn:
        command.downgrade(runner.alembic_config(conn), "0004")
    assert "camera_drift" not in sa.inspect(db.engine).get_table_names()
    assert migrations.status(db).current == "0004"
    assert_old_data_intact(db, UNIQUE_DEVICES)


# --------------------------------------------------------------------------- schema agreement
def test_fresh_database_is_built_by_migrations_and_matches_the_models(
    db_url: str, open_dbs: Any
) -> None:
    """The test that fails when a model changes without a revision."""
    db = open_dbs(db_url)
    result = migrations.upgrade(db)
    assert (result.before, result.adopted) == (None, False)
    st = migrations.status(db)
    assert st.at_head and st.differences == []
    tables = set(sa.inspect(db.engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {migrations.VERSION_TABLE}
    assert index_names(db)[LIVE_INDEX] is True


def test_schema_check_reports_drift(db_url: str, open_dbs: Any) -> None:
    """The comparison above is not vacuous: a column or index out of step is reported."""
    db = open_dbs(db_url)
    migrations.upgrade(db)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE frames ADD COLUMN stray INTEGER")
        conn.exec_driver_sql(f"DROP INDEX {LIVE_INDEX}")
    diffs = migrations.status(db).differences
    assert any("remove_column" in d and "stray" in d for d in diffs), diffs
    assert any("add_index" in d and LIVE_INDEX in d for d in diffs), diffs

    # ...and a model with a column no revision adds is reported the same way.
    changed = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["tokens"].append_column(sa.Column("family_id", sa.String(64)))
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": migrations.VERSION_TABLE})
        found = compare_metadata(ctx, changed)
    assert any(d[0] == "add_column" and d[3].name == "family_id" for d in found
               if isinstance(d, tuple)), found


def test_revision_0001_is_the_schema_older_gateways_made(
    db_url: str, open_dbs: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """0001 run on an empty database equals the frozen pre-migration DDL, table by table."""
    legacy = open_dbs(f"sqlite:///{tmp_path / 'legacy.db'}" if db_url.startswith("sqlite")
                      else request.getfixturevalue("postgres_server").new_database("legacy"))
    old_schema(legacy)
    reflected = sa.MetaData()
    reflected.reflect(legacy.engine)

    db = open_dbs(db_url)
    assert migrations.upgrade(db, "0001").after == "0001"
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": migrations.VERSION_TABLE,
                                                     "compare_type": True})
        assert compare_metadata(ctx, reflected) == []
    assert LIVE_INDEX not in index_names(db)


def test_downgrade_and_upgrade_again(open_dbs: Any, tmp_path: Path) -> None:
    db = open_dbs(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrations.upgrade(db)
    with runner._locked(db) as conn:
        command.downgrade(runner.alembic_config(conn), "0001")
    assert migrations.status(db).current == "0001" and LIVE_INDEX not in index_names(db)
    assert migrations.upgrade(db).before == "0001"
    assert migrations.status(db).differences == []


def test_sqlite_table_rebuilds_keep_foreign_keys_checked(open_dbs: Any, tmp_path: Path) -> None:
    """A later revision may rebuild a table (``op.batch_alter_table``, SQLite's only way to
    alter most things) even when other tables reference it; the foreign keys are checked at
    the end instead, and a migration that breaks them is refused."""
    from alembic.operations import Operations

    db = open_dbs(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrations.upgrade(db)
    fill_old_database(db, UNIQUE_DEVICES)
    with runner._locked(db) as conn:
        op = Operations(MigrationContext.configure(conn))
        with op.batch_alter_table("devices", recreate="always") as batch:
            batch.add_column(sa.Column("note", sa.Text(), nullable=True))
    assert "note" in {c["name"] for c in sa.inspect(db.engine).get_columns("devices")}
    assert_old_data_intact(db, UNIQUE_DEVICES)

    with pytest.raises(migrations.MigrationError, match="foreign keys"), \
            runner._locked(db) as conn:
        conn.exec_driver_sql("DELETE FROM devices WHERE device_id = 'dev-a1'")
    with db.read() as s:
        assert s.get(Device, "dev-a1") is not None  # rolled back
    with db.engine.connect() as conn:  # and the pool's connections enforce foreign keys again
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


# --------------------------------------------------------------------------- concurrency
def test_concurrent_upgrades_queue_on_the_migration_lock(db_url: str, open_dbs: Any) -> None:
    """While one process holds the lock and migrates, another waits, then finds head and
    does nothing. Ordered by events, not sleeps: the second asks for the lock while the first
    holds it, so whatever it reads under the lock comes after the first committed."""
    first, second = open_dbs(db_url), open_dbs(db_url)
    asked = threading.Event()

    @sa.event.listens_for(second.engine, "before_cursor_execute")
    def _watch(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "BEGIN IMMEDIATE" in statement or "pg_advisory_xact_lock" in statement:
            asked.set()

    outcome: list[Any] = []

    def second_process() -> None:
        try:
            outcome.append(migrations.upgrade(second))
        except (migrations.MigrationError, sa.exc.SQLAlchemyError) as exc:  # reported below
            outcome.append(exc)

    with runner._locked(first) as conn:
        thread = threading.Thread(target=second_process)
        thread.start()
        assert asked.wait(120), f"the second upgrade never asked for the lock: {outcome}"
        command.upgrade(runner.alembic_config(conn), "head")
    thread.join(120)
    assert not thread.is_alive()
    (result,) = outcome
    assert isinstance(result, migrations.MigrationResult), result
    assert result.before == result.after == migrations.head_revision()
    with first.engine.connect() as conn:
        versions = conn.execute(sa.text(f"SELECT * FROM {migrations.VERSION_TABLE}")).all()
    assert [tuple(v) for v in versions] == [(migrations.head_revision(),)]


def test_database_from_a_newer_gateway_is_refused(open_dbs: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = open_dbs(url)
    migrations.upgrade(db)
    with db.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(migrations.MigrationError, match="9999.*newer gateway"):
        migrations.upgrade(db)
    r = CliRunner().invoke(main_app, ["db", "upgrade", "--database-url", url])
    assert r.exit_code == 1 and "newer gateway" in r.output


# --------------------------------------------------------------------------- gateway & CLI
def test_gateway_started_on_an_old_database_serves(
    db_url: str, open_dbs: Any, make_env: Any, frame_jpeg: bytes
) -> None:
    old = open_dbs(db_url)
    old_schema(old)
    fill_old_database(old, OLD_DEVICES)
    old.dispose()

    env = make_env(database_url=db_url)  # starting the app upgrades the database
    assert migrations.status(env.gw.db).current == migrations.head_revision()
    admin = bearer("legacy-admin")
    devices = {d["device_id"]: d for d in env.client.get("/v1/devices", headers=admin).json()}
    assert {k for k, d in devices.items() if d["revoked_at"] is None} == {
        "dev-a1", "dev-b1", "dev-d2"}

    kept = bearer(_access("dev-a1"))
    hb = env.client.post("/v1/heartbeats", json=_hb("cam-a", T0), headers=kept)
    assert hb.status_code == 202, hb.text
    r = post_frame(env.client, _access("dev-a1"), meta("f-new"), frame_jpeg)
    assert r.status_code == 201, r.text
    assert env.client.post("/v1/heartbeats", json=_hb("cam-a", T0),
                           headers=bearer(_access("dev-a2"))).status_code == 401

    taken = env.client.post("/v1/enroll", json={"enrollment_token": env.enrollment_token(),
                                                "camera_id": "cam-a", "agent_version": "1"})
    assert taken.status_code == 409 and "dev-a1" in taken.json()["detail"]
    assert env.enroll("cam-new")["device_id"].startswith("dev-")
    assert len(env.rows()) == 3 * len(OLD_DEVICES) + 1


def test_db_commands(tmp_path: Path, open_dbs: Any) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    old_schema(open_dbs(url))

    def run(*args: str) -> Any:
        return CliRunner().invoke(main_app, ["db", *args, "--database-url", url])

    assert "before migrations" in run("current").output
    check = run("check")
    assert check.exit_code == 1 and "add_index" in check.output and LIVE_INDEX in check.output
    up = run("upgrade")
    assert up.exit_code == 0, up.output
    assert migrations.MigrationResult.model_validate_json(up.output.strip().splitlines()[-1]
                                                          ).adopted
    assert run("current").output.strip() == f"{migrations.head_revision()} (head)"
    ok = run("check")
    assert ok.exit_code == 0 and "matches the models" in ok.output

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    r = CliRunner().invoke(main_app, ["db", "current", "--database-url", empty])
    assert "empty database" in r.output


def test_a_model_change_gets_its_revision_the_documented_way(tmp_path: Path) -> None:
    """On a copy of the package: change a model, `db check` sees it, `db revision` writes
    the next revision (self-contained), `db upgrade` applies it, `db check` passes."""
    copy = tmp_path / "src"
    shutil.copytree(REPO / "fleet", copy / "fleet", ignore=shutil.ignore_patterns("__pycache__"))
    db_py = copy / "fleet" / "db.py"
    anchor = "    value: Mapped[str] = mapped_column(Text)\n"  # GatewayStateRow
    assert db_py.read_text().count(anchor) == 1
    db_py.write_text(db_py.read_text().replace(
        anchor, anchor + "    changed_at: Mapped[datetime | None] = "
                         "mapped_column(UTCDateTime(), nullable=True)\n"))
    env = child_env(PYTHONPATH=os.pathsep.join([str(copy), str(REPO)]))
    url = f"sqlite:///{tmp_path / 'fleet.db'}"

    def fleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleet", "db", *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              check=False)

    head = migrations.head_revision()
    next_rev = f"{int(head) + 1:04d}"
    versions = copy / "fleet" / "migrations" / "versions"
    before = set(versions.glob("*.py"))
    base = fleet("upgrade", "--database-url", url)
    assert json.loads(base.stdout.splitlines()[-1])["after"] == head, base.stderr
    drift = fleet("check", "--database-url", url)
    assert drift.returncode == 1 and "changed_at" in drift.stdout, drift.stdout + drift.stderr
    made = fleet("revision", "-m", "gateway state changed at")
    assert made.returncode == 0, made.stderr
    (revision,) = set(versions.glob("*.py")) - before
    assert revision.name == f"{next_rev}_gateway_state_changed_at.py"
    code = revision.read_text()
    assert "batch_alter_table('gateway_state'" in code and "add_column(" in code
    assert "sa.DateTime()" in code
    assert "fleet" not in code.split('"""')[-1], code  # imports nothing of the package
    up = fleet("upgrade", "--database-url", url)
    assert json.loads(up.stdout.splitlines()[-1])["after"] == next_rev, up.stderr
    done = fleet("check", "--database-url", url)
    assert done.returncode == 0 and "matches the models" in done.stdout, done.stdout


@pytest.mark.e2e
def test_two_workers_start_on_an_old_database(tmp_path: Path, open_dbs: Any) -> None:
    """``serve --workers 2``: the parent upgrades once, both workers start and serve."""
    home = tmp_path / "home"
    old = open_dbs(f"sqlite:///{home / 'fleet' / 'fleet.db'}")
    old_schema(old)
    fill_old_database(old, OLD_DEVICES)
    old.dispose()
    with GatewayProcess(home, log_path=tmp_path / "gateway.log",
                        extra_args=["--workers", "2"]) as gateway:
        for _ in range(4):  # more requests than workers
            r = httpx.get(f"{gateway.url}/v1/devices", headers=bearer("legacy-admin"), timeout=10)
            assert r.status_code == 200, r.text
            assert len(r.json()) == len(OLD_DEVICES)
        log = gateway.log_tail(20_000)
    assert log.count("gateway database upgraded from nothing to") == 1, log
    assert "Traceback" not in log, log
