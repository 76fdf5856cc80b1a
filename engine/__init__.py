"""studio-engine: an event-sourced lifecycle engine for llama-server."""

from engine.core.errors import EngineClosed, EngineError, JournalBusy, JournalUnavailable
from engine.core.request import LoadRequest, LoadResult, Status
from engine.core.rules import InvalidRequest
from engine.node import Node, NodeStatus, SlotInfo
from engine.orchestrator import Engine
from engine.replay import replay

__all__ = [
    "Engine",
    "EngineClosed",
    "EngineError",
    "InvalidRequest",
    "JournalBusy",
    "JournalUnavailable",
    "LoadRequest",
    "LoadResult",
    "Node",
    "NodeStatus",
    "SlotInfo",
    "Status",
    "replay",
]
