"""drop two indexes no query reads

``ix_resources_patient`` (the patient compartment key) serves no query: compartment search reads the search
index rows. ``ix_history_type_id_seq`` duplicates ``uq_history_version`` for instance history, which lists an
instance's versions by version number (the same order as by seq: one resource's versions are written one at
a time). Each cost every write an index insert, on a page of its own for the patient key.

Revision ID: 0002_unread_indexes
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002_unread_indexes"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_resources_patient", table_name="resources")
    op.drop_index("ix_history_type_id_seq", table_name="history")


def downgrade() -> None:
    op.create_index("ix_history_type_id_seq", "history", ["type", "id", "seq"])
    op.create_index("ix_resources_patient", "resources", ["patient"])
