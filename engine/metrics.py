"""Prometheus metrics, derived from the journal (no second bookkeeping) plus the live
process table for memory.

Counters are folded from the journal by `engine.core.tally`, so they survive restarts: a new
process reading the same journal reports the same totals. Slot states are the replayed
states. Only two figures are not in the journal: server memory (read live from the process
table and NVML at scrape time) and the append latency of this process's journal writes.

    metrics = JournalMetrics(engine.journal, servers=lambda: {engine.slot: engine.state.process})
    metrics.render()   # the text exposition format, for GET /metrics
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Final, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from engine.adapters.feed import Feed
from engine.adapters.gpu import NvmlProbe
from engine.adapters.journal import Journal
from engine.adapters.memory import measure_server
from engine.core.events import Event, is_slot_stream
from engine.core.evolve import evolve
from engine.core.machine import STATES
from engine.core.state import ServerProcess, SlotState
from engine.core.tally import Histogram, Tally

APPEND_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class JournalMetrics(Collector):
    """A Prometheus collector over one journal: every stream, every slot."""

    def __init__(
        self,
        journal: Journal,
        *,
        servers: Callable[[], Mapping[str, ServerProcess | None]] | None = None,
        vram: NvmlProbe | None = None,
    ) -> None:
        self._feed = Feed(journal)
        self._tally = Tally()
        self._states: dict[str, SlotState] = {}
        self._servers = servers
        self._vram = vram or NvmlProbe()
        self._append = Histogram(APPEND_BUCKETS)
        self._lock = threading.Lock()  # one scrape folds at a time
        journal.append_observers.append(self._append.observe)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _catch_up(self) -> None:
        while batch := self._feed.poll():
            for item in batch:
                self._tally.add(item.stream, item.event)
                if is_slot_stream(item.stream):
                    state = self._states.get(item.stream, SlotState())
                    event = cast(Event, item.event)
                    self._states[item.stream] = evolve(state, event, item.seq)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._catch_up()
            yield from self._slot_metrics()
        yield from self._live_metrics()

    def _slot_metrics(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "studio_engine_slot_state",
            "1 for the state each slot is in (replayed from the journal), 0 for the others",
            labels=["slot", "state"],
        )
        for slot, replayed in sorted(self._states.items()):
            for name in STATES:
                state.add_metric([slot, name], 1.0 if replayed.state == name else 0.0)
        yield state
        loads = CounterMetricFamily(
            "studio_engine_loads", "Load calls by how they ended", labels=["slot", "outcome"]
        )
        crashes = CounterMetricFamily(
            "studio_engine_crashes",
            "Servers that died on their own while serving",
            labels=["slot", "failure_kind"],
        )
        phases = HistogramMetricFamily(
            "studio_engine_load_phase_seconds",
            "Duration of each phase of a load",
            labels=["slot", "phase"],
        )
        for slot, tally in sorted(self._tally.slots.items()):
            for outcome, n in sorted(tally.loads.items()):
                loads.add_metric([slot, outcome], n)
            for kind, n in sorted(tally.crashes.items()):
                crashes.add_metric([slot, kind], n)
            for phase, histogram in sorted(tally.phases.items()):
                phases.add_metric([slot, phase], histogram.cumulative(), histogram.total)
        yield from (loads, phases, crashes)
        evictions = CounterMetricFamily(
            "studio_engine_evictions", "Servers evicted to make room, by cause", labels=["cause"]
        )
        for cause, n in sorted(self._tally.evictions.items()):
            evictions.add_metric([cause], n)
        yield evictions

    def _live_metrics(self) -> Iterator[Metric]:
        memory = GaugeMetricFamily(
            "studio_engine_server_memory_bytes",
            "Memory a slot's live server holds now (rss: resident; vram: NVML, per process)",
            labels=["slot", "kind"],
        )
        for slot, process in sorted((self._servers() if self._servers else {}).items()):
            if process is None or not process.pid:
                continue
            use = measure_server(self._vram, process)
            if use.total:  # zero: the process is gone (or is not ours any more)
                memory.add_metric([slot, "rss"], use.rss_bytes)
                memory.add_metric([slot, "vram"], use.vram_bytes)
        yield memory
        append = HistogramMetricFamily(
            "studio_engine_journal_append_seconds",
            "Latency of this process's journal appends (commit included)",
        )
        append.add_metric([], self._append.cumulative(), self._append.total)
        yield append
