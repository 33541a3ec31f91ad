"""clinical documents: the submitted bytes, identity, life cycle, split map

Revision ID: 0700_documents
Revises:
Depends on: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0700_documents"
down_revision = None
branch_labels = ("documents",)
depends_on = "0001"


def upgrade() -> None:
    op.create_table(
        "documents",
        sa.Column("bundle_id", sa.String(64), primary_key=True),
        sa.Column("identifier_system", sa.String(512), nullable=False),
        sa.Column("identifier_value", sa.String(512), nullable=False),
        sa.Column("composition_key", sa.String(1100), nullable=True),
        sa.Column("composition_id", sa.String(64), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("current", sa.Boolean, nullable=False),
        sa.Column("replaces", sa.String(64), nullable=True),
        sa.Column("docref_id", sa.String(64), nullable=True),
        sa.Column("patient", sa.String(64), nullable=True),
        sa.Column("canonical_sha256", sa.String(64), nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("source", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("identifier_system", "identifier_value", name="uq_documents_identifier"),
    )
    op.create_index("ix_documents_composition", "documents", ["composition_key", "current"])
    # At most one current version per Composition.identifier, even when two versions race.
    op.create_index("uq_documents_current", "documents", ["composition_key"], unique=True,
                    sqlite_where=sa.text('"current"'), postgresql_where=sa.text('"current"'))
    op.create_table(
        "document_resources",
        sa.Column("bundle_id", sa.String(64), primary_key=True),
        sa.Column("full_url", sa.String(1000), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("created", sa.Boolean, nullable=False),
    )
    op.create_index("ix_document_resources_target", "document_resources", ["type", "id"])


def downgrade() -> None:
    op.drop_table("document_resources")
    op.drop_table("documents")
