"""plan_launch: tables of known cases and properties over synthetic hosts and model shapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import events as ev
from engine.core.admission import MIB, RUNTIME_OVERHEAD_BYTES, kv_cache_bytes
from engine.core.plan import (
    ALIGN,
    EXTRA_DEVICE_BYTES,
    device_budget,
    model_kind,
    plan_launch,
    unservable,
)

GIB = 1024 * MIB

# Llama-3-8B-like: 32 layers, 8 KV heads x 128 dims, 4.9 GiB of Q4 weights, 128k native.
LLAMA = ev.ResolvedModel(
    source="file:/m.gguf",
    model_file="/m.gguf",
    native_ctx=131072,
    size_bytes=int(4.9 * GIB),
    block_count=32,
    head_count_kv=8,
    key_length=128,
    value_length=128,
)
KV_PER_TOKEN = 32 * 8 * 256 * 2  # f16: 128 KiB per token
UNIFIED = ev.PlanPolicy(supports_kv_unified=True, supports_fit=True)
PLAIN = ev.PlanPolicy()


def gpu(index: int, total_gib: float, free_gib: float) -> ev.GpuInfo:
    return ev.GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        total_bytes=int(total_gib * GIB),
        free_bytes=int(free_gib * GIB),
    )


def host(*gpus: ev.GpuInfo, ram_gib: float = 64) -> ev.Inventory:
    ram = int(ram_gib * GIB)
    return ev.Inventory(gpus=gpus, ram_total_bytes=ram, ram_available_bytes=ram)


def need(model: ev.ResolvedModel, context: int, slots: int = 1) -> int:
    weights = model.size_bytes + model.mmproj_size_bytes
    return weights + kv_cache_bytes(model, context, None, slots) + RUNTIME_OVERHEAD_BYTES


# --- tables -----------------------------------------------------------------------------------


def test_budget_keeps_the_larger_of_the_fraction_and_the_capped_reserve() -> None:
    # 80 GiB: (1 - 0.97) x 80 GiB = 2.4 GiB > min(512 MiB, 2.4 GiB) = 512 MiB.
    expected = 70 * GIB - 0.03 * 80 * GIB
    assert abs(device_budget(80 * GIB, 70 * GIB, 0.97) - expected) <= 1  # float rounding
    # f = 1.0: only min(512 MiB, 3 %) is kept back.
    assert device_budget(80 * GIB, 70 * GIB, 1.0) == 70 * GIB - 512 * MIB
    assert device_budget(8 * GIB, 0, 0.97) == 0


def test_auto_fit_takes_the_largest_aligned_context_that_fits_one_gpu() -> None:
    plan = plan_launch(LLAMA, host(gpu(0, 16, 16)), ev.PlanRequest(), PLAIN)
    budget = device_budget(16 * GIB, 16 * GIB, 0.97)
    assert plan.context % ALIGN == 0
    assert need(LLAMA, plan.context) <= budget < need(LLAMA, plan.context + ALIGN)
    assert plan.max_context == plan.context < LLAMA.native_ctx  # type: ignore[operator]
    assert plan.gpus == (0,) and plan.offload == "full"
    assert plan.flags == ("-ngl", "-1")  # no --fit: this binary has none
    assert "auto-fit context" in plan.reason


def test_native_context_when_it_fits() -> None:
    small = LLAMA.model_copy(update={"native_ctx": 8192})
    plan = plan_launch(small, host(gpu(0, 80, 80)), ev.PlanRequest(), UNIFIED)
    assert (plan.context, plan.max_context, plan.native_context) == (8192, 8192, 8192)
    assert plan.flags == ("-ngl", "-1", "--fit", "off")
    assert (plan.parallel_slots, plan.kv_unified) == (4, True)


def test_an_explicit_context_is_never_shrunk_it_offloads_instead() -> None:
    plan = plan_launch(LLAMA, host(gpu(0, 16, 16)), ev.PlanRequest(context=131072), UNIFIED)
    assert plan.context == 131072
    assert plan.offload == "partial"
    assert plan.flags == ("--fit", "on", "--fit-target", "1024")
    assert plan.max_context < 131072  # the ceiling says what would have fit


def test_the_larger_gpu_alone_when_the_model_fits_only_there() -> None:
    request = ev.PlanRequest(context=32768)  # 4 GiB of KV + 4.9 GiB weights + 0.5 GiB
    plan = plan_launch(LLAMA, host(gpu(0, 8, 8), gpu(1, 24, 20)), request, UNIFIED)
    assert plan.gpus == (1,) and plan.offload == "full"
    chosen = {d.index: d for d in plan.devices}
    assert chosen[0].planned_bytes == 0
    assert chosen[1].planned_bytes == need(LLAMA, 32768, plan.parallel_slots)


def test_two_gpus_when_one_is_not_enough_with_the_extra_device_allowance() -> None:
    request = ev.PlanRequest(context=65536)  # 8 GiB of KV: 13.4 GiB in all
    plan = plan_launch(LLAMA, host(gpu(0, 12, 12), gpu(1, 12, 11)), request, PLAIN)
    assert plan.gpus == (0, 1)  # ranked: the freer first (CUDA device 0)
    assert plan.need_bytes == need(LLAMA, 65536) + EXTRA_DEVICE_BYTES
    for device in plan.devices:
        assert 0 < device.planned_bytes <= device.budget_bytes


def test_fits_nowhere_is_partial_offload_with_fit_on() -> None:
    plan = plan_launch(LLAMA, host(gpu(0, 4, 4), gpu(1, 4, 3)), ev.PlanRequest(), UNIFIED)
    assert plan.offload == "partial"
    assert plan.context == 4096  # the floor
    assert plan.flags == ("--fit", "on", "--fit-target", "1024")
    assert plan.gpus == (0, 1)
    assert all(d.planned_bytes == 0 for d in plan.devices)


def test_cpu_only_host_plans_against_the_ram_budget() -> None:
    plan = plan_launch(LLAMA, host(ram_gib=16), ev.PlanRequest(), PLAIN)
    assert plan.offload == "cpu" and plan.gpus == () and plan.flags == ()
    (ram,) = plan.devices
    assert ram.index == -1 and need(LLAMA, plan.context) <= ram.budget_bytes
    assert 4096 <= plan.context < 131072


def test_cgroup_limited_ram_shrinks_the_context() -> None:
    roomy = plan_launch(LLAMA, host(ram_gib=64), ev.PlanRequest(), PLAIN)
    limited = plan_launch(LLAMA, host(ram_gib=8), ev.PlanRequest(), PLAIN)
    assert limited.context < roomy.context


def test_default_slots_are_halved_to_stay_on_the_gpu() -> None:
    # A hybrid model: recurrent state costs per slot, so 4 slots do not fit where 2 do.
    hybrid = LLAMA.model_copy(
        update={"native_ctx": 4096, "recurrent_layers": 24, "recurrent_state_bytes": 40 * MIB}
    )
    budget_gib = (need(hybrid, 4096, 2) + 0.1 * GIB) / GIB
    inventory = host(gpu(0, 80, budget_gib + 2.4))  # 2.4 GiB: the 3 % reserve of 80 GiB
    plan = plan_launch(hybrid, inventory, ev.PlanRequest(), UNIFIED)
    assert (plan.parallel_slots, plan.offload) == (2, "full")
    assert "2 slots instead of 4" in plan.reason
    # An explicit slot count is the user's: never reduced.
    asked = plan_launch(hybrid, inventory, ev.PlanRequest(parallel_slots=4), UNIFIED)
    assert (asked.parallel_slots, asked.offload) == (4, "partial")


def test_one_slot_and_no_kv_unified_when_the_binary_lacks_it() -> None:
    plan = plan_launch(LLAMA, host(gpu(0, 80, 80)), ev.PlanRequest(), PLAIN)
    assert (plan.parallel_slots, plan.kv_unified) == (1, False)


def test_sliding_window_layers_cost_the_window_not_the_context() -> None:
    gemma = LLAMA.model_copy(update={"sliding_window": 1024, "swa_layers": 24})
    full = kv_cache_bytes(LLAMA, 32768, None)
    windowed = kv_cache_bytes(gemma, 32768, None)
    per_layer_token = 8 * 256 * 2
    assert windowed == (32768 * 8 + 1024 * 24) * per_layer_token < full
    assert kv_cache_bytes(gemma, 32768, None, slots=4) == (32768 * 8 + 4096 * 24) * 4096


def test_recurrent_layers_cost_a_fixed_state_per_sequence() -> None:
    mamba = ev.ResolvedModel(
        source="file:/s.gguf",
        model_file="/s.gguf",
        block_count=48,
        recurrent_layers=48,
        recurrent_state_bytes=MIB,
    )
    assert kv_cache_bytes(mamba, 4096, None) == kv_cache_bytes(mamba, 1 << 20, None) == 48 * MIB
    assert kv_cache_bytes(mamba, 4096, None, slots=4) == 4 * 48 * MIB


@pytest.mark.parametrize(
    ("architecture", "general_type", "pooling", "kind"),
    [
        ("clip", None, None, "projector"),
        ("llama", "mmproj", None, "projector"),
        ("bert", None, 1, "embedding"),
        ("qwen3", None, 4, "rerank"),
        ("qwen3", None, 0, "chat"),
        ("llama", "model", None, "chat"),
    ],
)
def test_model_kind_from_the_header(
    architecture: str, general_type: str | None, pooling: int | None, kind: str
) -> None:
    assert model_kind(architecture, general_type, pooling) == kind


def test_unservable_names_the_problem() -> None:
    projector = LLAMA.model_copy(update={"architecture": "clip", "kind": "projector"})
    assert "projector" in (unservable(projector, True) or "")
    novel = LLAMA.model_copy(update={"architecture": "llama9"})
    assert "'llama9' is not supported" in (unservable(novel, False) or "")
    assert unservable(novel, None) is None  # cannot tell: llama-server says it itself
    assert unservable(LLAMA, True) is None


# --- properties -------------------------------------------------------------------------------

NATIVE = st.sampled_from([1024, 2048, 3000, 4096, 8192, 32768, 40960, 131072, 262144, 1 << 20])


@st.composite
def models(draw: st.DrawFn) -> ev.ResolvedModel:
    layers = draw(st.integers(1, 96))
    kv_heads = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))  # GQA ... MHA
    recurrent = draw(st.sampled_from([0, 0, 0, layers * 3 // 4, layers]))
    window = draw(st.sampled_from([None, None, 512, 4096]))
    return ev.ResolvedModel(
        source="file:/m.gguf",
        model_file="/m.gguf",
        native_ctx=draw(NATIVE),
        size_bytes=draw(st.integers(100 * MIB, 200 * GIB)),
        block_count=layers,
        head_count_kv=kv_heads,
        key_length=draw(st.sampled_from([64, 128, 256])),
        value_length=draw(st.sampled_from([None, 64, 128, 512])),
        sliding_window=window,
        swa_layers=draw(st.integers(0, layers)) if window else None,
        recurrent_layers=recurrent or None,
        recurrent_state_bytes=draw(st.integers(1, 64 * MIB)) if recurrent else None,
        expert_count=draw(st.sampled_from([None, 8, 128])),  # MoE: weights are the file
    )


@st.composite
def inventories(draw: st.DrawFn) -> ev.Inventory:
    gpus = []
    for index in range(draw(st.integers(0, 8))):
        total = draw(st.sampled_from([4, 8, 12, 16, 24, 48, 80, 141])) * GIB
        gpus.append(
            ev.GpuInfo(
                index=index,
                total_bytes=total,
                free_bytes=draw(st.integers(0, total)),
            )
        )
    ram_total = draw(st.integers(1, 512)) * GIB  # a cgroup limit is just a smaller total
    return ev.Inventory(
        gpus=tuple(gpus),
        ram_total_bytes=ram_total,
        ram_available_bytes=draw(st.integers(0, ram_total)),
    )


REQUESTS = st.builds(
    ev.PlanRequest,
    context=st.one_of(st.none(), st.integers(1, 1 << 20)),
    parallel_slots=st.one_of(st.none(), st.integers(1, 64)),
    cache_type_kv=st.sampled_from([None, "f16", "q8_0", "q4_0", "f32"]),
)
POLICIES = st.builds(
    ev.PlanPolicy,
    fit_fraction=st.floats(0.80, 1.00),
    supports_kv_unified=st.booleans(),
    supports_fit=st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(models(), inventories(), REQUESTS, POLICIES)
def test_plan_properties(
    model: ev.ResolvedModel,
    inventory: ev.Inventory,
    request: ev.PlanRequest,
    policy: ev.PlanPolicy,
) -> None:
    plan = plan_launch(model, inventory, request, policy)
    native = model.native_ctx or 4096
    floor = min(4096, native)

    # An explicit context is never shrunk; an auto one is aligned (or the floor) and >= floor.
    if request.context is not None:
        assert plan.context == request.context
    else:
        assert plan.context >= floor and plan.context <= max(native, floor)
        assert plan.context % ALIGN == 0 or plan.context == floor
    assert "-c" not in plan.flags and plan.context > 0
    assert 1 <= plan.parallel_slots <= 64
    if request.parallel_slots is not None:
        assert plan.parallel_slots == request.parallel_slots
    assert plan.kv_unified == (policy.supports_kv_unified and plan.parallel_slots > 1)

    budgets = {d.index: d.budget_bytes for d in plan.devices}
    if plan.offload in ("full", "cpu") and any(d.planned_bytes for d in plan.devices):
        # It says "fits": no device gets more than its budget, and the shares add up.
        for device in plan.devices:
            assert device.planned_bytes <= device.budget_bytes
        assert sum(d.planned_bytes for d in plan.devices) == plan.need_bytes
        chosen = plan.gpus if inventory.gpus else (-1,)
        # Minimal: no smaller set holds it (the top-ranked set of a size is the roomiest).
        ranked = sorted(budgets.values(), reverse=True)
        alone = plan.need_bytes - EXTRA_DEVICE_BYTES * (len(chosen) - 1)
        for smaller in range(1, len(chosen)):
            assert alone + EXTRA_DEVICE_BYTES * (smaller - 1) > sum(ranked[:smaller])
        # Auto-fit: the next aligned step up would not have fit on any device set.
        if request.context is None and plan.context + ALIGN <= native:
            bigger = need_of(model, plan.context + ALIGN, request, plan.parallel_slots)
            assert all(
                bigger + EXTRA_DEVICE_BYTES * (k - 1) > sum(ranked[:k])
                for k in range(1, len(ranked) + 1)
            )
    if inventory.gpus:
        assert plan.offload in ("full", "partial")
        assert set(plan.gpus) <= {g.index for g in inventory.gpus}
        if plan.offload == "partial" and policy.supports_fit:
            assert plan.flags[:2] == ("--fit", "on")
    else:
        assert plan.offload == "cpu" and plan.gpus == () and plan.flags == ()


def need_of(model: ev.ResolvedModel, context: int, request: ev.PlanRequest, slots: int) -> int:
    weights = model.size_bytes + model.mmproj_size_bytes
    kv = kv_cache_bytes(model, context, request.cache_type_kv, slots)
    return weights + kv + RUNTIME_OVERHEAD_BYTES
