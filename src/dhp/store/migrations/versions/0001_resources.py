"""resources, history, counters, installed packages

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = ("core",)
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("type", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("patient", sa.String(64), nullable=True),
        sa.Column("package", sa.String(200), nullable=True),
        sa.Column("content", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_resources_type_updated", "resources", ["type", "last_updated"])
    op.create_index("ix_resources_patient", "resources", ["patient"])
    op.create_table(
        "history",
        sa.Column("seq", BigId, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("type", "id", "version", name="uq_history_version"),
    )
    op.create_index("ix_history_updated", "history", ["last_updated"])
    op.create_index("ix_history_type_seq", "history", ["type", "seq"])
    op.create_index("ix_history_type_id_seq", "history", ["type", "id", "seq"])
    op.create_table(
        "counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "installed_packages",
        sa.Column("ref", sa.String(200), primary_key=True),
        sa.Column("installed_at", sa.BigInteger, nullable=False),
        sa.Column("resources", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("installed_packages")
    op.drop_table("counters")
    op.drop_table("history")
    op.drop_table("resources")
