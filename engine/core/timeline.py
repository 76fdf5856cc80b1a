"""Human-readable summaries of events for timelines (`replay`, `postmortem`, the demo)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from engine.core.events import BaseEvent

# Fields too bulky or too internal for a one-line summary.
_OMIT = frozenset({"type", "schema_version", "at", "load_id", "argv", "log_tail", "marker"})


def _short(value: Any) -> str:
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_short(v)}" for k, v in value.items() if v not in (None, (), []))
        return "{" + inner + "}"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def key_fields(event: BaseEvent) -> str:
    """`name=value` pairs for the fields that say what happened (defaults left out)."""
    data = event.model_dump(exclude=set(_OMIT), exclude_defaults=True)
    return " ".join(f"{name}={_short(value)}" for name, value in data.items())


def clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def delta(at: float, previous: float | None) -> str:
    return "" if previous is None else f"+{at - previous:.3f}s"


def row(seq: int, at: float, previous: float | None, event: BaseEvent, state: str) -> str:
    """One timeline line: seq, time, time since the previous event, event, state after, facts."""
    return (
        f"{seq:>6}  {clock(at):23}  {delta(at, previous):>9}  "
        f"{event.kind:22} {state:12} {key_fields(event)}"
    )


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
