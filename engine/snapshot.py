"""Slot-state snapshots: an exact JSON codec for `SlotState` (pure, no I/O).

A snapshot is a cache of `fold(evolve, events[:version])`; the journal stays the truth. The
codec is driven by the dataclasses' type hints, so a field added to the state is carried
without touching this module, and `STATE_FORMAT` (a digest of the state's shape) changes with
it: a snapshot written for another shape is refused and the journal is replayed in full.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Final, Union

from pydantic import BaseModel, ValidationError

from engine.events import SCHEMA_VERSION
from engine.machine import STATES
from engine.state import SlotState


class SnapshotError(ValueError):
    """A snapshot that cannot be trusted (corrupt, truncated or for another state shape)."""


def _shape(tp: Any, seen: set[Any]) -> str:
    """A stable description of a type, recursing into dataclasses and pydantic models."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if tp in seen:
            return tp.__name__
        seen.add(tp)
        hints = typing.get_type_hints(tp)
        inner = ",".join(f"{f.name}:{_shape(hints[f.name], seen)}" for f in dataclasses.fields(tp))
        return f"{tp.__name__}({inner})"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp in seen:
            return tp.__name__
        seen.add(tp)
        inner = ",".join(
            f"{name}:{_shape(field.annotation, seen)}" for name, field in tp.model_fields.items()
        )
        return f"{tp.__name__}({inner})"
    args = typing.get_args(tp)
    if args:
        origin = typing.get_origin(tp)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{','.join(_shape(a, seen) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


STATE_FORMAT: Final = hashlib.sha256(
    f"{SCHEMA_VERSION}:{_shape(SlotState, set())}".encode()
).hexdigest()[:16]


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    return value


def encode(state: SlotState) -> str:
    """The snapshot text for `state` (compact JSON, tagged with STATE_FORMAT)."""
    return json.dumps({"format": STATE_FORMAT, "state": _to_json(state)}, separators=(",", ":"))


def _from_json(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise SnapshotError(f"{where}: null where a value is required")
        concrete = [option for option in options if option is not type(None)]
        errors = []
        for option in concrete:
            try:
                return _from_json(option, value, where)
            except SnapshotError as exc:
                errors.append(str(exc))
        raise SnapshotError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, list):
            raise SnapshotError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise SnapshotError(f"{where}: expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise SnapshotError(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise SnapshotError(f"{where}: unknown field(s) {sorted(unknown)}")
        missing = {
            f.name
            for f in dataclasses.fields(tp)
            if f.name not in value
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        }
        if missing:
            raise SnapshotError(f"{where}: missing field(s) {sorted(missing)}")
        decoded = {name: _from_json(hints[name], v, f"{where}.{name}") for name, v in value.items()}
        return tp(**decoded)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        try:
            return tp.model_validate(value)
        except ValidationError as exc:
            raise SnapshotError(f"{where}: {exc.errors()[0]['msg']}") from exc
    if tp is float:
        # JSON writes 2.0 as 2.0, but accept an integral number written by another encoder.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise SnapshotError(f"{where}: expected a number, got {type(value).__name__}")
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise SnapshotError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    if tp is typing.Any:
        return value
    raise SnapshotError(f"{where}: cannot decode type {tp!r}")  # pragma: no cover - new type


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
    state = _from_json(SlotState, document["state"], "state")
    assert isinstance(state, SlotState)
    if state.state not in STATES:
        raise SnapshotError(f"state.state: {state.state!r} is not a state of the machine")
    return state
