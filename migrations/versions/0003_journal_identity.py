"""Journal identity: a random id stored in the database, read at open; lease holders
identified by (host, boot id, pid namespace, pid + start ticks).

Markers and run folders name the journal by this id, so two files spelled alike
(`sqlite:///studio.db` in two folders) never take each other for the same journal, and one
file spelled two ways is one journal. Two containers with one hostname (two PID namespaces)
no longer read each other's pids; a holder's start ticks survive wall-clock steps.

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
    with op.batch_alter_table("leases") as leases:
        leases.add_column(sa.Column("pid_namespace", sa.String(64), nullable=True))
        leases.add_column(sa.Column("start_ticks", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases") as leases:
        leases.drop_column("start_ticks")
        leases.drop_column("pid_namespace")
    op.drop_table("journal_identity")
