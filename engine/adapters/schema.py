"""The journal's tables, as SQLAlchemy Core sees them, and the Alembic revisions that make
them (migrations/ is the only way the schema changes; these definitions mirror its head)."""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

import sqlalchemy as sa

metadata = sa.MetaData()

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("schema_version", sa.SmallInteger, nullable=False),
    sa.Column("at", sa.Float(precision=53), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("load_id", sa.String(64), nullable=True),
    sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
)

snapshots_table = sa.Table(
    "snapshots",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("schema_version", sa.SmallInteger, nullable=False),
    sa.Column("at", sa.Float(precision=53), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
)

# One row per managed slot: which engine holds it (see engine.adapters.lease).
leases_table = sa.Table(
    "leases",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("boot_id", sa.String(64), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("create_time", sa.Float(precision=53), nullable=False),
    sa.Column("acquired_at", sa.Float(precision=53), nullable=False),
    sa.Column("heartbeat_at", sa.Float(precision=53), nullable=False),
    sa.Column("expires_at", sa.Float(precision=53), nullable=False),
    # Migration 0003: None in rows written by an older engine.
    sa.Column("pid_namespace", sa.String(64), nullable=True),
    sa.Column("start_ticks", sa.BigInteger, nullable=True),
)

# The journal's own random id (migration 0003): markers and run folders name it.
identity_table = sa.Table(
    "journal_identity",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
)


# Alembic revisions this engine knows, oldest first; a unit test checks them against migrations/.
KNOWN_REVISIONS: Final = ("0001", "0002", "0003")
HEAD_REVISION: Final = KNOWN_REVISIONS[-1]


def alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("engine.migrations")))
    return config
