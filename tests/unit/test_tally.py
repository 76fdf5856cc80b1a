"""The journal fold behind the metrics: outcomes, phase histograms, crashes, evictions."""

from __future__ import annotations

import pytest

from engine.core import events as ev
from engine.core import node_events as nev
from engine.core.postmortem import analyse
from engine.core.tally import PHASE_BUCKETS, Histogram, Tally
from tests.unit.test_postmortem import SPEC, _load, _records


def test_phase_durations_are_the_ones_postmortem_reports() -> None:
    events = [
        *_load("a", 100.0, 1),
        ev.LoadRequested(at=200.0, load_id="b", spec=SPEC),
        ev.LoadAbandoned(at=200.2, load_id="b", outcome="refused", error="does not fit"),
        ev.LoadShortCircuited(at=201.0, load_id="c", spec=SPEC),
    ]
    tally = Tally()
    for event in events:
        tally.add("default", event)
    slot = tally.slots["default"]
    assert slot.loads == {"loaded": 1, "refused": 1, "already_loaded": 1}
    report = analyse(_records(events))
    for phase in ("resolve", "settle", "spawn", "warm"):
        expected = [e - s for load in report.loads for p, s, e in load.spans if p == phase]
        assert slot.phases[phase].total == sum(expected), phase
        assert slot.phases[phase].cumulative()[-1] == ("+Inf", len(expected))


def test_crashes_by_kind_and_evictions_by_cause() -> None:
    tally = Tally()
    tally.add("default", ev.Crashed(at=1.0, pid=7, returncode=-9))
    tally.add("@node", nev.Evicted(at=2.0, slot="chat", cause="capacity", idle_s=3.0,
                                  freed_bytes=1 << 20))  # fmt: skip
    tally.add("@node", nev.SlotPinned(at=2.0, slot="chat", pinned=True))
    assert tally.slots["default"].crashes == {"crashed": 1}
    assert tally.evictions == {"capacity": 1} and "@node" not in tally.slots


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram()
    for value in (0.001, 0.005, 0.3, 1000.0):
        histogram.observe(value)
    cumulative = dict(histogram.cumulative())
    assert cumulative["0.005"] == 2  # le is inclusive
    assert cumulative["0.5"] == 3 and cumulative[str(PHASE_BUCKETS[-1])] == 3
    assert cumulative["+Inf"] == 4 and histogram.total == pytest.approx(1000.306)
