"""Admission across the slots of a node, and which idle servers make room for it (pure).

A load on one slot is admitted when its need fits beside the node's other servers:

    room = free VRAM + available RAM now (+ what the slot's own server releases)
           - what admitted servers not measured yet may still allocate
    and, with a memory_limit, at most limit - what the other servers hold.

A server's figure is what it was *measured* to use (RSS + VRAM) once it is ready, its planned
need before that. If the need does not fit, or `max_servers` would be exceeded, idle servers
are evicted least recently used first; a pinned server, one `in_use()` or one whose slot has
a load or unload in flight is never a candidate. When the candidates are not enough, nothing
is evicted (evicting would free room for nothing) and the load is refused with the figures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from engine.core import admission
from engine.core import events as ev
from engine.core import node_events as nev
from engine.core.admission import MIB

Cause = nev.EvictionCause


@dataclass(frozen=True, slots=True)
class MemoryUse:
    """What one server process uses, as measured (psutil RSS + NVML per-process VRAM)."""

    rss_bytes: int
    vram_bytes: int
    vram_by_gpu: tuple[tuple[int, int], ...] = ()  # (gpu index, bytes)

    @property
    def total(self) -> int:
        return self.rss_bytes + self.vram_bytes


@dataclass(frozen=True, slots=True)
class Resident:
    """A server of another slot of the node, as the decision sees it."""

    slot: str
    bytes: int  # measured when known, planned otherwise
    measured: bool
    last_used: float  # monotonic seconds of the last use (touch, in_use, a load)
    pinned: bool = False
    in_use: bool = False
    busy: bool = False  # a load or unload in flight on that slot: not idle
    kept: bool = False  # this decision may not evict it (a restore never evicts)

    @property
    def evictable(self) -> bool:
        return not (self.pinned or self.in_use or self.busy or self.kept)


@dataclass(frozen=True, slots=True)
class Capacity:
    free_bytes: int  # measured free VRAM + available RAM, plus the slot's own releasable
    limit_bytes: int | None = None
    max_servers: int | None = None


@dataclass(frozen=True, slots=True)
class Eviction:
    slot: str
    cause: Cause
    freed_bytes: int


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Literal["fits", "refused", "forced"]
    need_bytes: int
    used_bytes: int  # held by the other servers
    servers: int  # the other servers
    evict: tuple[Eviction, ...] = ()
    blocked_by: tuple[str, ...] = ()  # in use or busy: waiting for them could make room
    error: str | None = None


def planned_need(model: ev.ResolvedModel, spec: ev.LoadSpec, extra_args: tuple[str, ...]) -> int:
    """Bytes a launch is planned to need: the admission estimate, which shares the launch
    planner's KV arithmetic at the least context the plan may give (the explicit one, else
    the auto-fit floor). Admission runs before the plan (the plan needs the memory settled),
    and the node replaces this figure with a measured one once the server runs."""
    return admission.estimate(model, spec, extra_args).need


def need_key(model: ev.ResolvedModel, spec: ev.LoadSpec, extra_args: tuple[str, ...]) -> str:
    """Identifies a launch for its measured figure: same model, context, cache, extra args."""
    parts = (model.source, model.model_file, str(spec.max_seq_length), str(spec.cache_type_kv))
    text = "\0".join((*parts, *extra_args))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decide(
    slot: str,
    need: int,
    residents: Iterable[Resident],
    capacity: Capacity,
    *,
    force: bool = False,
) -> Decision:
    """Admit `need` bytes on `slot`, evicting idle residents LRU first if that makes it fit."""
    others = [r for r in residents if r.slot != slot]
    used = sum(r.bytes for r in others)
    # Admitted servers that are not measured yet may not have allocated their memory: the
    # host's free figure does not show it, so it is reserved here.
    host = capacity.free_bytes - sum(r.bytes for r in others if not r.measured)
    limit, cap = capacity.limit_bytes, capacity.max_servers

    def room(freed: int) -> int:
        free = host + freed
        return free if limit is None else min(free, limit - (used - freed))

    def too_many(evicted: int) -> bool:
        return cap is not None and len(others) - evicted + 1 > cap

    chosen: list[Eviction] = []
    freed = 0
    for resident in sorted((r for r in others if r.evictable), key=lambda r: r.last_used):
        if need <= room(freed) and not too_many(len(chosen)):
            break
        cause: Cause = "capacity" if too_many(len(chosen)) else "memory"
        chosen.append(Eviction(resident.slot, cause, resident.bytes))
        freed += resident.bytes
    fits = need <= room(freed) and not too_many(len(chosen))
    if fits:
        return Decision("fits", need, used, len(others), tuple(chosen))
    blocked = tuple(r.slot for r in others if (r.in_use or r.busy) and not r.pinned)
    message = refusal_message(need, room(freed), used, limit, len(others), cap, others)
    if force:
        return Decision("forced", need, used, len(others), tuple(chosen), blocked, message)
    return Decision("refused", need, used, len(others), (), blocked, message)


def refusal_message(
    need: int,
    room: int,
    used: int,
    limit: int | None,
    servers: int,
    cap: int | None,
    others: list[Resident],
) -> str:
    kept = []
    for r in others:
        reasons = (
            (r.pinned, "pinned"),
            (r.in_use, "in use"),
            (r.busy, "busy"),
            (r.kept, "kept: a restore never evicts"),
        )
        why = next((label for flag, label in reasons if flag), None)
        if why is not None:
            kept.append(f"{r.slot} ({why}, {r.bytes / MIB:,.0f} MiB)")
    limits = f"memory_limit {limit / MIB:,.0f} MiB, " if limit is not None else ""
    count = f"{servers} of max_servers {cap}" if cap is not None else f"{servers} servers"
    return (
        f"no room on this node: needs ~{need / MIB:,.0f} MiB, at most {room / MIB:,.0f} MiB "
        f"after evicting every idle server ({limits}{used / MIB:,.0f} MiB held by {count}); "
        f"not evictable: {', '.join(kept) or 'none'}"
    )


# --- the node's replayed state ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeSlot:
    resident: bool = False  # measured ready and not evicted since: restore brings it back
    spec: ev.LoadSpec | None = None
    pid: int | None = None
    measured_bytes: int | None = None
    ready_at: float | None = None
    ttl_s: float | None = None
    pinned: bool = False
    last_used_at: float | None = None  # wall clock, as last journaled


@dataclass(frozen=True, slots=True)
class NodeState:
    version: int = 0
    slots: Mapping[str, NodeSlot] = field(default_factory=dict)
    measured: Mapping[str, int] = field(default_factory=dict)  # need_key -> bytes measured

    def slot(self, name: str) -> NodeSlot:
        return self.slots.get(name, NodeSlot())

    def restorable(self) -> list[str]:
        """Slots that had a server when the node stopped, most recently used first."""
        resident = [
            (max(s.ready_at or 0.0, s.last_used_at or 0.0), name)
            for name, s in self.slots.items()
            if s.resident
        ]
        return [name for _, name in sorted(resident, reverse=True)]


def evolve_node(state: NodeState, event: nev.NodeEvent) -> NodeState:
    version = state.version + 1
    match event:
        case nev.ServerMeasured():
            slot = replace(
                state.slot(event.slot),
                resident=True,
                spec=event.spec,
                pid=event.pid,
                measured_bytes=event.measured_bytes,
                ready_at=event.at,
                ttl_s=event.ttl_s,
            )
            measured = {**state.measured, event.need_key: event.measured_bytes}
            return NodeState(version, {**state.slots, event.slot: slot}, measured)
        case nev.Evicted():
            slot = replace(state.slot(event.slot), resident=False, pid=None)
            return replace(state, version=version, slots={**state.slots, event.slot: slot})
        case nev.SlotPinned():
            slot = replace(state.slot(event.slot), pinned=event.pinned)
            return replace(state, version=version, slots={**state.slots, event.slot: slot})
        case nev.SlotsUsed():
            slots = dict(state.slots)
            for name, at in event.used:
                slots[name] = replace(state.slot(name), last_used_at=at)
            return replace(state, version=version, slots=slots)
        case _:
            return replace(state, version=version)
