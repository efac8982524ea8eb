"""One live (not revoked) device per camera: a partial unique index on ``devices``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Without the index two concurrent enrollments of one camera could both succeed, so an older
database may hold several live devices for a camera, and creating the index would fail.
Those duplicates are resolved first, and recorded:

* per camera the live device seen most recently is kept (never-seen devices rank last; ties
  go to the later enrollment, then the larger device id) — it is the one the camera's agent
  is using, and the others are leftovers of the race;
* every other live device of that camera is revoked as ``revoke_device`` does it (status
  ``inactive``, ``revoked_at`` set, its unrevoked tokens revoked), with ``status_reason``
  naming the device kept, one ``device_revoked`` audit row (actor ``migration:0002``) and a
  warning in the log. An agent holding a revoked device gets 401 and must be re-enrolled
  after the kept device is revoked, which is what the gateway has always required.

A database made by a gateway from before migrations but after the index existed already has
it: then there is nothing to do.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

logger = logging.getLogger("fleet.migrations")

INDEX = "uq_devices_live_camera"
ACTOR = "migration:0002"

devices = sa.table(
    "devices",
    sa.column("device_id", sa.String()),
    sa.column("camera_id", sa.String()),
    sa.column("status", sa.String()),
    sa.column("enrolled_at", sa.DateTime()),
    sa.column("updated_at", sa.DateTime()),
    sa.column("last_seen_at", sa.DateTime()),
    sa.column("revoked_at", sa.DateTime()),
    sa.column("status_reason", sa.Text()),
)
tokens = sa.table(
    "tokens", sa.column("device_id", sa.String()), sa.column("revoked_at", sa.DateTime())
)
audit_log = sa.table(
    "audit_log",
    sa.column("at", sa.DateTime()),
    sa.column("action", sa.String()),
    sa.column("outcome", sa.String()),
    sa.column("actor", sa.String()),
    sa.column("device_id", sa.String()),
    sa.column("detail", sa.JSON()),
)


def _keep_rank(row: Any) -> tuple[bool, datetime, datetime, str]:
    """Larger is kept: seen at all, seen last, enrolled last, device id."""
    seen = row.last_seen_at is not None
    return (seen, row.last_seen_at or datetime.min, row.enrolled_at, row.device_id)


def retire_duplicate_live_devices(bind: sa.Connection, now: datetime) -> list[dict[str, Any]]:
    """Revoke all but one live device per camera; returns what was done, one entry each."""
    shared = (
        sa.select(devices.c.camera_id)
        .where(devices.c.revoked_at.is_(None))
        .group_by(devices.c.camera_id)
        .having(sa.func.count() > 1)
    )
    live = bind.execute(
        sa.select(devices.c.device_id, devices.c.camera_id, devices.c.enrolled_at,
                  devices.c.last_seen_at)
        .where(devices.c.revoked_at.is_(None), devices.c.camera_id.in_(shared))
    ).all()
    by_camera: dict[str, list[Any]] = defaultdict(list)
    for row in live:
        by_camera[row.camera_id].append(row)
    retired: list[dict[str, Any]] = []
    for camera_id, rows in sorted(by_camera.items()):
        kept, *others = sorted(rows, key=_keep_rank, reverse=True)
        for row in others:
            reason = (f"superseded by {kept.device_id}: camera {camera_id} had {len(rows)} live "
                      f"devices; migration 0002 (one live device per camera) kept the one seen "
                      f"most recently")
            bind.execute(
                devices.update().where(devices.c.device_id == row.device_id)
                .values(revoked_at=now, status="inactive", updated_at=now, status_reason=reason)
            )
            n_tokens = bind.execute(
                tokens.update()
                .where(tokens.c.device_id == row.device_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount
            entry = {"camera_id": camera_id, "device_id": row.device_id,
                     "kept_device_id": kept.device_id, "tokens_revoked": int(n_tokens or 0)}
            bind.execute(audit_log.insert().values(
                at=now, action="device_revoked", outcome="ok", actor=ACTOR,
                device_id=row.device_id, detail={"reason": "duplicate_live_device", **entry},
            ))
            logger.warning("camera %s had %d live devices: revoked %s (%d tokens), kept %s",
                           camera_id, len(rows), row.device_id, entry["tokens_revoked"],
                           kept.device_id)
            retired.append(entry)
    return retired


def upgrade() -> None:
    bind = op.get_bind()
    if INDEX in {ix["name"] for ix in sa.inspect(bind).get_indexes("devices")}:
        return
    retire_duplicate_live_devices(bind, datetime.now(UTC).replace(tzinfo=None))
    op.create_index(
        INDEX, "devices", ["camera_id"], unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="devices")
