"""Journal identity: a random id stored in the database, read at open.

Markers, run folders and leases name the journal by this id, so two files spelled alike
(`sqlite:///studio.db` in two folders) never take each other for the same journal, and one
file spelled two ways is one journal.

Revision ID: 0003
Revises: 0002
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "journal_identity",
        sa.Column("id", sa.String(32), primary_key=True),
    )
    op.bulk_insert(table, [{"id": uuid.uuid4().hex[:16]}])


def downgrade() -> None:
    op.drop_table("journal_identity")
