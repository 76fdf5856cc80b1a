"""Follow a journal as it grows: every appended event, in commit order, across processes.

SQLite: poll by sequence number (an indexed range scan, well under a millisecond when nothing
is new). PostgreSQL: `LISTEN` on the channel every append `NOTIFY`s at commit, so a follower
wakes at once; the poll stays as the fallback.

Sequence numbers are handed out at insert, not at commit. On PostgreSQL two appends can commit
out of seq order, so a follower that skipped past a gap would miss the slower append for good.
A gap is therefore held back until it fills, or until GAP_TIMEOUT_S shows it was an append
that rolled back (a ConcurrencyConflict consumes a seq and never commits). SQLite serializes
writers and reuses a rolled-back rowid: there seq order is commit order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from engine.adapters.journal import FEED_CHANNEL, Journal
from engine.core.codec import decode_record
from engine.core.events import BaseEvent

POLL_S: Final = 0.1
GAP_TIMEOUT_S: Final = 2.0


class Stop(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class _Either:
    """Set when either event is: the caller stopped iterating, or the owner closed."""

    first: threading.Event
    second: threading.Event

    def is_set(self) -> bool:
        return self.first.is_set() or self.second.is_set()


@dataclass(frozen=True, slots=True)
class FeedEvent:
    seq: int
    stream: str
    version: int
    event: BaseEvent  # a slot's Event, or a record of an engine stream (@node, @hub-probes)


class Feed:
    """Events after `since` (a journal seq), optionally of one stream only."""

    def __init__(
        self,
        journal: Journal,
        *,
        since: int = 0,
        stream: str | None = None,
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.journal = journal
        self.seq = since  # everything up to here was delivered (or is not ours)
        self.stream = stream
        self.poll_s = poll_s
        self._clock = clock
        self._gap_seen: dict[int, float] = {}  # first missing seq -> when we first saw it
        self._listener: Any = None  # a psycopg connection LISTENing, on PostgreSQL

    def poll(self) -> list[FeedEvent]:
        """What was committed since the last call, in order (never the same event twice)."""
        journal = self.journal
        if journal.is_sqlite:
            rows = journal.read_since(self.seq, stream=self.stream)
            if rows:
                self.seq = rows[-1][0]
            return [self._decode(row) for row in rows]
        delivered = []
        for row in journal.read_since(self.seq):
            seq, at = row[0], row[3]
            if seq != self.seq + 1 and not self._gap_is_a_rollback(self.seq + 1, at):
                break  # an append still committing: wait for it
            self._gap_seen.pop(self.seq + 1, None)
            self.seq = seq
            if self.stream is None or row[1] == self.stream:
                delivered.append(self._decode(row))
        return delivered

    def _gap_is_a_rollback(self, missing: int, next_at: float) -> bool:
        now = self._clock()
        if next_at < now - GAP_TIMEOUT_S:  # an old gap, met when starting from the past
            return True
        first_seen = self._gap_seen.setdefault(missing, now)
        return now - first_seen >= GAP_TIMEOUT_S

    @staticmethod
    def _decode(row: tuple[int, str, int, float, str, str]) -> FeedEvent:
        seq, stream, version, _, type_, payload = row
        return FeedEvent(seq, stream, version, decode_record(seq, stream, type_, payload))

    def wait(self, timeout: float) -> None:
        """Sleep until something may have been appended (at most `timeout`)."""
        if self.journal.is_sqlite:
            time.sleep(timeout)
            return
        listener = self._listen()
        for _ in listener.notifies(timeout=timeout, stop_after=1):
            pass

    def _listen(self) -> Any:
        if self._listener is None:
            import psycopg

            url = self.journal.engine.url.set(drivername="postgresql")
            self._listener = psycopg.connect(
                url.render_as_string(hide_password=False), autocommit=True
            )
            self._listener.execute(f"LISTEN {FEED_CHANNEL}")
        return self._listener

    def follow(
        self, stop: Stop | None = None, *, timeout: float | None = None
    ) -> Iterator[FeedEvent]:
        """Every event as it is committed, until `stop` is set or `timeout` seconds pass
        without a new one (None = forever)."""
        stop = stop if stop is not None else threading.Event()
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                batch = self.poll()
                if batch:
                    idle_since = time.monotonic()
                    yield from batch
                    continue
                if timeout is not None and time.monotonic() - idle_since >= timeout:
                    return
                self.wait(self.poll_s)
        finally:
            self.close()

    async def afollow(
        self, *, timeout: float | None = None, stop: threading.Event | None = None
    ) -> AsyncIterator[FeedEvent]:
        """`follow` for asyncio: the blocking waits run in a worker thread. Ends when `stop`
        is set (the owner closed), after `timeout` idle seconds, or when the caller stops."""
        mine = threading.Event()
        events = self.follow(_Either(mine, stop) if stop is not None else mine, timeout=timeout)
        try:
            while (item := await asyncio.to_thread(next, events, None)) is not None:
                yield item
        finally:
            mine.set()  # the worker thread ends at its next poll

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
