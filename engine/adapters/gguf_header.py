"""Facts from a GGUF header (architecture, native context, KV geometry), read with `gguf`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class NotAGguf(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class GgufHeader:
    architecture: str | None
    native_ctx: int | None
    block_count: int | None
    head_count_kv: int | None
    key_length: int | None  # per-head K dim
    value_length: int | None


def _scalar(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if hasattr(value, "tobytes") and field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_header(path: str | Path) -> GgufHeader:
    """The header facts of `path`, memoised per (file, size, mtime).

    GGUFReader parses every tensor and token entry (tens of ms for a tiny model, far more for
    a real vocabulary); a repeat load of an unchanged file must not pay that again.
    """
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise NotAGguf(f"{path} is not a readable GGUF file: {exc}") from exc
    return _read_header(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_header(path: str, size: int, mtime_ns: int) -> GgufHeader:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the gguf package raises ValueError/struct errors on bad files
        raise NotAGguf(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = _scalar(reader, "general.architecture")

    def arch_key(name: str) -> Any:
        return _scalar(reader, f"{arch}.{name}") if arch else None

    embd, heads = arch_key("embedding_length"), arch_key("attention.head_count")
    head_dim = embd // heads if embd and heads else None
    return GgufHeader(
        architecture=arch,
        native_ctx=arch_key("context_length"),
        block_count=arch_key("block_count"),
        head_count_kv=arch_key("attention.head_count_kv") or heads,
        key_length=arch_key("attention.key_length") or head_dim,
        value_length=arch_key("attention.value_length") or head_dim,
    )
