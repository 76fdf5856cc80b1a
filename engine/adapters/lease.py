"""Slot leases: one row per slot in the journal database says which engine manages it.

A second engine opening the same journal and slot gets `SlotBusy` naming the holder. A lease
must never outlive its holder for good, so it is taken over when the holder is provably dead:

* same host (hostname and boot id) and same PID namespace: the holder's pid is gone, a
  zombie, or now belongs to a process with other start ticks (create_time for rows without
  them); a different boot id means the host rebooted;
* another host, or another PID namespace of this host (a container with the same hostname):
  its pid cannot be checked here, so the lease expires `ttl` seconds after the last
  heartbeat (a live holder renews it every ttl/3 from a thread).

Times are the database server's clock, so hosts with skewed clocks agree on expiry. Every
write is a single statement, and a takeover is a compare-and-swap on the old holder and its
heartbeat, so two engines racing for a dead lease cannot both win (SQLite and PostgreSQL).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Final

import psutil
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from engine.adapters.journal import Journal
from engine.adapters.process import CREATE_TIME_SLACK, boot_id, start_ticks
from engine.adapters.schema import leases_table
from engine.core.errors import JournalError

log = logging.getLogger("studio-engine")

LEASE_TTL_S: Final = 30.0
_ATTEMPTS: Final = 3


class SlotBusy(JournalError):
    """Another live engine manages this journal's slot."""


@dataclass(frozen=True, slots=True)
class Holder:
    holder: str
    host: str
    boot_id: str
    pid: int
    create_time: float
    pid_namespace: str | None = None
    start_ticks: int | None = None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")[:64]  # e.g. "pid:[4026531836]"
    except OSError:
        return None


def this_process() -> Holder:
    """A fresh holder identity for an engine in this process."""
    return Holder(
        holder=uuid.uuid4().hex,
        host=socket.gethostname()[:255],
        boot_id=boot_id(),
        pid=os.getpid(),
        create_time=psutil.Process().create_time(),
        pid_namespace=_pid_namespace(),
        start_ticks=start_ticks(os.getpid()),
    )


def holder_is_dead(
    host: str,
    boot: str,
    pid: int,
    create_time: float,
    me: Holder,
    pid_namespace: str | None = None,
    ticks: int | None = None,
) -> bool:
    """True only when the holder provably no longer runs (never guesses for another host, or
    for another PID namespace of this one: its pid numbers are not ours)."""
    if host != me.host:
        return False
    if boot != me.boot_id:
        return True  # same host, rebooted since: every process of that boot is gone
    if pid_namespace is not None and pid_namespace != me.pid_namespace:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True  # SIGKILLed, not yet reaped by its parent
        if ticks is not None:
            return start_ticks(pid) != ticks  # pid reused (immune to wall-clock steps)
        return abs(proc.create_time() - create_time) > CREATE_TIME_SLACK  # pid reused
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False  # it exists and is someone else's: assume alive


def db_now(conn: Connection) -> float:
    """Seconds since the epoch on the database server's clock."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        sql = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    elif dialect == "postgresql":
        sql = "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported journals
        import time

        return time.time()
    return float(conn.execute(sa.text(sql)).scalar_one())


class Lease:
    """This engine's claim on one slot; `acquire` it, keep it with `start`, `release` it."""

    def __init__(self, journal: Journal, stream: str, ttl: float = LEASE_TTL_S) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, not {ttl!r}")
        self.journal = journal
        self.stream = stream
        self.ttl = ttl
        self.me = this_process()
        self.lost = False  # set when another engine took the slot over (we were presumed dead)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, journal: Journal, stream: str, ttl: float = LEASE_TTL_S) -> Lease:
        lease = cls(journal, stream, ttl)
        lease._acquire()
        return lease

    def _acquire(self) -> None:
        table = leases_table
        for _ in range(_ATTEMPTS):
            with self.journal.engine.connect() as conn:
                now = db_now(conn)
                row = conn.execute(
                    sa.select(table).where(table.c.stream == self.stream)
                ).one_or_none()
                conn.rollback()
            mine = self._row(now)
            if row is None:
                try:
                    with self.journal.engine.begin() as conn:
                        conn.execute(table.insert().values(stream=self.stream, **mine))
                    return
                except IntegrityError:
                    continue  # someone inserted first: look at who it is
            dead = holder_is_dead(
                row.host,
                row.boot_id,
                row.pid,
                row.create_time,
                self.me,
                row.pid_namespace,
                row.start_ticks,
            )
            expired = row.expires_at < now
            if not (dead or expired):
                raise SlotBusy(
                    f"slot {self.stream!r} of journal {self.journal.url} is managed by another "
                    f"engine (pid {row.pid} on host {row.host!r}, last heartbeat "
                    f"{max(0.0, now - row.heartbeat_at):.1f} s ago); close that engine first. "
                    f"A lease left by a crashed engine on another host expires {self.ttl:.0f} s "
                    "after its last heartbeat"
                )
            with self.journal.engine.begin() as conn:
                taken = conn.execute(
                    table.update()
                    .where(
                        table.c.stream == self.stream,
                        table.c.holder == row.holder,
                        table.c.heartbeat_at == row.heartbeat_at,
                    )
                    .values(**mine)
                ).rowcount
            if taken == 1:
                age = now - row.heartbeat_at
                why = "is dead" if dead else f"has not renewed it for {age:.0f} s"
                log.warning(
                    "slot %r: took over the lease of pid %s on %s, which %s",
                    self.stream,
                    row.pid,
                    row.host,
                    why,
                )
                return
        raise SlotBusy(f"slot {self.stream!r}: lease contended, gave up after {_ATTEMPTS} tries")

    def _row(self, now: float) -> dict[str, object]:
        me = self.me
        return {
            "holder": me.holder,
            "host": me.host,
            "boot_id": me.boot_id,
            "pid": me.pid,
            "create_time": me.create_time,
            "pid_namespace": me.pid_namespace,
            "start_ticks": me.start_ticks,
            "acquired_at": now,
            "heartbeat_at": now,
            "expires_at": now + self.ttl,
        }

    def heartbeat(self) -> bool:
        """Renew the lease; False (and `lost`) when another engine has taken it over."""
        table = leases_table
        with self.journal.engine.begin() as conn:
            now = db_now(conn)
            renewed = conn.execute(
                table.update()
                .where(table.c.stream == self.stream, table.c.holder == self.me.holder)
                .values(heartbeat_at=now, expires_at=now + self.ttl)
            ).rowcount
        if renewed != 1 and not self.lost:
            self.lost = True
            log.error("slot %r: another engine took over this engine's lease", self.stream)
        return renewed == 1

    def start(self) -> None:
        """Renew every ttl/3 from a daemon thread until `release`."""
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.stream}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.heartbeat()
            except Exception:  # a database hiccup: the next beat retries well before expiry
                log.warning("slot %r: lease heartbeat failed", self.stream, exc_info=True)

    def stop(self) -> None:
        """Stop renewing; the row stays, as a crashed holder's would (until it expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        self.stop()
        with self.journal.engine.begin() as conn:
            conn.execute(
                leases_table.delete().where(
                    leases_table.c.stream == self.stream,
                    leases_table.c.holder == self.me.holder,
                )
            )
