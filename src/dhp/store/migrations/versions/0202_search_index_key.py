"""resources.index_key: which extraction wrote a resource's search index rows

An update whose parameters and extraction code are those that indexed the current version rewrites only the
index rows that changed; any other update replaces them all. Existing rows start unknown (NULL).

Revision ID: 0202_search_index_key
Revises: 0201_search_partial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0202_search_index_key"
down_revision = "0201_search_partial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("resources", sa.Column("index_key", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("index_key")
