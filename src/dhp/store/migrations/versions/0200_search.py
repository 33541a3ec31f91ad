"""search index tables (one per value kind)

Revision ID: 0200_search
Revises:
Depends on: 0001
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0200_search"
down_revision = None
branch_labels = ("search",)
depends_on = "0001"


def _key(name: str, length: int = 512) -> sa.Column[Any]:
    return sa.Column(name, sa.String(length), nullable=True)


TABLES: dict[str, tuple[list[sa.Column[Any]], list[tuple[str, ...]]]] = {
    "string": ([_key("value", 255), _key("exact", 1000)], [("type", "code", "value", "id")]),
    "token": ([_key("system"), _key("value"), _key("text", 255), _key("tsystem"), _key("tcode")],
              [("type", "code", "value", "system", "id")]),
    "reference": ([_key("target_type", 64), _key("target_id", 64), _key("url"), _key("version"), _key("isystem"),
                   _key("ivalue")],
                  [("type", "code", "target_type", "target_id", "id"), ("target_type", "target_id"),
                   ("type", "code", "url"), ("type", "code", "ivalue")]),
    "date": ([sa.Column("low", sa.BigInteger, nullable=False), sa.Column("high", sa.BigInteger, nullable=False)],
             [("type", "code", "low", "high", "id"), ("type", "code", "high", "id")]),
    "number": ([sa.Column("low", sa.Float, nullable=False), sa.Column("high", sa.Float, nullable=False)],
               [("type", "code", "low", "id")]),
    "quantity": ([sa.Column("low", sa.Float, nullable=False), sa.Column("high", sa.Float, nullable=False),
                  _key("system"), _key("unit_code"), _key("unit")], [("type", "code", "low", "id")]),
    "uri": ([_key("value")], [("type", "code", "value", "id")]),
    "composite": ([c for i in (1, 2, 3) for c in (_key(f"s{i}"), _key(f"v{i}"), sa.Column(f"lo{i}", sa.Float),
                                                  sa.Column(f"hi{i}", sa.Float))],
                  [("type", "code", "v1", "v2")]),
    "near": ([sa.Column("lat", sa.Float, nullable=False), sa.Column("lon", sa.Float, nullable=False)],
             [("type", "code", "lat", "lon")]),
}


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    for kind, (cols, indexes) in TABLES.items():
        name = f"search_{kind}"
        op.create_table(
            name,
            sa.Column("type", sa.String(64), nullable=False),
            sa.Column("id", sa.String(64), nullable=False),
            sa.Column("code", sa.String(100), nullable=False),
            *cols,
        )
        op.create_index(f"ix_{name}_res", name, ["type", "id"])
        for i, ix in enumerate(indexes):
            kw: dict[str, Any] = {}
            if pg and kind in ("string", "uri") and i == 0:
                # Prefix search is LIKE 'abc%': needs pattern operators under any database collation.
                kw["postgresql_ops"] = {"value": "varchar_pattern_ops"}
            op.create_index(f"ix_{name}_{i}", name, list(ix), **kw)
    if pg:
        for kind in TABLES:
            # (type, code) are strongly correlated (birthdate only on Patient): without these statistics the
            # planner multiplies their selectivities, expects a handful of rows and picks nested loops.
            op.execute(f"CREATE STATISTICS st_search_{kind}_type_code (dependencies, mcv) "
                       f"ON type, code FROM search_{kind}")
        # Common codes ("gender=male", "status=final") are most of their parameter's rows: say so.
        op.execute("CREATE STATISTICS st_search_token_tcv (mcv) ON type, code, value FROM search_token")
        have = bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")).first()
        if have:
            # :contains on names: a trigram index turns a scan into an index lookup.
            op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            op.execute("CREATE INDEX ix_search_string_trgm ON search_string USING gin (value gin_trgm_ops)")


def downgrade() -> None:
    for kind in TABLES:
        op.drop_table(f"search_{kind}")
