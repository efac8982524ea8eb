"""Baseline: the schema of every gateway released before migrations.

Revision ID: 0001
Revises: -
Create Date: 2026-11-26

Exactly what ``Base.metadata.create_all`` made before the one-live-device index (fleet/db.py
at the parent of commit 1c8ade1), frozen here: plain ``sa`` types, never the models'.

Adopting a database made before migrations (it has gateway tables but no version table):
those gateways ran ``create_all`` at every start, which creates the tables that are missing
and leaves the others alone. This revision does the same — it creates only the tables that
do not exist yet (a first-release database lacks ``model_manifests`` and ``rollouts``) — so
any earlier database converges on the baseline without anything being re-created.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

logger = logging.getLogger("fleet.migrations")

# Integer on SQLite so the primary key aliases ROWID (autoincrement); BIGINT elsewhere.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _audit_log() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("token_id", BIG_ID, nullable=True),
        sa.Column("client", sa.String(length=100), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_device_id", "audit_log", ["device_id"])


def _devices() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("scopes", sa.String(length=200), nullable=False),
        sa.Column("agent_version", sa.String(length=100), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=True),
        sa.Column("enrolled_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index("ix_devices_camera_id", "devices", ["camera_id"])


def _frames() -> None:
    op.create_table(
        "frames",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("frame_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("captured_at", sa.DateTime(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("importance", sa.Float(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("n_detections", sa.Integer(), nullable=False),
        sa.Column("recovered", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("camera_id", "frame_id", name="uq_frames_camera_frame"),
    )
    op.create_index("ix_frames_captured_at", "frames", ["captured_at"])
    op.create_index("ix_frames_device_id", "frames", ["device_id"])


def _gateway_state() -> None:
    op.create_table(
        "gateway_state",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def _heartbeats() -> None:
    op.create_table(
        "heartbeats",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("errors", sa.Integer(), nullable=True),
        sa.Column("dropped_frames", sa.Integer(), nullable=True),
        sa.Column("outbox_depth", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "sent_at", name="uq_heartbeats_device_sent"),
    )
    op.create_index("ix_heartbeats_camera_sent", "heartbeats", ["camera_id", "sent_at"])


def _model_manifests() -> None:
    op.create_table(
        "model_manifests",
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("rollout_id", sa.String(length=100), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(), nullable=False),
        sa.Column("published_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("manifest_sha256"),
    )
    op.create_index("ix_model_manifests_file_sha256", "model_manifests", ["file_sha256"])
    op.create_index("ix_model_manifests_model_version", "model_manifests", ["model_version"])
    op.create_index("ix_model_manifests_published_at", "model_manifests", ["published_at"])


def _rollouts() -> None:
    op.create_table(
        "rollouts",
        sa.Column("rollout_id", sa.String(length=100), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("stage_started_at", sa.DateTime(), nullable=False),
        sa.Column("cohort_threshold", sa.Float(), nullable=False),
        sa.Column("hold_seconds", sa.Float(), nullable=False),
        sa.Column("budgets", sa.JSON(), nullable=False),
        sa.Column("previous_model_version", sa.String(length=200), nullable=True),
        sa.Column("previous_manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("health", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["manifest_sha256"], ["model_manifests.manifest_sha256"]),
        sa.PrimaryKeyConstraint("rollout_id"),
    )
    op.create_index("ix_rollouts_created_at", "rollouts", ["created_at"])
    op.create_index("ix_rollouts_status", "rollouts", ["status"])


def _tokens() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("scopes", sa.String(length=200), nullable=False),
        sa.Column("camera_id", sa.String(length=64), nullable=True),
        sa.Column("require_verification", sa.Boolean(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("parent_id", BIG_ID, nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tokens_device_id", "tokens", ["device_id"])
    op.create_index("ix_tokens_token_hash", "tokens", ["token_hash"], unique=True)


# In dependency order: a table comes after the tables its foreign keys point at.
TABLES: dict[str, Callable[[], None]] = {
    "audit_log": _audit_log,
    "devices": _devices,
    "frames": _frames,
    "gateway_state": _gateway_state,
    "heartbeats": _heartbeats,
    "model_manifests": _model_manifests,
    "rollouts": _rollouts,
    "tokens": _tokens,
}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    missing = [name for name in TABLES if name not in existing]
    if existing & TABLES.keys():
        logger.warning("adopting a gateway database made before migrations: it has %s; "
                       "creating %s", sorted(existing & TABLES.keys()), missing or "nothing")
    for name in missing:
        TABLES[name]()


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
