"""The journal: an append-only event store on SQLAlchemy (SQLite by default, PostgreSQL for fleets).

One stream per slot; `(stream, version)` is unique, so two writers appending at the same
version cannot both win (optimistic concurrency). Opening a journal upgrades it to the
newest Alembic revision; a journal written by a newer engine is refused.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from engine.core.events import SCHEMA_VERSION, BaseEvent, Event, parse_event, parse_record
from engine.core.scrub import looks_secret

_E = TypeVar("_E", bound=BaseEvent)

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
)

# Alembic revisions this engine knows, oldest first; a unit test checks them against migrations/.
KNOWN_REVISIONS: Final = ("0001", "0002")
FEED_CHANNEL: Final = "studio_engine_events"  # PostgreSQL NOTIFY channel: a commit happened
SNAPSHOTS_KEPT: Final = 2  # the newest is the one used; one more in case it is unreadable
HEAD_REVISION: Final = KNOWN_REVISIONS[-1]


class JournalError(RuntimeError):
    """Anything wrong with a journal, explained for a human."""


class SchemaTooNew(JournalError):
    pass


class CorruptJournal(JournalError):
    def __init__(self, seq: int, message: str) -> None:
        self.seq = seq
        super().__init__(f"journal event #{seq}: {message}")


class ConcurrencyConflict(JournalError):
    """Another writer appended to this stream first."""


class SecretInPayload(JournalError):
    pass


@dataclass(frozen=True, slots=True)
class Recorded:
    seq: int
    version: int
    at: float
    event: Event


def journal_url(location: str | os.PathLike[str]) -> str:
    """A SQLAlchemy URL from a URL or a plain file path."""
    text = os.fspath(location)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    return text


def _prepare_sqlite_file(url: sa.URL, create: bool) -> None:
    """Create the database file with mode 0600 before SQLite does (it would use the umask)."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not create and not path.is_file():
        raise JournalError(f"no journal at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _check_payload(payload: str) -> None:
    if looks_secret(payload):
        raise SecretInPayload("refusing to journal an event that contains a token-like string")


class Journal:
    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock()
        self._writer: Connection | None = None
        self._insert = events_table.insert()
        self.append_observers: list[Callable[[float], None]] = []  # seconds per append (metrics)

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls, location: str | os.PathLike[str], *, synchronous: str = "FULL", create: bool = True
    ) -> Journal:
        """Open (and upgrade) a journal; with create=False a missing SQLite file is an error."""
        url_text = journal_url(location)
        try:
            url = sa.make_url(url_text)
        except sa.exc.ArgumentError as exc:
            raise JournalError(f"not a journal URL or path: {os.fspath(location)!r}") from exc
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite":
            if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise JournalError(
                    f"synchronous must be OFF/NORMAL/FULL/EXTRA, not {synchronous!r}"
                )
            _prepare_sqlite_file(url, create)
            kwargs["connect_args"] = {"check_same_thread": False}
            if url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = sa.StaticPool
        try:
            engine = sa.create_engine(url, **kwargs)
        except Exception as exc:  # a missing driver, a malformed URL
            raise JournalError(f"cannot open journal {url.render_as_string()}: {exc}") from exc
        if engine.dialect.name == "sqlite":
            _install_sqlite_pragmas(engine, synchronous.upper())
        journal = cls(engine, url.render_as_string(hide_password=True))
        try:
            journal._upgrade()
        except JournalError:
            engine.dispose()
            raise
        except (OperationalError, ProgrammingError) as exc:
            engine.dispose()
            raise JournalError(f"cannot open journal {journal.url}: {exc.orig}") from exc
        return journal

    def _upgrade(self) -> None:
        """Bring the schema to head; refuse a journal from a newer engine."""
        current = self.schema_revision()
        if current == HEAD_REVISION:
            return  # the common case: no Alembic import, no script scan
        if current is not None and current not in KNOWN_REVISIONS:
            raise SchemaTooNew(
                f"journal {self.url} has schema revision {current!r}, newer than this engine "
                f"understands (newest known: {HEAD_REVISION!r}); upgrade studio-engine"
            )
        from alembic import command  # imported only when a migration must run

        with self.engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def schema_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def close(self) -> None:
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self.engine.dispose()

    # --- writing ------------------------------------------------------------------------

    def append(
        self,
        stream: str,
        expected_version: int,
        events: Sequence[BaseEvent],
        snapshot: tuple[int, float, str] | None = None,
    ) -> None:
        """Append `events` after `expected_version` atomically, or raise ConcurrencyConflict.

        `snapshot` = (version, at, state text) is written in the same transaction, so a
        snapshot never exists for events that did not commit.
        """
        rows = []
        for offset, event in enumerate(events, start=1):
            payload = event.model_dump_json()
            _check_payload(payload)
            rows.append(
                {
                    "stream": stream,
                    "version": expected_version + offset,
                    "type": event.type,  # type: ignore[attr-defined]
                    "schema_version": event.schema_version,
                    "at": event.at,
                    "payload": payload,
                    "load_id": event.load_id,
                }
            )
        if not rows:
            return
        started = time.perf_counter()
        with self._write_lock:
            conn = self._writer_connection()
            try:
                with conn.begin():
                    conn.execute(self._insert, rows)
                    if snapshot is not None:
                        self._write_snapshot(conn, stream, *snapshot)
                    if not self.is_sqlite:  # delivered at commit: wakes `studio-engine tail -f`
                        conn.execute(sa.text(f"NOTIFY {FEED_CHANNEL}"))
            except IntegrityError as exc:
                raise ConcurrencyConflict(
                    f"stream {stream!r} moved past version {expected_version} "
                    "(another writer appended first)"
                ) from exc
        for observe in self.append_observers:
            observe(time.perf_counter() - started)

    def save_snapshot(self, stream: str, version: int, at: float, state: str) -> None:
        """Store a snapshot on its own (after an open that replayed a long tail)."""
        with self._write_lock:
            conn = self._writer_connection()
            with conn.begin():
                self._write_snapshot(conn, stream, version, at, state)

    def _write_snapshot(
        self, conn: Connection, stream: str, version: int, at: float, state: str
    ) -> None:
        # Replace one at the same version (a rewrite after a format change), prune old ones.
        conn.execute(
            snapshots_table.delete().where(
                snapshots_table.c.stream == stream, snapshots_table.c.version == version
            )
        )
        conn.execute(
            snapshots_table.insert(),
            {
                "stream": stream,
                "version": version,
                "schema_version": SCHEMA_VERSION,
                "at": at,
                "state": state,
            },
        )
        oldest = conn.execute(
            sa.text(
                "SELECT version FROM snapshots WHERE stream = :stream "
                "ORDER BY version DESC LIMIT 1 OFFSET :skip"
            ),
            {"stream": stream, "skip": SNAPSHOTS_KEPT - 1},
        ).scalar()
        if oldest is not None:
            conn.execute(
                snapshots_table.delete().where(
                    snapshots_table.c.stream == stream, snapshots_table.c.version < oldest
                )
            )

    def _writer_connection(self) -> Connection:
        # One long-lived connection for appends: a pool checkout per append costs more than
        # the insert itself.
        if self._writer is None or self._writer.closed:
            self._writer = self.engine.connect()
        return self._writer

    # --- reading ------------------------------------------------------------------------

    def read_rows(
        self,
        stream: str,
        *,
        after_version: int = 0,
        until_seq: int | None = None,
        until_time: float | None = None,
    ) -> Iterator[tuple[int, int, float, str, str]]:
        """(seq, version, at, type, payload) in stream order, undecoded (the fast path)."""
        sql = (
            "SELECT seq, version, at, type, payload FROM events "
            "WHERE stream = :stream AND version > :after"
        )
        params: dict[str, Any] = {"stream": stream, "after": after_version}
        if until_seq is not None:
            sql += " AND seq <= :until_seq"
            params["until_seq"] = until_seq
        if until_time is not None:
            sql += " AND at <= :until_time"
            params["until_time"] = until_time
        sql += " ORDER BY version"
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=2000).execute(sa.text(sql), params)
            yield from result

    def read_since(
        self, seq: int, *, stream: str | None = None, limit: int = 1000
    ) -> list[tuple[int, str, int, float, str, str]]:
        """(seq, stream, version, at, type, payload) of the rows after `seq`, in seq order:
        every stream (or one), for followers of the journal (the event feed)."""
        sql = "SELECT seq, stream, version, at, type, payload FROM events WHERE seq > :seq"
        params: dict[str, Any] = {"seq": seq, "limit": limit}
        if stream is not None:
            sql += " AND stream = :stream"
            params["stream"] = stream
        sql += " ORDER BY seq LIMIT :limit"
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]

    def seq_before_last(self, count: int, *, stream: str | None = None) -> int:
        """The seq after which the last `count` events (of `stream`, or of all) lie."""
        where = "WHERE stream = :stream " if stream is not None else ""
        sql = f"SELECT seq FROM events {where}ORDER BY seq DESC LIMIT 1 OFFSET :count"
        with self.engine.connect() as conn:
            value = conn.execute(sa.text(sql), {"stream": stream, "count": count}).scalar()
        return int(value or 0)

    def read(self, stream: str, **bounds: Any) -> Iterator[Recorded]:
        """Decoded events; a garbage payload or an event from a newer schema names its seq."""
        for seq, version, at, type_, payload in self.read_rows(stream, **bounds):
            yield Recorded(seq, version, at, decode_row(seq, type_, payload))

    def streams(self) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events_table.c.stream).distinct().order_by("stream"))
            return [row[0] for row in rows]

    def last_version(self, stream: str) -> int:
        with self.engine.connect() as conn:
            query = sa.select(sa.func.max(events_table.c.version)).where(
                events_table.c.stream == stream
            )
            return int(conn.execute(query).scalar() or 0)

    def snapshots(self, stream: str) -> list[tuple[int, int, float, str]]:
        """(version, schema_version, at, state text) of the stored snapshots, newest first."""
        query = (
            sa.select(
                snapshots_table.c.version,
                snapshots_table.c.schema_version,
                snapshots_table.c.at,
                snapshots_table.c.state,
            )
            .where(snapshots_table.c.stream == stream)
            .order_by(snapshots_table.c.version.desc())
        )
        with self.engine.connect() as conn:
            return [(int(v), int(s), float(a), str(t)) for v, s, a, t in conn.execute(query)]

    def event_at(self, stream: str, version: int) -> float | None:
        """The time of the event at `version` (None if there is none): checks a snapshot."""
        query = sa.select(events_table.c.at).where(
            events_table.c.stream == stream, events_table.c.version == version
        )
        with self.engine.connect() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else float(value)


def decode_row(seq: int, type_: str, payload: str) -> Event:
    """A slot's event; every problem is a CorruptJournal naming its seq."""
    return _decode(seq, type_, payload, parse_event)


def decode_record(seq: int, stream: str, type_: str, payload: str) -> BaseEvent:
    """A record of any stream (slots, the hub probe cache, the node), for followers."""
    try:
        return _decode(seq, type_, payload, lambda text: parse_record(stream, text))
    except KeyError:
        raise CorruptJournal(seq, f"stream {stream!r} is unknown to this engine") from None


def _decode(seq: int, type_: str, payload: str, parse: Callable[[str], _E]) -> _E:
    try:
        event = parse(payload)
    except ValidationError as exc:
        newer = _schema_version_of(payload)
        if newer is not None and newer > SCHEMA_VERSION:
            raise CorruptJournal(
                seq,
                f"written with event schema v{newer}, newer than this engine's "
                f"v{SCHEMA_VERSION}; upgrade studio-engine",
            ) from exc
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        where = ".".join(loc[1:] if loc[:1] == [type_] else loc) or "payload"
        raise CorruptJournal(
            seq, f"unreadable {type_!r} payload ({where}: {first['msg']})"
        ) from exc
    if event.schema_version > SCHEMA_VERSION:
        raise CorruptJournal(
            seq,
            f"written with event schema v{event.schema_version}, newer than this engine's "
            f"v{SCHEMA_VERSION}; upgrade studio-engine",
        )
    if getattr(event, "type", None) != type_:
        raise CorruptJournal(
            seq, f"type column says {type_!r} but the payload is {getattr(event, 'type', None)!r}"
        )
    return event


def _schema_version_of(payload: str) -> int | None:
    try:
        value = json.loads(payload).get("schema_version")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _install_sqlite_pragmas(engine: Engine, synchronous: str) -> None:
    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 5000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.close()


def alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("engine.migrations")))
    return config
