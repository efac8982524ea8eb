"""Alembic revisions of the gateway database, oldest first (``NNNN_what_it_does.py``)."""
