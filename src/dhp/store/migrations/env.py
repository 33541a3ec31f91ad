"""Alembic environment: runs on a connection handed over by ``dhp.store.migrate``."""

from __future__ import annotations

from alembic import context

from dhp.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through dhp.store.migrate (dhp db upgrade)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
