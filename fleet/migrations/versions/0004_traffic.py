"""Traffic analytics: interval records and their rows by line, zone and event.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

Four new tables, nothing existing changes (``fleet.traffic`` is the API over them):

* ``traffic_intervals`` — one row per interval record as an agent posted it (``document``),
  keyed by its ``record_id`` so a resend is refused (409) rather than counted twice.
* ``traffic_line_counts``, ``traffic_zone_stats``, ``traffic_events`` — the record's rows,
  written in the same transaction, indexed by ``(camera_id, interval_start)`` (events by
  ``(camera_id, at)``) so the query routes filter in SQL.

Older gateways never wrote these tables, so there is no data to move; a downgrade drops them
(and every stored traffic record).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Integer on SQLite so the primary key aliases ROWID (autoincrement); BIGINT elsewhere.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _child(name: str, *columns: sa.Column, time_column: str = "interval_start") -> None:
    op.create_table(
        name,
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("record_id", sa.String(length=128), nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("interval_start", sa.DateTime(), nullable=False),
        *columns,
        sa.ForeignKeyConstraint(["record_id"], ["traffic_intervals.record_id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(f"ix_{name}_record_id", name, ["record_id"])
    suffix = "start" if time_column == "interval_start" else time_column
    op.create_index(f"ix_{name}_camera_{suffix}", name, ["camera_id", time_column])


def upgrade() -> None:
    op.create_table(
        "traffic_intervals",
        sa.Column("record_id", sa.String(length=128), nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("interval_start", sa.DateTime(), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("covered_s", sa.Float(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("config_version", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("record_id"),
    )
    op.create_index("ix_traffic_intervals_interval_start", "traffic_intervals",
                    ["interval_start"])
    op.create_index("ix_traffic_intervals_camera_start", "traffic_intervals",
                    ["camera_id", "interval_start"])
    _child(
        "traffic_line_counts",
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("line", sa.String(length=64), nullable=False),
        sa.Column("direction", sa.String(length=64), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("pcu", sa.Float(), nullable=False),
        sa.Column("speeds_kmh", sa.JSON(), nullable=False),
    )
    _child(
        "traffic_zone_stats",
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("covered_s", sa.Float(), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
    )
    _child(
        "traffic_events",
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=True),
        sa.Column("line", sa.String(length=64), nullable=True),
        sa.Column("event", sa.JSON(), nullable=False),
        time_column="at",
    )


def downgrade() -> None:
    for name in ("traffic_events", "traffic_zone_stats", "traffic_line_counts",
                 "traffic_intervals"):
        op.drop_table(name)
