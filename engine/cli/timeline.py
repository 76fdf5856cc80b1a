"""The timeline both `studio-engine replay` and the demo print: one row per journaled event."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import cast

from engine.adapters.feed import Feed
from engine.adapters.journal import Journal
from engine.core.errors import JournalError
from engine.core.events import Event, is_slot_stream
from engine.core.evolve import evolve
from engine.core.state import SlotState
from engine.core.timeline import row
from engine.replay import Step, Until, bounds, replay_state, replay_steps


def parse_until(text: str | None, option: str = "--until") -> Until:
    """A bound given on the command line: a sequence number, or an ISO time (UTC unless it
    names a zone)."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{option} takes a sequence number or an ISO time, not {text!r}"
        ) from None
    # A time without a zone is UTC, as everywhere in studio-engine (the timelines print UTC).
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read_steps(journal_path: str, slot: str, until: Until) -> list[Step]:
    journal = Journal.open(journal_path, create=False, read_only=True)
    try:
        if slot not in journal.streams():
            known = ", ".join(s for s in journal.streams() if is_slot_stream(s)) or "none"
            raise JournalError(f"journal has no slot {slot!r} (slots: {known})")
        return list(replay_steps(journal.read_rows(slot, **bounds(until))))
    finally:
        journal.close()


def print_timeline(journal: str, slot: str, until: Until) -> None:
    steps = read_steps(journal, slot, until)
    header = f"{'seq':>6}  {'time (UTC)':23}  {'delta':>9}  {'event':22} {'state after':12} details"
    print(header)
    print("-" * len(header))
    previous = None
    for step in steps:
        print(row(step.seq, step.at, previous, step.event, step.state.state))
        previous = step.at
    final = steps[-1].state.state if steps else "idle"
    print(f"\n{len(steps)} events; slot {slot!r} is {final!r}")


def tail(location: str, *, slot: str | None, lines: int, follow: bool, as_json: bool) -> None:
    """Print the last `lines` events (of one slot, or of every stream) and, with `follow`,
    each event as any process appends it, until interrupted."""
    journal = Journal.open(location, create=False, read_only=True)
    try:
        if slot is not None and slot not in journal.streams() and not follow:
            known = ", ".join(s for s in journal.streams() if is_slot_stream(s)) or "none"
            raise JournalError(f"journal has no slot {slot!r} (slots: {known})")
        start = journal.seq_before_last(lines, stream=slot)
        # The state column needs each slot's state just before the first printed event.
        states = {
            stream: replay_state(journal.read_rows(stream, until_seq=start))
            for stream in ([slot] if slot else journal.streams())
            if is_slot_stream(stream)
        }
        feed = Feed(journal, since=start, stream=slot)
        events = feed.follow() if follow else iter(feed.poll())
        previous = None
        for item in events:
            state = "-"
            if is_slot_stream(item.stream):
                event = cast(Event, item.event)
                after = evolve(states.get(item.stream, SlotState()), event, item.seq)
                states[item.stream], state = after, after.state
            if as_json:
                record = {"seq": item.seq, "stream": item.stream, "state": state}
                print(json.dumps({**record, "event": item.event.model_dump(mode="json")}))
            else:
                text = row(item.seq, item.event.at, previous, item.event, state)
                print(text if slot else f"{item.stream[:12]:12}  {text}")
            sys.stdout.flush()
            previous = item.event.at
    finally:
        journal.close()
