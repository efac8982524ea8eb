"""Per-camera configuration: the current document per camera and its append-only history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Two new tables, nothing existing changes (``fleet.camera_config`` is the API over them):

* ``camera_configs`` — one row per camera that has a configuration: its current ``version``
  (1, 2, …), the ``document`` (canonical JSON), its ``sha256``, when and by whom it was set.
  A camera without a row has version 0, the empty document.
* ``camera_config_versions`` — every version ever written, never updated or deleted;
  ``(camera_id, version)`` is unique, so two writers that raced past the optimistic
  concurrency check cannot both record the same version.

Older gateways never wrote either table, so there is no data to move; a downgrade drops both
(and with them every camera's configuration and history).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Integer on SQLite so the primary key aliases ROWID (autoincrement); BIGINT elsewhere.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "camera_configs",
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("camera_id"),
    )
    op.create_table(
        "camera_config_versions",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("camera_id", "version",
                            name="uq_camera_config_versions_camera_version"),
    )


def downgrade() -> None:
    op.drop_table("camera_config_versions")
    op.drop_table("camera_configs")
