"""Alembic environment of the gateway database, run by ``fleet.migrations.runner``.

The runner hands over an open connection inside a transaction that already holds the
migration lock (``config.attributes["connection"]``); there is no ``alembic.ini`` and no
offline (``--sql``) mode: revision 0001 looks at what exists before creating it.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from fleet.db import Base, UTCDateTime
from fleet.migrations.runner import VERSION_TABLE, include_name


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """New revisions stay self-contained: a model's ``UTCDateTime`` is written as what it
    stores, ``sa.DateTime()``, not as an import of ``fleet.db``."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "fleet migrations run through fleet.migrations (`python -m fleet db upgrade`), "
        "not the alembic command line"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_name=include_name,
    compare_type=True,
    transactional_ddl=True,  # on SQLite too: the runner's transaction holds every statement
    render_item=render_item,
    # New revisions alter tables in batch mode: a plain ALTER where the database can, a table
    # rebuild on SQLite where it cannot (the runner lets SQLite rebuild referenced tables).
    render_as_batch=True,
)
with context.begin_transaction():  # a no-op: the runner's transaction is the one that counts
    context.run_migrations()
