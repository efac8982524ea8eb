"""Drift reports: each camera's latest drift verdict and scores, for ``/metrics``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

One new table, nothing existing changes (``fleet.drift`` is the API over it):

* ``camera_drift`` — one row per camera the platform reported drift for: the newest window's
  start and end, its verdict, whether it drifted, its scores by metric name (JSON), the
  model version, when and by whom it was reported.

Older gateways never wrote it, so there is no data to move; a downgrade drops it (the
platform reports the next window again).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "camera_drift",
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(), nullable=False),
        sa.Column("window_end", sa.DateTime(), nullable=False),
        sa.Column("verdict", sa.String(length=32), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.Column("reported_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("camera_id"),
    )


def downgrade() -> None:
    op.drop_table("camera_drift")
