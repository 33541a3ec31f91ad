"""The migrations build exactly the schema the code declares, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import dhp.store.auth
import dhp.store.documents
import dhp.store.search  # noqa: F401  (their tables join the shared metadata)
from dhp.store import Store
from dhp.store.schema import metadata

#: Declared in the migration only: PostgreSQL's trigram index for string :contains (no SQLite counterpart).
PG_ONLY = {"ix_search_string_trgm"}


def _differences(conn: Any) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": False})
    return list(compare_metadata(ctx, metadata))


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_migrated_schema_matches_the_declared_tables(backend: str, new_db_url: Callable[[str], str]) -> None:
    async def run() -> list[Any]:
        store = Store(new_db_url(backend))
        await store.open()
        try:
            async with store.engine.connect() as conn:
                return await conn.run_sync(_differences)
        finally:
            await store.close()

    diffs = asyncio.run(run())
    unexpected = [d for d in diffs
                  if not (backend == "pg" and d[0] == "remove_index" and d[1].name in PG_ONLY)]
    assert unexpected == []
    # Indexes no query reads cost every write: they stay dropped.
    names = {ix.name for t in metadata.tables.values() for ix in t.indexes}
    assert not names & {"ix_resources_patient", "ix_history_type_id_seq"}
