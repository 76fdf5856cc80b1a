"""Replay: the only way slot state is rebuilt (on open, in recovery, in postmortems)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.adapters.journal import Journal
from engine.core.codec import decode_row
from engine.core.errors import CorruptJournal
from engine.core.events import Event
from engine.core.evolve import IllegalTransition, evolve
from engine.core.snapshot import SnapshotError, decode, encode
from engine.core.state import SlotState

Until = int | float | datetime | None
SNAPSHOT_EVERY = 1000  # events between snapshots; open replays at most this many

log = logging.getLogger("studio-engine")


@dataclass(frozen=True, slots=True)
class Step:
    """One replayed event with the state it led to (for timelines and postmortems)."""

    seq: int
    at: float
    event: Event
    state: SlotState


def bounds(until: Until) -> dict[str, Any]:
    if until is None:
        return {}
    if isinstance(until, datetime):
        if until.tzinfo is None:  # naive times are UTC everywhere in studio-engine
            until = until.replace(tzinfo=UTC)
        return {"until_time": until.timestamp()}
    if isinstance(until, float):
        return {"until_time": until}
    return {"until_seq": until}


def _apply(
    state: SlotState, seq: int, version: int, type_: str, payload: str
) -> tuple[Event, SlotState]:
    if version != state.version + 1:
        raise CorruptJournal(seq, f"version {version} follows {state.version}: events missing")
    event = decode_row(seq, type_, payload)
    try:
        return event, evolve(state, event, seq)
    except IllegalTransition as exc:
        message = f"{type_!r} is not a legal transition from state {exc.state!r}"
        raise CorruptJournal(seq, message) from exc


def replay_steps(
    rows: Iterable[tuple[int, int, float, str, str]], initial: SlotState | None = None
) -> Iterator[Step]:
    state = initial if initial is not None else SlotState()
    for seq, version, at, type_, payload in rows:
        event, state = _apply(state, seq, version, type_, payload)
        yield Step(seq, at, event, state)


def replay_state(
    rows: Iterable[tuple[int, int, float, str, str]], initial: SlotState | None = None
) -> SlotState:
    """Fold rows into a state without building a Step per event (the hot path)."""
    state = initial if initial is not None else SlotState()
    for seq, version, _, type_, payload in rows:
        state = _apply(state, seq, version, type_, payload)[1]
    return state


def replay(url: str | os.PathLike[str], slot: str = "default", until: Until = None) -> SlotState:
    """The slot state after the journal at `url` (or after sequence number / time `until`)."""
    journal = Journal.open(url, create=False, read_only=True)
    try:
        return replay_state(journal.read_rows(slot, **bounds(until)))
    finally:
        journal.close()


def usable_snapshot(journal: Journal, stream: str) -> SlotState | None:
    """The newest snapshot that matches the journal, else None (each refusal is logged)."""
    for version, _schema, _at, text in journal.snapshots(stream):
        try:
            state = decode(text)
            if state.version != version:
                raise SnapshotError(f"holds version {state.version}, filed as {version}")
            at = journal.event_at(stream, version)
            if at is None or at != state.updated_at:
                raise SnapshotError(f"does not match journal event version {version}")
            return state
        except SnapshotError as exc:
            log.warning("slot %r: ignoring snapshot at version %d: %s", stream, version, exc)
    return None


def open_state(journal: Journal, stream: str, snapshot_every: int = SNAPSHOT_EVERY) -> SlotState:
    """The slot state for an engine opening: newest usable snapshot plus the events after it.

    Snapshots are only a cache: an unusable one is ignored with a warning and the journal is
    replayed in full. When more than `snapshot_every` events had to be replayed, a fresh
    snapshot is stored so the next open is fast. `snapshot_every=0` replays in full.
    """
    start = usable_snapshot(journal, stream) if snapshot_every > 0 else None
    state: SlotState | None = None
    if start is not None:
        try:
            state = replay_state(journal.read_rows(stream, after_version=start.version), start)
        except CorruptJournal as exc:  # the tail does not follow the snapshot: distrust it
            log.warning(
                "slot %r: snapshot at version %d disagrees with the journal (%s); "
                "replaying in full",
                stream,
                start.version,
                exc,
            )
            start = None
    if state is None:
        state = replay_state(journal.read_rows(stream))
    base = start.version if start is not None else 0
    if snapshot_every > 0 and state.version - base >= snapshot_every:
        if start is None:
            log.warning(
                "slot %r: no usable snapshot, replayed %d events in full", stream, state.version
            )
        journal.save_snapshot(stream, state.version, state.updated_at or 0.0, encode(state))
    return state
