"""Counters folded from the journal, for metrics: loads by outcome, phase durations, crashes,
evictions. Pure and incremental: `add` each event once, in journal order.

Derived from the journal alone, so the figures survive restarts (a new process folds the
same events into the same counts) and never drift from what `postmortem` reports: the phase
boundaries are postmortem's own tables.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Final, cast

from engine.core import events as ev
from engine.core import node_events as nev
from engine.core.postmortem import PHASE_CLOSES, PHASE_OPENS

# Seconds: from a tiny model's 5 ms warm-up to a large model's minutes-long download.
PHASE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_OUTCOMES: Final = {
    "load_succeeded": "loaded",
    "load_short_circuited": "already_loaded",
    "load_joined": "joined",
    "load_cancelled": "cancelled",
    "load_failed": "failed",
}
_LOAD_ENDS: Final = frozenset({"load_succeeded", "load_cancelled", "load_failed", "load_abandoned"})


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = PHASE_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations <= le) per bucket, ending with +Inf."""
        counts = self.counts or [0] * (len(self.buckets) + 1)
        running, out = 0, []
        for bound, count in zip((*map(str, self.buckets), "+Inf"), counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class SlotTally:
    loads: Counter[str] = field(default_factory=Counter)
    crashes: Counter[str] = field(default_factory=Counter)
    phases: dict[str, Histogram] = field(default_factory=dict)
    opened: dict[str, float] = field(default_factory=dict)  # phase -> start, of the load in flight


@dataclass(slots=True)
class Tally:
    slots: dict[str, SlotTally] = field(default_factory=dict)
    evictions: Counter[str] = field(default_factory=Counter)

    def add(self, stream: str, record: ev.BaseEvent) -> None:
        if not ev.is_slot_stream(stream):
            if isinstance(record, nev.Evicted):
                self.evictions[record.cause] += 1
            return
        event = cast(ev.Event, record)
        slot = self.slots.setdefault(stream, SlotTally())
        self._phases(slot, event)
        match event:
            case ev.LoadAbandoned(outcome=outcome):
                slot.loads[outcome] += 1
            case ev.Crashed():
                slot.crashes[str(getattr(event, "failure_kind", None) or "crashed")] += 1
            case _ if event.type in _OUTCOMES:
                slot.loads[_OUTCOMES[event.type]] += 1
            case _:
                pass

    @staticmethod
    def _phases(slot: SlotTally, event: ev.Event) -> None:
        if event.type == "load_requested":
            slot.opened.clear()  # a new load: whatever the last one left open ended with it
        closes = PHASE_CLOSES.get(event.type)
        if closes is not None and closes in slot.opened:
            start = slot.opened.pop(closes)
            slot.phases.setdefault(closes, Histogram()).observe(max(event.at - start, 0.0))
        opens = PHASE_OPENS.get(event.type)
        if opens is not None:
            slot.opened[opens] = event.at
        if event.type in _LOAD_ENDS:  # a phase cut short by the end of its load still counts
            for phase, start in slot.opened.items():
                slot.phases.setdefault(phase, Histogram()).observe(max(event.at - start, 0.0))
            slot.opened.clear()
