"""Admission: will a load fit in memory? Decided before the running server is killed (pure).

need      = weights (GGUF file + projector) + KV cache for the least context the server will
            get (explicit, else the planner's auto-fit floor) + a fixed runtime allowance
            (compute buffers, CUDA context, HTTP server).
available = free VRAM + available RAM + what the server being replaced will release.

VRAM and RAM are pooled on purpose: llama-server offloads what does not fit on the GPU to
the CPU, so a load that fits neither is the one that OOMs the host — the case to refuse.
The estimate is deliberately simple and journaled with every term, so a postmortem can show
why a load was refused or admitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from engine.core.events import LoadSpec, ResolvedModel
from engine.core.rules import SHADOW_GROUPS, split_flags

MIB: Final = 1024 * 1024
# Compute buffers, the CUDA/runtime context and the server itself; a conservative allowance.
RUNTIME_OVERHEAD_BYTES: Final = 512 * MIB
# When the header does not say (no context_length key), llama-server's own default.
FALLBACK_CONTEXT: Final = 4096
# An auto-fitted context never goes below min(this, native) (the Studio planner's floor).
AUTO_CONTEXT_FLOOR: Final = 4096

# Bytes per element of each KV cache type (block formats: block bytes / block elements).
KV_BYTES_PER_ELEMENT: Final[dict[str, float]] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
DEFAULT_KV_TYPE: Final = "f16"

Verdict = Literal["fits", "refused", "forced"]


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """What the host has now, and what killing the current server would give back."""

    free_vram_bytes: int
    available_ram_bytes: int
    releasable_bytes: int = 0
    limit_bytes: int | None = None  # an operator's cap on what the slot may use

    @property
    def total(self) -> int:
        measured = self.free_vram_bytes + self.available_ram_bytes + self.releasable_bytes
        return measured if self.limit_bytes is None else min(measured, self.limit_bytes)


@dataclass(frozen=True, slots=True)
class Estimate:
    context: int
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int

    @property
    def need(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


def explicit_context(
    spec: LoadSpec, extra_args: tuple[str, ...], native_ctx: int | None
) -> int | None:
    """The context the load pins down, or None when it leaves it to the planner.

    A `-c` in the extras wins (it comes last on the command line); `max_seq_length=0` and
    `-c 0` mean the model's native context, an explicit request like any other.
    `extra_args` are canonical (engine.core.policy): `-c 8` arrives as `--ctx-size 8`.
    """
    requested = spec.max_seq_length
    for run in split_flags(extra_args):
        in_group = run[0] in SHADOW_GROUPS["max_seq_length"] and len(run) > 1
        if in_group and run[1].isascii() and run[1].isdigit():
            requested = int(run[1])
    if requested is None:
        return None
    return requested or native_ctx or FALLBACK_CONTEXT


def context_floor(native_ctx: int | None) -> int:
    """The least an auto-fitted context gets: min(4096, native)."""
    return min(AUTO_CONTEXT_FLOOR, native_ctx or FALLBACK_CONTEXT)


def server_context(spec: LoadSpec, extra_args: tuple[str, ...], native_ctx: int | None) -> int:
    """The least context the server will get: the explicit one, else the auto-fit floor
    (the planner only ever grows an auto-fitted context from there)."""
    explicit = explicit_context(spec, extra_args, native_ctx)
    return explicit if explicit is not None else context_floor(native_ctx)


def kv_cache_bytes(
    model: ResolvedModel, context: int, cache_type: str | None, slots: int = 1
) -> int:
    """KV cache plus recurrent state for `context` tokens shared by `slots` sequences.

    Full-attention layers: context x KV heads x (dk + dv) x cache-type bytes. Sliding-window
    layers hold at most the window per sequence. Recurrent (SSM) layers hold a fixed state
    per sequence instead of a KV cache. The one arithmetic admission and the planner share.
    """
    recurrent = model.recurrent_layers or 0
    state = recurrent * (model.recurrent_state_bytes or 0) * slots
    if not (model.block_count and model.head_count_kv and model.key_length):
        return state  # attention geometry unknown (not in the header): state only
    per_element = KV_BYTES_PER_ELEMENT[cache_type or DEFAULT_KV_TYPE]
    value_length = model.value_length or model.key_length
    per_layer_token = model.head_count_kv * (model.key_length + value_length)
    attention = max(model.block_count - recurrent, 0)
    windowed = min(model.swa_layers or 0, attention) if model.sliding_window else 0
    window_tokens = min(context, (model.sliding_window or 0) * slots)
    tokens = context * (attention - windowed) + window_tokens * windowed
    return int(tokens * per_layer_token * per_element) + state


def estimate(model: ResolvedModel, spec: LoadSpec, extra_args: tuple[str, ...]) -> Estimate:
    context = server_context(spec, extra_args, model.native_ctx)
    return Estimate(
        context=context,
        weights_bytes=weights_bytes(model),
        kv_cache_bytes=kv_cache_bytes(model, context, spec.cache_type_kv),
        overhead_bytes=RUNTIME_OVERHEAD_BYTES,
    )


def weights_bytes(model: ResolvedModel) -> int:
    return model.size_bytes + model.mmproj_size_bytes


def verdict(need: int, budget: MemoryBudget, force: bool) -> Verdict:
    if need <= budget.total:
        return "fits"
    return "forced" if force else "refused"


def refusal_message(need: int, budget: MemoryBudget) -> str:
    cap = (
        f", capped by memory_limit at {budget.limit_bytes / MIB:,.0f}"
        if budget.limit_bytes is not None
        else ""
    )
    return (
        f"not enough memory for this load: needs ~{need / MIB:,.0f} MiB, "
        f"{budget.total / MIB:,.0f} MiB available (free VRAM {budget.free_vram_bytes / MIB:,.0f}"
        f" + available RAM {budget.available_ram_bytes / MIB:,.0f} + released by the current "
        f"server {budget.releasable_bytes / MIB:,.0f}{cap}); lower max_seq_length, pick a "
        "smaller variant or KV cache type, or pass force=True"
    )
