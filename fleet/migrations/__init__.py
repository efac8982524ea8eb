"""Schema migrations (Alembic) of the gateway database.

The gateway upgrades its database to head before serving (``Gateway.prepare_storage``), and
``python -m fleet db upgrade`` / ``roadloop gateway db upgrade`` do it by hand; ``db current``
and ``db check`` say where a database stands. See docs/fleet-api.md, "Storage".

Changing a model in ``fleet/db.py`` needs a revision, or tests/test_fleet_migrations.py
fails (the migrated schema must match the models on SQLite and PostgreSQL):
``python -m fleet db revision -m "what changes"`` writes ``versions/NNNN_what_changes.py``
from the difference; read it, make it work on both databases, and keep it self-contained
(plain ``sqlalchemy`` types and ``sa.table`` stand-ins, never the models, which move on).
"""

from fleet.migrations.runner import (
    VERSION_TABLE,
    MigrationError,
    MigrationResult,
    SchemaStatus,
    head_revision,
    new_revision,
    status,
    upgrade,
)

__all__ = [
    "VERSION_TABLE",
    "MigrationError",
    "MigrationResult",
    "SchemaStatus",
    "head_revision",
    "new_revision",
    "status",
    "upgrade",
]
