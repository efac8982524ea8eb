"""Heartbeats indexed by when the gateway received them, per camera.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28

One new index, nothing else changes: ``ix_heartbeats_camera_received`` on
``heartbeats (camera_id, received_at)``. A camera's latest heartbeat is the one the gateway
received last (``fleet.metrics.latest_heartbeat``), not the one with the greatest ``sent_at``
(the agent's clock, accepted up to a day ahead); ``/metrics`` and the rollout's input shapes
read it for every camera, so it must be one index lookup however many heartbeats retention
keeps. A downgrade drops the index.
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_heartbeats_camera_received", "heartbeats", ["camera_id", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_heartbeats_camera_received", table_name="heartbeats")
