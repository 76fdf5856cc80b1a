"""Slot-state snapshots: an exact JSON codec for `SlotState` (pure, no I/O).

A snapshot is a cache of `fold(evolve, events[:version])`; the journal stays the truth. The
codec is pydantic's, driven by the state's type hints (stdlib dataclasses holding the event
models), strict and refusing unknown fields, so a field added to the state is carried without
touching this module. `STATE_FORMAT` is a digest of the state's JSON schema: a snapshot written
for another shape is refused and the journal is replayed in full.
"""

from __future__ import annotations

import hashlib
import json
from typing import Final

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from engine.core.events import SCHEMA_VERSION
from engine.core.machine import STATES
from engine.core.state import SlotState


class _Document(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    format: str
    state: SlotState


_CODEC: Final = TypeAdapter(SlotState)
STATE_FORMAT: Final = hashlib.sha256(
    f"{SCHEMA_VERSION}:{json.dumps(_CODEC.json_schema(), sort_keys=True)}".encode()
).hexdigest()[:16]


class SnapshotError(ValueError):
    """A snapshot that cannot be trusted (corrupt, truncated or for another state shape)."""


def encode(state: SlotState) -> str:
    """The snapshot text for `state` (compact JSON, tagged with STATE_FORMAT)."""
    return f'{{"format":"{STATE_FORMAT}","state":{_CODEC.dump_json(state).decode()}}}'


def decode(text: str | bytes) -> SlotState:
    """The state a snapshot holds; SnapshotError when it cannot be trusted."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict) or "state" not in document:
        raise SnapshotError("not a snapshot document")
    if document.get("format") != STATE_FORMAT:
        raise SnapshotError(
            f"written for state format {document.get('format')!r}, this engine uses "
            f"{STATE_FORMAT!r}"
        )
    try:
        state = _Document.model_validate_json(text).state
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise SnapshotError(f"{where}: {first['msg']}") from None
    if state.state not in STATES:
        raise SnapshotError(f"state.state: {state.state!r} is not a state of the machine")
    return state
