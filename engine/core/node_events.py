"""The Node's own records (the `@node` stream): admission across slots, evictions, measured
memory, pins, last use. Engine records, not machine triggers: the node state folds them
(engine.core.eviction.evolve_node), the slot machines never see them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from engine.core.events import BaseEvent, LoadSpec

NODE_STREAM = "@node"

EvictionCause = Literal["capacity", "memory", "ttl", "manual"]


class NodeAdmission(BaseEvent):
    """A slot's load asked the node for room: the figures and the verdict."""

    type: Literal["node_admission"] = "node_admission"
    slot: str
    need_bytes: int
    need_source: Literal["planned", "measured"]  # measured: this model ran here before
    free_bytes: int  # free VRAM + available RAM now, plus what the slot's own server releases
    used_bytes: int  # what the node's other servers hold (measured, else planned)
    limit_bytes: int | None = None
    servers: int  # the node's other servers at decision time
    max_servers: int | None = None
    verdict: Literal["fits", "refused", "forced"]
    evicted: tuple[str, ...] = ()
    waited_s: float = 0.0
    error: str | None = None


class Evicted(BaseEvent):
    """A server stopped by the node, journaled before it is stopped."""

    type: Literal["evicted"] = "evicted"
    slot: str
    cause: EvictionCause
    idle_s: float
    freed_bytes: int  # what it held: measured, else planned
    pid: int | None = None
    for_slot: str | None = None  # what needed the room (capacity, memory)
    for_load_id: str | None = None


class ServerMeasured(BaseEvent):
    """What a ready server actually uses (RSS + VRAM NVML attributes to its pid)."""

    type: Literal["server_measured"] = "server_measured"
    slot: str
    pid: int
    spec: LoadSpec  # what to reload on restore
    need_key: str  # the launch this figure stands for (model, context, cache, extra args)
    planned_bytes: int
    rss_bytes: int
    vram_bytes: int
    vram_by_gpu: tuple[tuple[int, int], ...] = ()  # (gpu index, bytes) NVML per process
    ttl_s: float | None = None

    @property
    def measured_bytes(self) -> int:
        return self.rss_bytes + self.vram_bytes


class SlotPinned(BaseEvent):
    type: Literal["slot_pinned"] = "slot_pinned"
    slot: str
    pinned: bool


class SlotsUsed(BaseEvent):
    """When each slot's server was last used (wall clock): journaled every few seconds when
    it changed, and at close, so LRU order and the restore order survive a restart."""

    type: Literal["slots_used"] = "slots_used"
    used: tuple[tuple[str, float], ...]


NodeEvent = Annotated[
    NodeAdmission | Evicted | ServerMeasured | SlotPinned | SlotsUsed, Field(discriminator="type")
]
NODE_EVENT_ADAPTER: TypeAdapter[NodeEvent] = TypeAdapter(NodeEvent)


def parse_node_event(payload: str | bytes) -> NodeEvent:
    return NODE_EVENT_ADAPTER.validate_json(payload)
