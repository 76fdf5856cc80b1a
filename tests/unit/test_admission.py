"""Admission: the memory estimate and verdict (pure), and what the engine does with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.core import events as ev
from engine.core.admission import (
    MIB,
    RUNTIME_OVERHEAD_BYTES,
    MemoryBudget,
    estimate,
    kv_cache_bytes,
    server_context,
    verdict,
)
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from tests.fakes import FakeEffects

# A Llama-3-8B-like geometry: 32 layers, 8 KV heads of 128 dims, 8k native context.
LLAMA = ev.ResolvedModel(
    source="file:/m.gguf",
    model_file="/m.gguf",
    native_ctx=8192,
    size_bytes=4_900 * MIB,
    block_count=32,
    head_count_kv=8,
    key_length=128,
    value_length=128,
)


def spec(**fields: object) -> ev.LoadSpec:
    return ev.LoadSpec(model="/m.gguf", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("requested", "extras", "native", "expected"),
    [
        (None, (), 8192, 4096),  # not set: the planner's auto-fit floor, min(4096, native)
        (None, (), 131072, 4096),  # a 128k model is admitted on what it will at least get
        (None, (), 2048, 2048),
        (0, (), 8192, 8192),  # 0 = native: an explicit request, never shrunk
        (4096, (), 8192, 4096),
        (None, ("--ctx-size", "2048"), 8192, 2048),  # an inherited -c is what it gets
        (4096, ("--ctx-size", "1024"), 8192, 1024),  # extras come last and win
        (None, (), None, 4096),  # header silent: llama-server's default
    ],
)
def test_server_context(
    requested: int | None, extras: tuple[str, ...], native: int | None, expected: int
) -> None:
    assert server_context(spec(max_seq_length=requested), extras, native) == expected


@pytest.mark.parametrize(
    ("cache_type", "mib"),
    [(None, 1024), ("f16", 1024), ("q8_0", 544), ("q4_0", 288), ("f32", 2048)],
)
def test_kv_cache_size_follows_the_header_and_cache_type(cache_type: str | None, mib: int) -> None:
    # 8192 tokens x 32 layers x 8 heads x (128 + 128) x 2 bytes = 1 GiB at f16.
    assert kv_cache_bytes(LLAMA, 8192, cache_type) == mib * MIB


def test_unknown_geometry_counts_weights_and_overhead_only() -> None:
    bare = LLAMA.model_copy(update={"block_count": None})
    need = estimate(bare, spec(), ())
    assert need.kv_cache_bytes == 0
    assert need.need == bare.size_bytes + RUNTIME_OVERHEAD_BYTES


def test_estimate_adds_weights_projector_kv_and_overhead() -> None:
    vision = LLAMA.model_copy(update={"mmproj_size_bytes": 600 * MIB})
    need = estimate(vision, spec(max_seq_length=4096, cache_type_kv="f16"), ())
    assert need.need == (4_900 + 600 + 512) * MIB + RUNTIME_OVERHEAD_BYTES


@pytest.mark.parametrize(
    ("need", "budget", "force", "expected"),
    [
        (10, MemoryBudget(5, 5), False, "fits"),
        (11, MemoryBudget(5, 5), False, "refused"),
        (11, MemoryBudget(5, 5, releasable_bytes=1), False, "fits"),  # the old server's memory
        (11, MemoryBudget(5, 5), True, "forced"),
    ],
)
def test_verdict(need: int, budget: MemoryBudget, force: bool, expected: str) -> None:
    assert verdict(need, budget, force) == expected


def _admissions(engine: Engine) -> list[ev.AdmissionChecked]:
    events = [r.event for r in engine.journal.read(engine.slot)]
    return [e for e in events if isinstance(e, ev.AdmissionChecked)]


def test_a_refused_load_keeps_the_old_server_serving(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, tmp_path: Path
) -> None:
    engine, effects = fake_engine
    first = engine.load(LoadRequest(model_path=str(tiny_model)))
    assert first.status == "loaded"
    effects.available_ram = 1 * MIB  # the host is nearly out of memory
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_model.read_bytes())
    refused = engine.load(LoadRequest(model_path=str(other)))
    assert refused.status == "failed" and refused.pid == first.pid
    assert "not enough memory for this load" in (refused.error or "")
    status = engine.status()
    assert (status.state, status.pid, status.model_file) == ("ready", first.pid, str(tiny_model))
    assert effects.alive[first.pid or 0] and len(effects.spawned) == 1
    last = _admissions(engine)[-1]
    assert last.verdict == "refused" and last.need_bytes > last.available_ram_bytes


def test_force_skips_the_refusal_but_journals_it(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    effects.available_ram = 1 * MIB
    result = engine.load(LoadRequest(model_path=str(tiny_model), force=True))
    assert result.status == "loaded"
    assert _admissions(engine)[-1].verdict == "forced"


def test_a_refused_cold_load_fails_and_the_next_one_can_proceed(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    effects.available_ram = 1 * MIB
    assert engine.load(LoadRequest(model_path=str(tiny_model))).status == "failed"
    assert engine.status().state == "failed"
    effects.available_ram = 64 << 30
    assert engine.load(LoadRequest(model_path=str(tiny_model))).status == "loaded"


def test_a_memory_limit_caps_what_is_available_and_is_named() -> None:
    from engine.core.admission import refusal_message

    capped = MemoryBudget(8 << 30, 8 << 30, releasable_bytes=1 << 30, limit_bytes=1 << 30)
    assert capped.total == 1 << 30
    assert verdict(2 << 30, capped, force=False) == "refused"
    assert "capped by memory_limit at 1,024" in refusal_message(2 << 30, capped)
    assert MemoryBudget(1, 2, 3, limit_bytes=None).total == 6
