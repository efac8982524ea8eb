"""Erasure records: every ``POST /v1/privacy/erase``, so an erased frame stays erased.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

One new table, nothing existing changes (``fleet.privacy`` writes it, ``fleet.db.erased_frames``
reads it):

* ``frame_erasures`` — one row per erasure: the camera, the range asked for (``since``,
  ``until``), the end of the capture times it refuses from then on (``covers_until``), when
  and by whom. Indexed by ``(camera_id, since)``: intake looks a batch's cameras up in the
  transaction that inserts its rows.

Older gateways never wrote it: erasures made before this revision are not recorded, so they
refuse nothing (as before). A downgrade drops it (and with it that protection).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Integer on SQLite so the primary key aliases ROWID (autoincrement); BIGINT elsewhere.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "frame_erasures",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.Column("until", sa.DateTime(), nullable=False),
        sa.Column("covers_until", sa.DateTime(), nullable=False),
        sa.Column("erased_at", sa.DateTime(), nullable=False),
        sa.Column("erased_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_frame_erasures_camera_since", "frame_erasures", ["camera_id", "since"])


def downgrade() -> None:
    op.drop_index("ix_frame_erasures_camera_since", table_name="frame_erasures")
    op.drop_table("frame_erasures")
