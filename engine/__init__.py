"""studio-engine: an event-sourced lifecycle engine for llama-server."""

from engine.orchestrator import Engine
from engine.replay import replay
from engine.request import LoadRequest, LoadResult, Status
from engine.rules import InvalidRequest
from engine.steps import EngineError

__all__ = [
    "Engine",
    "EngineError",
    "InvalidRequest",
    "LoadRequest",
    "LoadResult",
    "Status",
    "replay",
]
