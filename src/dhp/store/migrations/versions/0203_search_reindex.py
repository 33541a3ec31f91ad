"""search_reindex: open reindex jobs, seen by every process

A SearchParameter change records its job in the same transaction; the job stays open until the existing
resources of its types are reindexed. Searches on its parameters warn meanwhile, in every process, and a job
whose process stopped renewing its heartbeat is taken over by another.

Revision ID: 0203_search_reindex
Revises: 0202_search_index_key
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0203_search_reindex"
down_revision = "0202_search_index_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "search_reindex",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("types", sa.Text, nullable=False),
        sa.Column("codes", sa.Text, nullable=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("heartbeat", sa.BigInteger, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("finished", sa.BigInteger, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("search_reindex")
