"""Journal rows to events (pure): every stream's payload decoded and checked, each problem a
`CorruptJournal` naming the row's seq."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from engine.core.errors import CorruptJournal
from engine.core.events import (
    CAPABILITIES_PROBED_ADAPTER,
    CAPABILITIES_STREAM,
    HUB_PROBE_STREAM,
    HUB_PROBED_ADAPTER,
    RUN_FILES_STREAM,
    SCHEMA_VERSION,
    BaseEvent,
    Event,
    LogsPruned,
    is_slot_stream,
    parse_event,
)
from engine.core.node_events import NODE_EVENT_ADAPTER, NODE_STREAM

_E = TypeVar("_E", bound=BaseEvent)

# The records of the engine's own streams ("@..."), for readers that follow every stream.
_STREAM_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    HUB_PROBE_STREAM: HUB_PROBED_ADAPTER,
    NODE_STREAM: NODE_EVENT_ADAPTER,
    CAPABILITIES_STREAM: CAPABILITIES_PROBED_ADAPTER,
    RUN_FILES_STREAM: TypeAdapter(LogsPruned),
}


def parse_record(stream: str, payload: str | bytes) -> BaseEvent:
    """Decode a payload of any stream: a slot's event, a hub probe, a node record.
    Raises pydantic.ValidationError on garbage, KeyError for a stream this engine lacks."""
    if is_slot_stream(stream):
        return parse_event(payload)
    parsed: BaseEvent = _STREAM_ADAPTERS[stream].validate_json(payload)
    return parsed


# Event times outside this window (or not a number at all) make a row corrupt: every reader
# turns them into dates, and datetime overflows long before a float does.
EARLIEST_AT, LATEST_AT = 0.0, 253402300799.0  # 9999-12-31T23:59:59Z


def decode_row(seq: int, type_: str, payload: str) -> Event:
    """A slot's event; every problem is a CorruptJournal naming its seq."""
    return _decode(seq, type_, payload, parse_event)


def decode_record(seq: int, stream: str, type_: str, payload: str) -> BaseEvent:
    """A record of any stream (slots, the hub probe cache, the node), for followers."""
    try:
        return _decode(seq, type_, payload, lambda text: parse_record(stream, text))
    except KeyError:
        raise CorruptJournal(seq, f"stream {stream!r} is unknown to this engine") from None


def _decode(seq: int, type_: str, payload: str, parse: Callable[[str], _E]) -> _E:
    try:
        event = parse(payload)
    except RecursionError as exc:
        raise CorruptJournal(seq, f"unreadable {type_!r} payload (nested too deeply)") from exc
    except ValidationError as exc:
        newer = _schema_version_of(payload)
        if newer is not None and newer > SCHEMA_VERSION:
            raise CorruptJournal(
                seq,
                f"written with event schema v{newer}, newer than this engine's "
                f"v{SCHEMA_VERSION}; upgrade studio-engine",
            ) from exc
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        where = ".".join(loc[1:] if loc[:1] == [type_] else loc) or "payload"
        raise CorruptJournal(
            seq, f"unreadable {type_!r} payload ({where}: {first['msg']})"
        ) from exc
    if event.schema_version > SCHEMA_VERSION:
        raise CorruptJournal(
            seq,
            f"written with event schema v{event.schema_version}, newer than this engine's "
            f"v{SCHEMA_VERSION}; upgrade studio-engine",
        )
    if getattr(event, "type", None) != type_:
        raise CorruptJournal(
            seq, f"type column says {type_!r} but the payload is {getattr(event, 'type', None)!r}"
        )
    if not (math.isfinite(event.at) and EARLIEST_AT <= event.at <= LATEST_AT):
        raise CorruptJournal(seq, f"event time {event.at!r} is not a valid time")
    return event


def _schema_version_of(payload: str) -> int | None:
    try:
        value = json.loads(payload).get("schema_version")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, int) else None
