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
    architecture_type: str | None = None  # general.type ("mmproj" for projectors)
    pooling_type: int | None = None  # set by embedding / rerank models
    sliding_window: int | None = None
    swa_layers: int | None = None
    recurrent_layers: int | None = None
    recurrent_state_bytes: int | None = None  # per recurrent layer and sequence (f32 state)
    expert_count: int | None = None


# Architectures whose sliding-window layout llama.cpp hard-codes when the header has no
# pattern: every n-th layer is full attention, the others slide.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}


def _scalar(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if hasattr(value, "tobytes") and field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def _values(reader: Any, key: str) -> list[Any] | None:
    """Every element of an array field (a scalar field gives one)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return [field.parts[i].tolist()[0] for i in field.data]


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
    blocks = arch_key("block_count")
    # Hybrid models list KV heads per layer; a layer with none is recurrent.
    kv_heads = _values(reader, f"{arch}.attention.head_count_kv") if arch else None
    ssm_state = _ssm_state_bytes(arch_key)
    recurrent = None
    if kv_heads is not None and len(kv_heads) > 1:
        recurrent = sum(1 for n in kv_heads if not n) if ssm_state else None
        kv_heads = [max(kv_heads)]
    elif ssm_state:
        recurrent = blocks  # a pure state-space model
    window = arch_key("attention.sliding_window")
    return GgufHeader(
        architecture=arch,
        native_ctx=arch_key("context_length"),
        block_count=blocks,
        head_count_kv=(kv_heads[0] if kv_heads else None)
        or (None if recurrent == blocks else heads),
        key_length=arch_key("attention.key_length") or head_dim,
        value_length=arch_key("attention.value_length") or head_dim,
        architecture_type=_scalar(reader, "general.type"),
        pooling_type=arch_key("pooling_type"),
        sliding_window=window or None,
        swa_layers=_swa_layers(reader, arch, blocks) if window else None,
        recurrent_layers=recurrent,
        recurrent_state_bytes=ssm_state if recurrent else None,
        expert_count=arch_key("expert_count"),
    )


def _swa_layers(reader: Any, arch: str, blocks: int | None) -> int | None:
    """How many layers slide: the per-layer pattern when the header has one, else the
    architecture's fixed period; None when unknown (counted as full attention: safe)."""
    pattern = _values(reader, f"{arch}.attention.sliding_window_pattern")
    if pattern is not None and len(pattern) > 1:
        return sum(1 for sliding in pattern if sliding)
    period = pattern[0] if pattern else SWA_PATTERNS.get(arch)
    if not blocks or not period or period < 1:
        return None
    return sum(1 for layer in range(blocks) if layer % period < period - 1)


def _ssm_state_bytes(arch_key: Any) -> int | None:
    """One recurrent layer's state per sequence (conv + SSM state, f32), as llama.cpp sizes it."""
    d_conv, d_inner = arch_key("ssm.conv_kernel"), arch_key("ssm.inner_size")
    d_state, groups = arch_key("ssm.state_size"), arch_key("ssm.group_count") or 0
    if not (d_conv and d_inner and d_state):
        return None
    conv = (d_conv - 1) * (d_inner + 2 * groups * d_state)
    return int((conv + d_state * d_inner) * 4)
