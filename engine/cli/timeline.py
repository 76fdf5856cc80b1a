"""The timeline both `studio-engine replay` and the demo print: one row per journaled event."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from engine.adapters.journal import Journal, JournalError
from engine.core.events import is_slot_stream
from engine.core.timeline import row
from engine.replay import Step, Until, bounds, replay_steps


def parse_until(text: str | None) -> Until:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--until takes a sequence number or an ISO time, not {text!r}"
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
