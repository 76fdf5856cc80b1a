"""Admission: will a load fit in memory? Decided before the running server is killed (pure).

need      = weights (GGUF file + projector) + KV cache for the context the server will get
            + a fixed runtime allowance (compute buffers, CUDA context, HTTP server).
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


def server_context(spec: LoadSpec, extra_args: tuple[str, ...], native_ctx: int | None) -> int:
    """The context llama-server will allocate: a `-c` in the extras wins (it comes last).

    `extra_args` are canonical (engine.core.policy): `-c 8` arrives as `--ctx-size 8`.
    """
    requested = spec.max_seq_length or 0
    for run in split_flags(extra_args):
        in_group = run[0] in SHADOW_GROUPS["max_seq_length"] and len(run) > 1
        if in_group and run[1].isascii() and run[1].isdigit():
            requested = int(run[1])
    return requested or native_ctx or FALLBACK_CONTEXT


def kv_cache_bytes(model: ResolvedModel, context: int, cache_type: str | None) -> int:
    """K and V for every layer and KV head: context x layers x heads x (dk*bk + dv*bv)."""
    if not (model.block_count and model.head_count_kv and model.key_length):
        return 0  # geometry unknown (not in the header): weights and overhead only
    per_element = KV_BYTES_PER_ELEMENT[cache_type or DEFAULT_KV_TYPE]
    value_length = model.value_length or model.key_length
    per_token = model.block_count * model.head_count_kv * (model.key_length + value_length)
    return int(context * per_token * per_element)


def estimate(model: ResolvedModel, spec: LoadSpec, extra_args: tuple[str, ...]) -> Estimate:
    context = server_context(spec, extra_args, model.native_ctx)
    return Estimate(
        context=context,
        weights_bytes=model.size_bytes + model.mmproj_size_bytes,
        kv_cache_bytes=kv_cache_bytes(model, context, spec.cache_type_kv),
        overhead_bytes=RUNTIME_OVERHEAD_BYTES,
    )


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
