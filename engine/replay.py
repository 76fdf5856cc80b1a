"""Replay: the only way slot state is rebuilt (on open, in recovery, in postmortems)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.events import Event
from engine.evolve import IllegalTransition, evolve
from engine.journal import CorruptJournal, Journal, decode_row
from engine.state import SlotState

Until = int | float | datetime | None


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
        return {"until_time": until.timestamp()}
    if isinstance(until, float):
        return {"until_time": until}
    return {"until_seq": until}


def replay_steps(
    rows: Iterable[tuple[int, int, float, str, str]], initial: SlotState | None = None
) -> Iterator[Step]:
    state = initial if initial is not None else SlotState()
    for seq, version, at, type_, payload in rows:
        if version != state.version + 1:
            raise CorruptJournal(seq, f"version {version} follows {state.version}: events missing")
        event = decode_row(seq, type_, payload)
        try:
            state = evolve(state, event, seq)
        except IllegalTransition as exc:
            message = f"{type_!r} is not a legal transition from state {exc.state!r}"
            raise CorruptJournal(seq, message) from exc
        yield Step(seq, at, event, state)


def replay_state(
    rows: Iterable[tuple[int, int, float, str, str]], initial: SlotState | None = None
) -> SlotState:
    """Fold rows into a state without keeping the steps (the hot path)."""
    state = initial if initial is not None else SlotState()
    for step in replay_steps(rows, state):
        state = step.state
    return state


def replay(url: str | os.PathLike[str], slot: str = "default", until: Until = None) -> SlotState:
    """The slot state after the journal at `url` (or after sequence number / time `until`)."""
    journal = Journal.open(url, create=False)
    try:
        return replay_state(journal.read_rows(slot, **bounds(until)))
    finally:
        journal.close()
