"""Launch planning (pure): context, GPU placement, offload flags and parallel slots.

`plan_launch(model, inventory, request, policy) -> LaunchPlan` is one deterministic function
whose inputs and output are journaled together (`launch_planned`), so a postmortem can say
why a load got 8192 tokens on GPU 1. The rules follow the Studio backend's planner:

* Budget per device = free - max((1 - f) x total, min(512 MiB, 3 % of total)), f = 0.97 by
  default. On a host without GPUs the RAM budget (cgroup-aware) plays the GPU's role.
* Need = weights + KV cache (`admission.kv_cache_bytes`, the one KV arithmetic) + the runtime
  allowance; each device beyond the first costs another 1024 MiB.
* Context: an explicit one is never shrunk. Otherwise the largest 256-aligned context <=
  native that fits, never below min(4096, native).
* Placement: devices ranked by budget; the fewest top-ranked that hold the plan. Fits ->
  `-ngl -1 --fit off` and CUDA_VISIBLE_DEVICES; fits nowhere -> `--fit on --fit-target 1024`
  (llama-server offloads part of the model to the CPU).
* Slots: the request's, else 4 with `--kv-unified` when the binary supports it (else 1);
  a default is halved while that keeps the model fully on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from engine.core.admission import (
    FALLBACK_CONTEXT,
    MIB,
    RUNTIME_OVERHEAD_BYTES,
    context_floor,
    kv_cache_bytes,
    weights_bytes,
)
from engine.core.events import (
    DeviceBudget,
    Inventory,
    LaunchPlan,
    ModelKind,
    PlanPolicy,
    PlanRequest,
    ResolvedModel,
)

ALIGN: Final = 256
RESERVE_CAP_BYTES: Final = 512 * MIB
RESERVE_FRACTION: Final = 0.03
EXTRA_DEVICE_BYTES: Final = 1024 * MIB
FIT_TARGET_MIB: Final = 1024
UNIFIED_DEFAULT_SLOTS: Final = 4
HOST_RAM: Final = -1  # the device index of host RAM on a CPU-only host


def device_budget(total: int, free: int, fit_fraction: float) -> int:
    reserve = (1.0 - fit_fraction) * total
    floor = RESERVE_FRACTION * total
    if floor > RESERVE_CAP_BYTES:
        floor = RESERVE_CAP_BYTES
    budget = int(free - (reserve if reserve > floor else floor))
    return budget if budget > 0 else 0


def _gib(n: int) -> str:
    return f"{n / (1024 * MIB):.1f} GiB"


def _names(indices: Sequence[int]) -> str:
    if list(indices) == [HOST_RAM]:
        return "host RAM"
    return ("GPU " if len(indices) == 1 else "GPUs ") + ",".join(map(str, indices))


def plan_launch(
    model: ResolvedModel, inventory: Inventory, request: PlanRequest, policy: PlanPolicy
) -> LaunchPlan:
    native = model.native_ctx or FALLBACK_CONTEXT
    floor = context_floor(model.native_ctx)
    weights = weights_bytes(model)
    cache = request.cache_type_kv
    gpu_host = bool(inventory.gpus)
    if gpu_host:
        budgets = [
            (g.index, device_budget(g.total_bytes, g.free_bytes, policy.fit_fraction))
            for g in inventory.gpus
        ]
    else:
        ram = device_budget(
            inventory.ram_total_bytes, inventory.ram_available_bytes, policy.fit_fraction
        )
        budgets = [(HOST_RAM, ram)]
    ranked = sorted(budgets, key=lambda d: (-d[1], d[0]))
    # capacity[k-1]: what the top k devices hold together, less the extra-device allowance.
    capacity: list[int] = []
    running = 0
    for k, (_, budget) in enumerate(ranked, start=1):
        running += budget
        capacity.append(running - EXTRA_DEVICE_BYTES * (k - 1))
    best = max(capacity)

    needs: dict[tuple[int, int], int] = {}  # the search asks for the same sizes again

    def need(context: int, slots: int) -> int:
        key = (context, slots)
        if key not in needs:
            kv = kv_cache_bytes(model, context, cache, slots)
            needs[key] = weights + kv + RUNTIME_OVERHEAD_BYTES
        return needs[key]

    def fewest(context: int, slots: int) -> int | None:
        wanted = need(context, slots)
        return next((k for k, cap in enumerate(capacity, start=1) if wanted <= cap), None)

    def ceiling(slots: int) -> int | None:
        """The largest aligned context <= native (or the floor) that fits somewhere."""
        if need(floor, slots) > best:
            return None
        low, high = -(-floor // ALIGN), native // ALIGN  # candidate multiples of ALIGN
        if high < low or need(low * ALIGN, slots) > best:
            return floor
        if need(high * ALIGN, slots) <= best:
            return high * ALIGN  # the whole native context fits: the common case
        while low < high:  # KV grows with the context: the largest fitting multiple
            middle = (low + high + 1) // 2
            if need(middle * ALIGN, slots) <= best:
                low = middle
            else:
                high = middle - 1
        return low * ALIGN

    if request.parallel_slots is not None:
        slot_choices = [request.parallel_slots]
    elif policy.supports_kv_unified:
        slot_choices = [UNIFIED_DEFAULT_SLOTS, 2, 1]  # halved only while that fits
    else:
        slot_choices = [1]

    chosen: tuple[int, int, int, int] | None = None  # (context, slots, devices, ceiling)
    for choice in slot_choices:
        fit_top = ceiling(choice)
        fit_context = request.context if request.context is not None else fit_top
        if fit_context is None:
            continue
        fit_devices = fewest(fit_context, choice)
        if fit_devices is not None:
            top_or_asked = fit_top if fit_top is not None else fit_context
            chosen = (fit_context, choice, fit_devices, top_or_asked)
            break

    notes: list[str] = []
    if chosen is not None:
        context, slots, k, top = chosen
        devices = [index for index, _ in ranked[:k]]
        wanted = need(context, slots) + EXTRA_DEVICE_BYTES * (k - 1)
        planned = _split(wanted, [b for _, b in ranked[:k]])
        share = dict(zip(devices, planned, strict=True))
        offload = "full" if gpu_host else "cpu"
        flags: tuple[str, ...] = ()
        if gpu_host:
            flags = ("-ngl", "-1", "--fit", "off") if policy.supports_fit else ("-ngl", "-1")
        how = "explicit" if request.context is not None else "auto-fit"
        notes.append(
            f"{how} context {context} of {native} native fits on {_names(devices)} "
            f"(need {_gib(wanted)} of {_gib(sum(b for _, b in ranked[:k]))} budget)"
        )
        if slots != slot_choices[0]:
            where = "on the GPU" if gpu_host else "in RAM"
            notes.append(f"{slots} slots instead of {slot_choices[0]} to fit fully {where}")
    else:
        slots = slot_choices[0]
        context = request.context if request.context is not None else floor
        top = ceiling(slots) or context  # what would have fitted, for the user to pick
        share = {}
        wanted = need(context, slots)
        if gpu_host:
            devices = [index for index, _ in ranked]
            offload = "partial"
            flags = (
                ("--fit", "on", "--fit-target", str(FIT_TARGET_MIB)) if policy.supports_fit else ()
            )
            notes.append(
                f"context {context} needs {_gib(wanted)}, more than any GPU set holds "
                f"({_gib(best)}): partial offload to the CPU"
            )
        else:
            devices, offload, flags = [], "cpu", ()
            notes.append(
                f"context {context} needs {_gib(wanted)}, more than the RAM budget ({_gib(best)})"
            )
    kv_unified = policy.supports_kv_unified and slots > 1
    return LaunchPlan(
        context=context,
        max_context=top,
        native_context=native,
        parallel_slots=slots,
        kv_unified=kv_unified,
        gpus=tuple(devices) if gpu_host else (),
        offload=offload,
        flags=flags,
        devices=tuple(
            DeviceBudget(index=index, budget_bytes=budget, planned_bytes=share.get(index, 0))
            for index, budget in budgets
        ),
        weights_bytes=weights,
        kv_cache_bytes=need(context, slots) - weights - RUNTIME_OVERHEAD_BYTES,
        need_bytes=wanted,
        reason="; ".join(notes),
    )


def _split(total: int, budgets: list[int]) -> list[int]:
    """`total` shared in proportion to `budgets` (llama.cpp splits layers by free memory);
    never more than a device's budget when `total` fits their sum."""
    whole = sum(budgets)
    if whole == 0:
        return [total] + [0] * (len(budgets) - 1)
    shares = [total * b // whole for b in budgets]
    for i in range(total - sum(shares)):  # the rounding remainder: fewer units than devices
        shares[i] += 1
    return shares


def model_kind(
    architecture: str | None, architecture_type: str | None, pooling_type: int | None
) -> ModelKind:
    """What a GGUF is from its header: a projector, an embedding or rerank model, or chat."""
    if architecture == "clip" or architecture_type in ("mmproj", "projector"):
        return "projector"
    if pooling_type == 4:  # LLAMA_POOLING_TYPE_RANK
        return "rerank"
    if pooling_type in (1, 2, 3):  # mean, cls, last
        return "embedding"
    return "chat"


def unservable(model: ResolvedModel, lists_architecture: bool | None) -> str | None:
    """Why this binary cannot serve `model`, known before the running server is touched."""
    if model.kind == "projector":
        return (
            f"{model.model_file} is a multimodal projector (mmproj), not a model: load the "
            "model GGUF; its projector is picked up beside it"
        )
    if lists_architecture is False:
        return (
            f"{model.model_file}: architecture {model.architecture!r} is not supported by this "
            "llama-server build; update llama.cpp"
        )
    return None
