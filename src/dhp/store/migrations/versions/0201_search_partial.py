"""search_reference: the canonical-url and identifier indexes hold only the rows that have one

Most references are literal (``Patient/123``): their ``url`` and ``ivalue`` are NULL, and indexing those NULLs
cost every reference row two index inserts that no search can use.

Revision ID: 0201_search_partial
Revises: 0200_search
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0201_search_partial"
down_revision = "0200_search"
branch_labels = None
depends_on = None

_INDEXES = {"ix_search_reference_2": "url", "ix_search_reference_3": "ivalue"}


def upgrade() -> None:
    for name, col in _INDEXES.items():
        op.drop_index(name, "search_reference")
        where = sa.text(f"{col} IS NOT NULL")
        op.create_index(name, "search_reference", ["type", "code", col], postgresql_where=where,
                        sqlite_where=where)


def downgrade() -> None:
    for name, col in _INDEXES.items():
        op.drop_index(name, "search_reference")
        op.create_index(name, "search_reference", ["type", "code", col])
