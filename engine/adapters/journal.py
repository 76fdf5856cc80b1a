"""The journal: an append-only event store on SQLAlchemy (SQLite by default, PostgreSQL for fleets).

One stream per slot; `(stream, version)` is unique, so two writers appending at the same
version cannot both win (optimistic concurrency). Opening a journal upgrades it to the
newest Alembic revision; a journal written by a newer engine is refused.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from engine.adapters.schema import (
    HEAD_REVISION,
    KNOWN_REVISIONS,
    alembic_config,
    events_table,
    identity_table,
    snapshots_table,
)
from engine.core.codec import EARLIEST_AT, LATEST_AT, decode_row
from engine.core.errors import (
    ConcurrencyConflict,
    CorruptJournal,
    JournalBusy,
    JournalError,
    JournalUnavailable,
    SchemaTooNew,
    SecretInPayload,
)
from engine.core.events import SCHEMA_VERSION, BaseEvent, Event
from engine.core.scrub import looks_secret

FEED_CHANNEL: Final = "studio_engine_events"  # PostgreSQL NOTIFY channel: a commit happened
SNAPSHOTS_KEPT: Final = 2  # the newest is the one used; one more in case it is unreadable
BUSY_TIMEOUT_S: Final = 5.0
# A write refused as transient (SQLite's lock held past the busy timeout, a PostgreSQL
# connection dropped or a lock timeout) is tried this many times in all, with these pauses.
WRITE_ATTEMPTS: Final = 3
WRITE_BACKOFF_S: Final = (0.05, 0.25)


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
        self._writer_syncs = True  # whether the writer's commits fsync now (SQLite)
        self.synchronous = "FULL"  # the level durable appends commit at (SQLite)
        self._insert = events_table.insert()
        self.append_observers: list[Callable[[float], None]] = []  # seconds per append (metrics)
        self.identity: str | None = None
        self.read_only = False
        self.busy_timeout = BUSY_TIMEOUT_S

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        create: bool = True,
        read_only: bool = False,
        busy_timeout: float = BUSY_TIMEOUT_S,
    ) -> Journal:
        """Open (and upgrade) a journal; with create=False a missing SQLite file is an error.

        `read_only=True` (replay, verify, postmortem) opens a SQLite file with `mode=ro`, never
        migrates and never writes: an older schema is read as it is. Anything unreadable is a
        `JournalError` (one line naming the journal), a lock held past `busy_timeout` at open
        is `JournalBusy`.
        """
        url_text = journal_url(location)
        try:
            url = sa.make_url(url_text)
        except sa.exc.ArgumentError as exc:
            raise JournalError(f"not a journal URL or path: {os.fspath(location)!r}") from exc
        if busy_timeout < 0:
            raise JournalError(f"busy_timeout must be >= 0 seconds, not {busy_timeout!r}")
        kwargs: dict[str, Any] = {}
        shown = url.render_as_string(hide_password=True)
        if url.get_backend_name() == "sqlite":
            if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise JournalError(
                    f"synchronous must be OFF/NORMAL/FULL/EXTRA, not {synchronous!r}"
                )
            if url.database not in (None, "", ":memory:") and not url.database.startswith("file:"):
                # One file, one spelling: a relative `sqlite:///studio.db` names the file in
                # the folder it was opened from, for good (run folders sit beside it).
                url = url.set(database=str(Path(url.database).expanduser().resolve()))
                shown = url.render_as_string(hide_password=True)
            _prepare_sqlite_file(url, create and not read_only)
            kwargs["connect_args"] = {"check_same_thread": False}
            if url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = sa.StaticPool
            elif read_only and not url.database.startswith("file:"):
                # SQLite's own read-only mode: no write, no WAL switch, no migration can
                # happen even by mistake, and a chmod 0400 copy opens.
                url = url.set(database=f"file:{url.database}", query={"mode": "ro", "uri": "true"})
        elif url.get_backend_name() == "postgresql":
            # The PostgreSQL analogue of SQLite's busy timeout: wait this long for a lock.
            timeout_ms = int(busy_timeout * 1000)
            kwargs["connect_args"] = {"options": f"-c lock_timeout={timeout_ms}"}
        try:
            engine = sa.create_engine(url, **kwargs)
        except Exception as exc:  # a missing driver, a malformed URL
            raise JournalError(f"cannot open journal {shown}: {exc}") from exc
        if engine.dialect.name == "sqlite":
            _install_sqlite_pragmas(engine, synchronous.upper(), busy_timeout, read_only)
        journal = cls(engine, shown)
        journal.read_only = read_only
        journal.busy_timeout = busy_timeout
        journal.synchronous = synchronous.upper()
        try:
            with journal.guard("open"):
                if read_only:
                    journal._check_readable()
                else:
                    journal._upgrade()
                journal.identity = journal._read_identity()
        except BaseException:
            engine.dispose()
            raise
        return journal

    @contextmanager
    def guard(self, doing: str) -> Iterator[None]:
        """Turn a database error into one line naming this journal (never the SQL)."""
        try:
            yield
        except DBAPIError as exc:
            raise self.explain(exc, doing) from exc
        except RecursionError as exc:
            raise JournalError(f"journal {self.url}: {doing}: data nested too deeply") from exc
        except UnicodeError as exc:  # the driver met text that is not UTF-8: a damaged file
            raise JournalError(
                f"journal {self.url} is not a readable database ({doing}: text that is not UTF-8)"
            ) from exc

    def explain(self, exc: DBAPIError, doing: str) -> JournalError | JournalBusy:
        cause = _cause(exc)
        if _is_locked(exc):
            return JournalBusy(
                f"journal {self.url} is locked by another connection "
                f"(still {cause!r} after {self.busy_timeout:g} s); {doing} gave up"
            )
        if "not a database" in cause or "malformed" in cause:
            return JournalError(f"journal {self.url} is not a readable database ({cause})")
        if "no such table" in cause or "does not exist" in cause:
            return JournalError(f"journal {self.url} is not a studio-engine journal ({cause})")
        return JournalError(f"journal {self.url}: {doing} failed: {cause}")

    def _check_readable(self) -> None:
        """A read-only open: refuse what cannot be read, read an older schema as it is."""
        current = self.schema_revision()
        if current is not None and current not in KNOWN_REVISIONS:
            raise SchemaTooNew(
                f"journal {self.url} has schema revision {current!r}, newer than this engine "
                f"understands (newest known: {HEAD_REVISION!r}); upgrade studio-engine"
            )
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("events"):
                raise JournalError(
                    f"journal {self.url} is not a studio-engine journal (no events table); "
                    "if it is one from an older engine, run `studio-engine db upgrade`"
                )

    def _read_identity(self) -> str | None:
        """The journal's random id (None for a pre-0003 journal opened read-only)."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("journal_identity"):
                return None
            return conn.execute(sa.select(identity_table.c.id)).scalar()

    def _upgrade(self) -> None:
        """Bring the schema to head; refuse a journal from a newer engine, and a database
        that is something else (never add our tables to another application's file)."""
        with self.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            current = (
                conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
                if "alembic_version" in tables
                else None
            )
        if (current is None and tables) or (current is not None and "events" not in tables):
            raise JournalError(
                f"journal {self.url} is not a studio-engine journal "
                f"(tables: {', '.join(sorted(tables)) or 'none'}; no events table or no schema "
                "revision); refusing to write to it"
            )
        if self.is_sqlite:
            with self.engine.connect() as conn:  # persistent in the file: a no-op once set
                if conn.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal":
                    conn.exec_driver_sql("PRAGMA journal_mode = WAL")
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
        with self.guard("reading the schema revision"), self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def close(self) -> None:
        with self._write_lock:
            self._drop_writers()
        self.engine.dispose()

    def _drop_writers(self) -> None:
        conn = self._writer
        if conn is not None and not conn.closed:
            with suppress(DBAPIError):  # never back into the pool: it may be synchronous=OFF
                conn.invalidate()
        self._writer = None

    # --- writing ------------------------------------------------------------------------

    def append(
        self,
        stream: str,
        expected_version: int,
        events: Sequence[BaseEvent],
        snapshot: tuple[int, float, str] | None = None,
        *,
        durable: bool = True,
    ) -> None:
        """Append `events` after `expected_version` atomically, or raise ConcurrencyConflict.

        `snapshot` = (version, at, state text) is written in the same transaction, so a
        snapshot never exists for events that did not commit.

        `durable=False` (events that change no process: a short-circuit, a join) commits
        without waiting for fsync (SQLite: `synchronous=OFF` for that commit; PostgreSQL:
        `SET LOCAL synchronous_commit = off`). It is still ordered: SQLite in WAL mode appends
        every commit to one log in commit order, and the next durable commit syncs the log up
        to its end (so the earlier frames too); PostgreSQL's WAL flush works the same way. A
        power cut can lose only such a tail of events, never a gap.

        A transient refusal (lock held past the busy timeout, a dropped connection) is
        retried with backoff; a lasting one raises `JournalUnavailable` naming the cause.
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

        def write(conn: Connection) -> None:
            if not durable and conn.dialect.name == "postgresql":
                conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
            conn.execute(self._insert, rows)
            if snapshot is not None:
                self._write_snapshot(conn, stream, *snapshot)
            if not self.is_sqlite:  # delivered at commit: wakes `studio-engine tail -f`
                conn.execute(sa.text(f"NOTIFY {FEED_CHANNEL}"))

        try:
            self._write(write, durable=durable)
        except IntegrityError as exc:
            raise ConcurrencyConflict(
                f"stream {stream!r} moved past version {expected_version} "
                "(another writer appended first)"
            ) from exc
        for observe in self.append_observers:
            observe(time.perf_counter() - started)

    def save_snapshot(self, stream: str, version: int, at: float, state: str) -> None:
        """Store a snapshot on its own (after an open that replayed a long tail)."""
        self._write(lambda conn: self._write_snapshot(conn, stream, version, at, state))

    def _write(self, work: Callable[[Connection], None], *, durable: bool = True) -> None:
        """Run `work` in one write transaction, retrying transient refusals (see `append`)."""
        with self._write_lock:
            for attempt in range(WRITE_ATTEMPTS):
                try:
                    conn = self._writer_connection(durable)  # connecting can fail too
                    with conn.begin():
                        work(conn)
                    return
                except IntegrityError:
                    raise
                except DBAPIError as exc:
                    self._drop_writers()  # a failed connection is never reused
                    cause = _cause(exc)
                    if not (_is_locked(exc) or exc.connection_invalidated):
                        raise JournalUnavailable(
                            f"journal {self.url} refused a write: {cause}"
                        ) from exc
                    if attempt + 1 == WRITE_ATTEMPTS:
                        raise JournalUnavailable(
                            f"journal {self.url} refused a write {WRITE_ATTEMPTS} times "
                            f"(last: {cause})"
                        ) from exc
                    time.sleep(WRITE_BACKOFF_S[min(attempt, len(WRITE_BACKOFF_S) - 1)])

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

    def _writer_connection(self, durable: bool = True) -> Connection:
        # One long-lived connection for appends: a pool checkout per append costs more than
        # the insert itself.
        if self._writer is None or self._writer.closed:
            self._writer = self.engine.connect()
            self._writer_syncs = True
        if self.is_sqlite and durable != self._writer_syncs:
            # SQLite has no per-transaction `synchronous`, but it reads the connection's
            # setting at each commit: switching it between two transactions of the one writer
            # connection gives exactly that (a second connection would do too, but every
            # switch between two writers costs a page-cache reload, ~0.3 ms).
            level = self.synchronous if durable else "OFF"
            self._writer.exec_driver_sql(f"PRAGMA synchronous = {level}")
            self._writer.commit()
            self._writer_syncs = durable
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
        with self.guard("reading events"), self.engine.connect() as conn:
            result = conn.execution_options(yield_per=2000).execute(sa.text(sql), params)
            for row in result:
                seq, _version, at, _type, _payload = row
                if not isinstance(at, float | int) or not EARLIEST_AT <= at <= LATEST_AT:
                    raise CorruptJournal(seq, f"event time {str(at)[:40]!r} is not a valid time")
                yield row

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
        with self.guard("listing slots"), self.engine.connect() as conn:
            rows = conn.execute(sa.select(events_table.c.stream).distinct().order_by("stream"))
            found = [row[0] for row in rows]
        if not all(isinstance(stream, str) for stream in found):
            raise JournalError(f"journal {self.url} is damaged: an event names no slot")
        return found

    def last_version(self, stream: str) -> int:
        with self.guard("reading events"), self.engine.connect() as conn:
            query = sa.select(sa.func.max(events_table.c.version)).where(
                events_table.c.stream == stream
            )
            value = conn.execute(query).scalar()
        if value is not None and not isinstance(value, int):
            raise JournalError(f"journal {self.url} is damaged: version {value!r} is no number")
        return int(value or 0)

    def snapshots(self, stream: str) -> list[tuple[int, int, float, str]]:
        """(version, schema_version, at, state text) of the stored snapshots, newest first.
        A snapshot is only a cache: a row that does not even convert is no snapshot."""
        sql = sa.text(
            "SELECT version, schema_version, at, state FROM snapshots "
            "WHERE stream = :stream ORDER BY version DESC"
        )
        found = []
        with self.guard("reading snapshots"), self.engine.connect() as conn:
            for version, schema, at, state in conn.execute(sql, {"stream": stream}):
                try:
                    found.append((int(version), int(schema), float(at), str(state)))
                except (TypeError, ValueError):
                    continue
        return found

    def event_at(self, stream: str, version: int) -> float | None:
        """The time of the event at `version` (None if there is none, or if it is no time):
        checks a snapshot."""
        sql = sa.text("SELECT at FROM events WHERE stream = :stream AND version = :version")
        with self.guard("reading events"), self.engine.connect() as conn:
            value = conn.execute(sql, {"stream": stream, "version": version}).scalar()
        try:
            return None if value is None else float(value)
        except (TypeError, ValueError):
            return None


def _cause(exc: DBAPIError) -> str:
    """The driver's own first line (never the statement or its parameters)."""
    text = str(exc.orig).strip().splitlines()
    return text[0] if text else type(exc.orig).__name__


def _is_locked(exc: DBAPIError) -> bool:
    cause = _cause(exc).lower()
    return "database is locked" in cause or "lock timeout" in cause or "is busy" in cause


def _install_sqlite_pragmas(
    engine: Engine, synchronous: str, busy_timeout: float, read_only: bool
) -> None:
    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if not read_only:  # (WAL mode is set once, by _upgrade, after the file proved ours)
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.close()
