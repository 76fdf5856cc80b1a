"""Postmortem of a Node (the `@node` stream): why was a server evicted, what was refused.

Pure like engine.core.postmortem, whose anomaly and duration helpers it shares.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.core import node_events as nev
from engine.core.postmortem import Anomaly
from engine.core.timeline import clock, seconds


@dataclass(frozen=True, slots=True)
class EvictionReport:
    seq: int
    at: float
    slot: str
    cause: str
    idle_s: float
    freed_bytes: int
    pid: int | None
    for_slot: str | None  # what needed the room
    for_load_id: str | None
    for_need_bytes: int | None  # that load's need, from its admission
    for_model: str | None

    def why(self) -> str:
        mib = f"{self.freed_bytes / (1 << 20):,.0f} MiB"
        held = f"idle {seconds(self.idle_s)}, held {mib}"
        if self.cause == "ttl":
            return f"its idle TTL expired ({held})"
        if self.cause == "manual":
            return f"stopped on request: unload or node close ({held})"
        need = (
            f", needing {self.for_need_bytes / (1 << 20):,.0f} MiB"
            if self.for_need_bytes is not None
            else ""
        )
        what = f"load {self.for_load_id or '-'} on slot {self.for_slot!r}{need}"
        limit = "max_servers" if self.cause == "capacity" else "memory"
        return f"{limit}: made room for {what}; it was the least recently used idle server ({held})"


@dataclass(slots=True)
class NodeReport:
    events: int = 0
    evictions: list[EvictionReport] = field(default_factory=list)
    refusals: list[tuple[int, float, str, str]] = field(default_factory=list)  # seq at slot error
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def violations(self) -> list[Anomaly]:
        return [a for a in self.anomalies if a.violation]

    def evictions_of(self, slot: str) -> list[EvictionReport]:
        return [e for e in self.evictions if e.slot == slot]

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "evictions": [asdict(e) for e in self.evictions],
            "refusals": [
                {"seq": s, "at": a, "slot": slot, "error": err} for s, a, slot, err in self.refusals
            ],
            "anomalies": [{**asdict(a), "violation": a.violation} for a in self.anomalies],
        }


def analyse_node(records: Iterable[tuple[int, nev.NodeEvent]]) -> NodeReport:
    """Evictions with their cause and what needed the room, refusals, and a pinned server
    evicted by the node (a contract violation; a manual unload of a pinned slot is not)."""
    report = NodeReport()
    pinned: set[str] = set()
    admissions: dict[str, nev.NodeAdmission] = {}
    models: dict[str, str] = {}  # load id -> model (from the measurement once it ran)
    pending: list[tuple[int, nev.Evicted]] = []
    for seq, event in records:
        report.events += 1
        match event:
            case nev.SlotPinned():
                (pinned.add if event.pinned else pinned.discard)(event.slot)
            case nev.Evicted():
                pending.append((seq, event))
                if event.slot in pinned and event.cause != "manual":
                    report.anomalies.append(
                        Anomaly(seq, event.at, "evicted_pinned", f"slot {event.slot!r} is pinned")
                    )
            case nev.NodeAdmission():
                if event.load_id is not None:
                    admissions[event.load_id] = event
                if event.verdict == "refused":
                    report.refusals.append((seq, event.at, event.slot, event.error or ""))
            case nev.ServerMeasured():
                if event.load_id is not None:
                    models[event.load_id] = event.spec.model
    for seq, evicted in pending:  # the admission is journaled after the evictions it made
        admission = admissions.get(evicted.for_load_id or "")
        report.evictions.append(
            EvictionReport(
                seq=seq,
                at=evicted.at,
                slot=evicted.slot,
                cause=evicted.cause,
                idle_s=evicted.idle_s,
                freed_bytes=evicted.freed_bytes,
                pid=evicted.pid,
                for_slot=evicted.for_slot,
                for_load_id=evicted.for_load_id,
                for_need_bytes=admission.need_bytes if admission else None,
                for_model=models.get(evicted.for_load_id or ""),
            )
        )
    return report


def render_evictions(report: NodeReport, slot: str | None = None) -> str:
    """`EVICTIONS` section: every eviction (of `slot` only, when given) and why."""
    chosen = report.evictions if slot is None else report.evictions_of(slot)
    out = [f"EVICTIONS ({len(chosen)})"]
    for e in chosen:
        out.append(f"  #{e.seq} {clock(e.at)} {e.slot!r} (pid {e.pid or '-'}): {e.cause}")
        out.append(f"      why: {e.why()}")
        if e.for_model:
            out.append(f"      the load that needed the room ran {e.for_model}")
    return "\n".join(out) + "\n"


def render_node(report: NodeReport, journal: str) -> str:
    out = [f"postmortem of the node (@node) in {journal}: {report.events} events", ""]
    out.append(render_evictions(report))
    out.append(f"REFUSED ADMISSIONS ({len(report.refusals)})")
    out += [f"  #{seq} {clock(at)} {slot!r}: {error}" for seq, at, slot, error in report.refusals]
    out += ["", f"ANOMALIES ({len(report.anomalies)})"]
    for anomaly in report.anomalies:
        flag = "VIOLATION " if anomaly.violation else ""
        out.append(f"  #{anomaly.seq} {clock(anomaly.at)} {flag}{anomaly.kind}: {anomaly.message}")
    return "\n".join(out) + "\n"
