"""Bring the gateway database to the schema the code expects, one process at a time.

``upgrade`` runs every pending Alembic revision in ONE transaction that first takes the
migration lock — ``BEGIN IMMEDIATE`` on SQLite (the write lock), a transaction-level advisory
lock on PostgreSQL — so gateway workers or CLI commands starting together queue, and the
ones that get the lock second find the database at head and do nothing. Both databases have
transactional DDL: a revision that fails leaves the database as it was.

The version lives in ``fleet_alembic_version``, not Alembic's default ``alembic_version``,
so the gateway can share a PostgreSQL database with Dagster (which has its own).
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from pydantic import BaseModel
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from fleet.db import Base, Database

logger = logging.getLogger("fleet.migrations")

MIGRATIONS_DIR = Path(__file__).resolve().parent
VERSION_TABLE = "fleet_alembic_version"
# pg_advisory_xact_lock key: any constant unique to this lock ("rlfleet" in ASCII).
ADVISORY_LOCK_KEY = 0x726C_666C_6565_74


class MigrationError(RuntimeError):
    """The database cannot be brought to this code's schema; the message says what to do."""


class MigrationResult(BaseModel):
    """What ``upgrade`` found and left."""

    before: str | None  # None: no version recorded (empty, or made before migrations)
    after: str | None
    head: str
    adopted: bool  # had gateway tables but no version: made by a gateway before migrations


class SchemaStatus(BaseModel):
    """``db current`` / ``db check``: where the database is and how it differs from the models."""

    current: str | None
    head: str
    gateway_tables: list[str]
    differences: list[str]  # empty when the database matches the models

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate sees only the gateway's tables (a shared database has others)."""
    return type_ != "table" or name in Base.metadata.tables


def alembic_config(connection: Connection | None = None) -> Config:
    """Programmatic configuration (no ``alembic.ini``); ``env.py`` uses ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None, "fleet/migrations/versions has no revisions"
    return head


def _current(conn: Connection) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def gateway_tables(conn: Connection) -> list[str]:
    """The gateway's tables that exist (model tables; not the version table)."""
    return sorted(set(inspect(conn).get_table_names()) & Base.metadata.tables.keys())


@contextmanager
def _locked(db: Database) -> Iterator[Connection]:
    """A connection in a transaction holding the migration lock; commits if the body returns.

    PostgreSQL: a transaction-level advisory lock. SQLite: ``BEGIN IMMEDIATE`` (the write lock;
    ``fleet.db`` issues BEGIN itself), with foreign keys off for the transaction and checked
    before commit instead — SQLite's documented procedure for rebuilding a table, which is
    what ``op.batch_alter_table`` does (dropping a table others reference fails otherwise).
    """
    with db.engine.connect() as conn:
        if conn.dialect.name != "sqlite":
            with conn.begin():
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": ADVISORY_LOCK_KEY})
                yield conn
            return
        raw = conn.connection.dbapi_connection
        assert raw is not None
        raw.execute("PRAGMA foreign_keys=OFF")  # effective only outside a transaction
        try:
            with conn.execution_options(sqlite_begin="BEGIN IMMEDIATE").begin():
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise MigrationError(f"the migration would leave rows whose foreign keys "
                                         f"point nowhere (table, rowid, parent): {broken[:5]}")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
            if tuple(raw.execute("PRAGMA foreign_keys").fetchone() or ()) != (1,):
                conn.invalidate()  # never return a connection without foreign keys to the pool


def _check_known(current: str | None) -> None:
    if current is not None and current not in {s.revision for s in _scripts().walk_revisions()}:
        raise MigrationError(
            f"the gateway database is at schema revision {current}, which this gateway does "
            f"not know (its newest is {head_revision()}): a newer gateway migrated it. Run that "
            f"version, or restore the database backup taken before it upgraded"
        )


def upgrade(db: Database, target: str = "head") -> MigrationResult:
    """Run the pending revisions up to ``target`` under the migration lock."""
    head = head_revision()
    with db.engine.connect() as conn:  # fast path, no lock: at head stays at head
        before = _current(conn)
        conn.rollback()
    if before == head and target in ("head", head):
        return MigrationResult(before=before, after=before, head=head, adopted=False)
    with _locked(db) as conn:
        before = _current(conn)  # again: another process may have upgraded meanwhile
        _check_known(before)
        adopted = before is None and bool(gateway_tables(conn))
        try:
            command.upgrade(alembic_config(conn), target)
        except CommandError as exc:
            raise MigrationError(f"cannot upgrade the gateway database to {target}: {exc}") from exc
        except SQLAlchemyError as exc:
            raise MigrationError(f"upgrading the gateway database from {before or 'nothing'} "
                                 f"failed, nothing was changed (one transaction): {exc}") from exc
        after = _current(conn)
    if after != before:
        logger.info("gateway database upgraded from %s to %s%s", before or "nothing", after,
                    " (adopted a database made before migrations)" if adopted else "")
    return MigrationResult(before=before, after=after, head=head, adopted=adopted)


def status(db: Database) -> SchemaStatus:
    """Where the database is, and what ``compare_metadata`` finds between it and the models."""
    with db.engine.connect() as conn:
        current = _current(conn)
        ctx = MigrationContext.configure(conn, opts={
            "version_table": VERSION_TABLE, "include_name": include_name, "compare_type": True})
        diffs = compare_metadata(ctx, Base.metadata)
        tables = gateway_tables(conn)
        conn.rollback()
    return SchemaStatus(current=current, head=head_revision(), gateway_tables=tables,
                        differences=[_describe(d) for d in diffs])


def _describe(diff: Any) -> str:
    """One autogenerate diff as a line: ``add_column tokens family_id`` and the like."""
    if isinstance(diff, list):  # column modifications come grouped per column
        return "; ".join(_describe(d) for d in diff)
    op, *args = diff
    table = getattr(args[0], "table", None) if args else None  # an index's or constraint's
    parts = [table.name] if isinstance(getattr(table, "name", None), str) else []
    for arg in args:
        if isinstance(arg, str):
            parts.append(arg)
        elif isinstance(getattr(arg, "name", None), str):
            parts.append(arg.name)
    if op.startswith("modify_"):  # (..., existing value, new value)
        parts.append(f"{args[-2]!r} -> {args[-1]!r}")
    return " ".join([op, *parts])


def new_revision(message: str, *, autogenerate: bool = True) -> Path:
    """Write ``versions/NNNN_<slug>.py`` for a model change (for developers).

    With ``autogenerate`` a throw-away SQLite database is upgraded to head and compared with
    the models, so the file starts with the operations the change needs. Review it: Postgres
    specifics, data moves and renames are not guessed.
    """
    numbers = [int(m.group(1)) for p in (MIGRATIONS_DIR / "versions").glob("*.py")
               if (m := re.match(r"(\d{4})_", p.name))]
    rev_id = f"{max(numbers, default=0) + 1:04d}"
    with tempfile.TemporaryDirectory(prefix="fleet-revision-") as tmp:
        db = Database(f"sqlite:///{tmp}/head.db")
        try:
            upgrade(db)
            with _locked(db) as conn:
                script = command.revision(alembic_config(conn), message=message,
                                          autogenerate=autogenerate, rev_id=rev_id)
        finally:
            db.dispose()
    _scripts.cache_clear()
    assert script is not None and not isinstance(script, list)
    return Path(script.path)
