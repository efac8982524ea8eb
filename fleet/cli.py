"""Command line of the fleet gateway.

``gateway_app`` (mounted as ``roadloop gateway``): ``serve``, ``db upgrade|current|check|revision``
(the database schema, ``fleet.migrations``).
``fleet_app`` (mounted as ``roadloop fleet``): ``token create``, ``admin-token
create|list|revoke``, ``devices list|status|revoke``. The fleet commands work on the gateway's database directly
(run them on the gateway host); secrets are printed once and stored only hashed.
``python -m fleet`` offers all of them in one app (``main_app``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import typer
from sqlalchemy import select

from fleet import migrations
from fleet.auth import (
    audit,
    create_admin_token,
    create_enrollment_token,
    revoke_admin_token,
    revoke_device,
)
from fleet.bounds import MAX_TOKEN_TTL_S
from fleet.config import GatewaySettings
from fleet.db import Database, Device, DeviceStatus, Token, TokenKind, sqlite_path
from roadloop.cli_errors import UserErrorGroup

logger = logging.getLogger(__name__)

HOME_OPT = typer.Option(None, "--home", help="State root (default: ROADLOOP_HOME / .roadloop).")
DB_OPT = typer.Option(None, "--database-url", help="Override ROADLOOP_GATEWAY_DATABASE_URL.")
SCOPES_OPT = typer.Option(["camera:write"], "--scopes", "--scope",
                          help="Scopes the device gets (repeatable).")

gateway_app = typer.Typer(help="Fleet gateway service.", no_args_is_help=True)
fleet_app = typer.Typer(help="Fleet administration: tokens and devices.", no_args_is_help=True)
token_app = typer.Typer(help="One-time enrollment tokens.", no_args_is_help=True)
admin_token_app = typer.Typer(help="Operator (camera:admin) access tokens.", no_args_is_help=True)
devices_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema: Alembic migrations.", no_args_is_help=True)
fleet_app.add_typer(token_app, name="token")
fleet_app.add_typer(admin_token_app, name="admin-token")
fleet_app.add_typer(devices_app, name="devices")
gateway_app.add_typer(db_app, name="db")


def _settings(home: Path | None, database_url: str | None = None, **extra: object) -> GatewaySettings:
    kw: dict[str, object] = {k: v for k, v in extra.items() if v is not None}
    if home is not None:
        kw["home"] = home
    if database_url is not None:
        kw["database_url"] = database_url
    return GatewaySettings(**kw)  # type: ignore[arg-type]


def _database(settings: GatewaySettings, *, upgrade: bool = True,
              new: Literal["create", "announce", "refuse"] = "create") -> Database:
    """The gateway's database, its schema upgraded to head first (as the gateway does).

    A SQLite file that is not there yet is created (``new="create"``: ``serve``, ``db
    upgrade``); created and said so on stderr (``"announce"``: the token commands, which an
    operator may well run before the gateway's first start, so a mistyped ``--home`` shows);
    or refused with exit code 2 (``"refuse"``: the commands that only read or change what is
    there, which on a new, empty database could only answer "nothing here")."""
    assert settings.database_url is not None
    path = sqlite_path(str(settings.database_url)) if settings.is_sqlite else None
    missing = path is not None and not path.exists()
    above = next((p for p in path.parents if p.exists()), None) if missing and path else None
    if above is not None and not above.is_dir():  # --home is a file: say that, not "missing"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(above))
    if missing and new == "refuse":
        typer.echo(f"error: no gateway database at {path} (check --home, --database-url, "
                   "ROADLOOP_GATEWAY_DATABASE_URL); not creating an empty database here: the "
                   "gateway creates it when it starts, `db upgrade` too", err=True)
        raise typer.Exit(2)
    db = Database(settings.database_url, synchronous=settings.sqlite_synchronous,
                  busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    if upgrade:
        _upgrade(db)
    if missing and new == "announce":
        typer.echo(f"# no gateway database was at {path}: created a new one (check --home if "
                   "the gateway already runs elsewhere: it will not know this token)", err=True)
    return db


def _upgrade(db: Database, target: str = "head") -> migrations.MigrationResult:
    """``migrations.upgrade``; a database it cannot upgrade ends the command with the reason."""
    try:
        return migrations.upgrade(db, target)
    except migrations.MigrationError as exc:
        db.dispose()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@gateway_app.callback()
def _gateway() -> None:
    """Fleet gateway service."""


@gateway_app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8700 / ROADLOOP_GATEWAY_PORT)."),
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
    workers: int = typer.Option(
        None, help="Worker processes (default 1 / ROADLOOP_GATEWAY_WORKERS); one per core."
    ),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log"),
) -> None:
    """Serve the gateway API (OpenAPI docs at /docs)."""
    import uvicorn

    from fleet.app import create_app
    from fleet.server import raise_open_files_limit, uvicorn_options

    settings = _settings(home, database_url, host=host, port=port, workers=workers)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Schema to head once, here, before any worker starts (each worker's start then finds it
    # there); a database this code cannot upgrade stops the command with the reason.
    _database(settings).dispose()
    typer.echo(f"fleet gateway on http://{settings.host}:{settings.port} "
               f"(db {settings.database_url}, frames {settings.frame_store}, "
               f"{settings.workers} worker{'s' if settings.workers > 1 else ''})")
    raise_open_files_limit(settings.limit_concurrency + 256)
    if settings.workers == 1:
        uvicorn.run(create_app(settings, freeze_gc=settings.gc_freeze_on_start),
                    host=settings.host, port=settings.port,
                    log_level=log_level, access_log=access_log, workers=1,
                    **uvicorn_options(settings))
        return
    # Several processes: prepare the database and repair the frame store once, here, then let
    # each worker build its app from the same settings (passed through the environment).
    from fleet.runtime import Gateway

    prep = Gateway(settings)
    prep.prepare_storage()
    prep.db.dispose()
    os.environ.update({
        "ROADLOOP_GATEWAY_HOME": str(settings.home),
        "ROADLOOP_GATEWAY_DATABASE_URL": str(settings.database_url),
        "ROADLOOP_GATEWAY_HOST": settings.host,
        "ROADLOOP_GATEWAY_PORT": str(settings.port),
        "ROADLOOP_GATEWAY_WORKERS": str(settings.workers),
        "ROADLOOP_GATEWAY_RECONCILE_ON_START": "false",
    })
    if settings.metrics_enabled:  # one /metrics over every worker (fleet.metrics)
        from fleet.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir(settings.home / "fleet" / "prometheus-multiproc")
    # Each worker imports the bounded protocol and reads its bounds from this environment.
    from fleet.workers import run_workers

    run_workers(uvicorn.Config("fleet.app:create_served_app", factory=True, host=settings.host,
                               port=settings.port, log_level=log_level, access_log=access_log,
                               workers=settings.workers,
                               **uvicorn_options(settings, importable=True)),
                settings.worker_sockets)


@token_app.callback()
def _token() -> None:
    """One-time enrollment tokens."""


@token_app.command("create")
def token_create(
    scopes: list[str] = SCOPES_OPT,
    ttl: int | None = typer.Option(None, "--ttl", min=1, max=MAX_TOKEN_TTL_S,
                                   help="Seconds the token stays usable (default 86400)."),
    camera_id: str | None = typer.Option(None, "--camera-id", help="Only this camera may "
                                            "enroll with it."),
    require_verification: bool = typer.Option(False, "--require-verification",
                                              help="Device starts pending_verification."),
    label: str | None = typer.Option(None, help="Note stored with the token."),
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
) -> None:
    """Print a new one-time enrollment token."""
    settings = _settings(home, database_url)
    flat = [s for item in scopes for s in item.replace(",", " ").split()]
    if camera_id is not None:
        from roadloop.data.frame_records import validate_id

        try:
            validate_id("camera_id", camera_id)
        except Exception as exc:
            raise typer.BadParameter(str(exc), param_hint="--camera-id") from exc
    db = _database(settings, new="announce")
    try:
        with db.write() as session:
            try:
                token, row = create_enrollment_token(
                    session, datetime.now(UTC), ttl_s=ttl or settings.enrollment_token_ttl_s,
                    scopes=flat, camera_id=camera_id, require_verification=require_verification,
                    label=label, actor="cli",
                )
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--scopes") from exc
            session.commit()
    finally:
        db.dispose()
    typer.echo(token)
    typer.echo(f"# one-time enrollment token; scopes {' '.join(row.scope_list)}; expires "
               f"{row.expires_at.isoformat()}", err=True)


@admin_token_app.callback()
def _admin_token() -> None:
    """Operator access tokens."""


@admin_token_app.command("create")
def admin_token_create(
    ttl: int | None = typer.Option(None, "--ttl", min=1, max=MAX_TOKEN_TTL_S,
                                   help="Seconds (default 30 days)."),
    label: str | None = typer.Option(None, help="Note stored with the token."),
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
) -> None:
    """Print a new camera:admin access token."""
    settings = _settings(home, database_url)
    db = _database(settings, new="announce")
    try:
        with db.write() as session:
            token, row = create_admin_token(session, datetime.now(UTC),
                                            ttl_s=ttl or settings.admin_token_ttl_s,
                                            label=label, actor="cli")
            session.commit()
    finally:
        db.dispose()
    typer.echo(token)
    typer.echo(f"# admin token {row.id} (camera:admin); expires {row.expires_at.isoformat()}; "
               f"revoke with `admin-token revoke {row.id}`", err=True)


def _admin_token_state(tok: Token, now: datetime) -> str:
    if tok.revoked_at is not None:
        return "revoked"
    return "expired" if tok.expires_at <= now else "active"


@admin_token_app.command("list")
def admin_token_list(
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
) -> None:
    """List admin tokens (id, label, created, expires, state; never the secret)."""
    db = _database(_settings(home, database_url), new="refuse")
    now = datetime.now(UTC)
    try:
        with db.read() as session:
            rows = [{"token_id": t.id, "label": t.label,
                     "created_at": t.created_at.isoformat(timespec="seconds"),
                     "expires_at": t.expires_at.isoformat(timespec="seconds"),
                     "revoked_at": t.revoked_at.isoformat(timespec="seconds")
                     if t.revoked_at else None,
                     "state": _admin_token_state(t, now)}
                    for t in session.scalars(select(Token).where(
                        Token.kind == TokenKind.admin.value).order_by(Token.id))]
    finally:
        db.dispose()
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    if not rows:
        typer.echo("no admin tokens")
        return
    typer.echo(f"{'id':>6} {'state':<8} {'created_at':<26} {'expires_at':<26} label")
    for r in rows:
        typer.echo(f"{r['token_id']:>6} {r['state']:<8} {r['created_at']:<26} "
                   f"{r['expires_at']:<26} {r['label'] or '-'}")


@admin_token_app.command("revoke")
def admin_token_revoke(
    token_id: int = typer.Argument(..., help="The token's id (see: admin-token list)."),
    reason: str | None = typer.Option(None, help="Why (kept in the audit log)."),
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
) -> None:
    """Revoke an admin token: its next request gets 401 (audited admin_token_revoked)."""
    db = _database(_settings(home, database_url), new="refuse")
    try:
        with db.write() as session:
            before = session.scalar(select(Token.revoked_at).where(
                Token.id == token_id, Token.kind == TokenKind.admin.value))
            tok = revoke_admin_token(session, token_id, datetime.now(UTC), actor="cli",
                                     reason=reason)
            if tok is None:
                typer.echo(f"no admin token {token_id} (see: admin-token list)", err=True)
                raise typer.Exit(1)
            session.commit()
            assert tok.revoked_at is not None
            typer.echo(json.dumps({"token_id": tok.id, "label": tok.label,
                                   "revoked_at": tok.revoked_at.isoformat(),
                                   "already_revoked": before is not None}))
    finally:
        db.dispose()


@devices_app.callback()
def _devices() -> None:
    """Enrolled devices."""


@devices_app.command("list")
def devices_list(
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
) -> None:
    """List devices."""
    from fleet.admin import device_out

    db = _database(_settings(home, database_url), new="refuse")
    try:
        with db.read() as session:
            devices = [device_out(d) for d in session.scalars(
                select(Device).order_by(Device.enrolled_at))]
    finally:
        db.dispose()
    if as_json:
        for d in devices:
            typer.echo(d.model_dump_json())
        return
    if not devices:
        typer.echo("no devices enrolled")
        return
    typer.echo(f"{'device_id':<22} {'camera_id':<24} {'status':<21} {'last_seen':<26} revoked")
    for d in devices:
        seen = d.last_seen_at.isoformat(timespec="seconds") if d.last_seen_at else "-"
        typer.echo(f"{d.device_id:<22} {d.camera_id:<24} {d.status.value:<21} {seen:<26} "
                   f"{'yes' if d.revoked_at else 'no'}")


def _change_device(device_id: str, home: Path | None, database_url: str | None,
                   status: DeviceStatus | None, revoke: bool) -> None:
    db = _database(_settings(home, database_url), new="refuse")
    try:
        with db.write() as session:
            device = session.get(Device, device_id)
            if device is None:
                typer.echo(f"no device {device_id} (see: devices list)", err=True)
                raise typer.Exit(1)
            now = datetime.now(UTC)
            if revoke:
                n = revoke_device(session, device, now)
                audit(session, now, "device_revoked", actor="cli", device_id=device_id,
                      detail={"tokens_revoked": n})
            else:
                assert status is not None
                if device.revoked_at is not None:
                    typer.echo(f"device {device_id} is revoked; enroll the camera again", err=True)
                    raise typer.Exit(1)
                old, device.status, device.updated_at = device.status, status.value, now
                audit(session, now, "device_status_changed", actor="cli", device_id=device_id,
                      detail={"from": old, "to": status.value})
            session.commit()
            typer.echo(json.dumps({"device_id": device_id, "status": device.status,
                                   "revoked": device.revoked_at is not None}))
    finally:
        db.dispose()


@devices_app.command("status")
def devices_status(
    device_id: str,
    status: DeviceStatus,
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
) -> None:
    """Set a device's status (active, inactive, maintenance, error, pending_verification)."""
    _change_device(device_id, home, database_url, status, revoke=False)


@devices_app.command("revoke")
def devices_revoke(
    device_id: str, home: Path | None = HOME_OPT, database_url: str | None = DB_OPT
) -> None:
    """Revoke a device and all its tokens."""
    _change_device(device_id, home, database_url, None, revoke=True)


@db_app.callback()
def _db() -> None:
    """Database schema: Alembic migrations."""


@db_app.command("upgrade")
def db_upgrade(
    to: str = typer.Option("head", "--to", help="Target revision (default: head)."),
    home: Path | None = HOME_OPT,
    database_url: str | None = DB_OPT,
) -> None:
    """Upgrade the database schema (the gateway also does this each time it starts)."""
    db = _database(_settings(home, database_url), upgrade=False)
    try:
        result = _upgrade(db, to)
    finally:
        db.dispose()
    typer.echo(result.model_dump_json())


def _status(home: Path | None, database_url: str | None) -> migrations.SchemaStatus:
    db = _database(_settings(home, database_url), upgrade=False, new="refuse")
    try:
        return migrations.status(db)
    finally:
        db.dispose()


@db_app.command("current")
def db_current(home: Path | None = HOME_OPT, database_url: str | None = DB_OPT) -> None:
    """Print the database's schema revision and the head revision of this code."""
    st = _status(home, database_url)
    if st.at_head:
        typer.echo(f"{st.current} (head)")
    elif st.current is None and not st.gateway_tables:
        typer.echo(f"none: empty database (head is {st.head}; the gateway creates it on start)")
    elif st.current is None:
        typer.echo(f"none: made by a gateway before migrations; `db upgrade` adopts it "
                   f"(head is {st.head})")
    else:
        typer.echo(f"{st.current}; head is {st.head}: run `db upgrade` (or start the gateway)")


@db_app.command("check")
def db_check(home: Path | None = HOME_OPT, database_url: str | None = DB_OPT) -> None:
    """Exit 1 unless the database is at head and its schema matches the models."""
    st = _status(home, database_url)
    for line in st.differences:
        typer.echo(f"differs from the models: {line}")
    if not st.at_head:
        typer.echo(f"at revision {st.current or 'none'}, head is {st.head}")
    if st.differences or not st.at_head:
        raise typer.Exit(1)
    typer.echo(f"{st.current} (head); schema matches the models")


@db_app.command("revision")
def db_revision(
    message: str = typer.Option(..., "-m", "--message", help="What the revision changes."),
    empty: bool = typer.Option(False, "--empty", help="No autogenerated operations."),
) -> None:
    """For developers: write fleet/migrations/versions/NNNN_<message>.py from the models."""
    path = migrations.new_revision(message, autogenerate=not empty)
    typer.echo(f"wrote {path}: review it, then run tests/test_fleet_migrations.py")


# `python -m fleet ...`: serve + the admin commands in one app; a user's mistake (bad
# ROADLOOP_GATEWAY_* settings, a bad database URL, a --home that is a file) is one `error:`
# line and exit code 2, as under `roadloop gateway|fleet` (roadloop.cli_errors).
main_app = typer.Typer(cls=UserErrorGroup, help="roadloop fleet gateway.", no_args_is_help=True)
main_app.command("serve")(serve)
main_app.add_typer(token_app, name="token")
main_app.add_typer(admin_token_app, name="admin-token")
main_app.add_typer(devices_app, name="devices")
main_app.add_typer(db_app, name="db")
