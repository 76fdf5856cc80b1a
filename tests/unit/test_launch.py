"""Launch planning through the engine, with the world faked at the Effects boundary."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.core import events as ev
from engine.core.cmdline import build_argv
from engine.orchestrator import Engine
from tests.conftest import rows
from tests.fakes import FakeEffects, fixture_capabilities


def journaled(journal_path: Path) -> list[ev.Event]:
    return [ev.parse_event(row[4]) for row in rows(journal_path)]


def flag_value(argv: tuple[str, ...], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_the_plan_is_journaled_between_admission_and_spawn(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, journal_path: Path
) -> None:
    engine, effects = fake_engine
    assert engine.load({"model_path": str(tiny_model)}).status == "loaded"
    types = [e.type for e in journaled(journal_path)]
    assert types.index("admission_checked") < types.index("launch_planned")
    assert types.index("settled") < types.index("launch_planned") < types.index("spawn_started")
    assert types.index("health_passed") < types.index("server_props_read")
    assert types.index("server_props_read") < types.index("load_succeeded")
    (planned,) = [e for e in journaled(journal_path) if isinstance(e, ev.LaunchPlanned)]
    assert planned.policy.supports_kv_unified and planned.policy.supports_fit
    assert planned.request.context is None  # nothing pinned: auto-fit
    argv = effects.spawned[-1]
    assert flag_value(argv, "-c") == str(planned.plan.context) == "8192"  # native fits in RAM
    assert flag_value(argv, "--parallel") == "4" and "--kv-unified" in argv


def test_status_reports_the_servers_own_figures(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    engine.load({"model_path": str(tiny_model), "max_seq_length": 2048, "parallel_slots": 2})
    status = engine.status()
    assert status.context_length == 2048  # from /props (the fake answers what argv said)
    assert (status.max_context_length, status.native_context_length) == (8192, 8192)
    assert status.parallel_slots == 2
    assert (status.offload, status.gpus, status.kind) == ("cpu", (), "chat")
    assert effects.spawn_env[-1] is None  # CPU-only: no CUDA_VISIBLE_DEVICES


def test_max_seq_length_zero_is_an_explicit_native_request_never_c_0(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    effects.available_ram = 1 << 30  # 1 GiB: auto-fit would not keep 8192 (unknown geometry)
    engine.load({"model_path": str(tiny_model), "max_seq_length": 0})
    argv = effects.spawned[-1]
    assert flag_value(argv, "-c") == "8192"


def test_gpu_host_pins_the_planned_gpu(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    effects.gpus = [(0, 400), (1, 20_000)]  # only GPU 1 holds weights + KV + 512 MiB
    engine.load({"model_path": str(tiny_model)})
    assert effects.spawn_env[-1] == {"CUDA_VISIBLE_DEVICES": "1"}
    argv = effects.spawned[-1]
    assert argv[argv.index("-ngl") : argv.index("-ngl") + 4] == ("-ngl", "-1", "--fit", "off")
    status = engine.status()
    assert (status.gpus, status.offload) == ((1,), "full")


def test_extra_args_shadow_the_planned_flags_and_come_last(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, journal_path: Path
) -> None:
    engine, effects = fake_engine
    effects.gpus = [(0, 20_000)]
    extras = ["-ngl", "10", "-c", "1024"]
    engine.load({"model_path": str(tiny_model), "llama_extra_args": extras})
    argv = effects.spawned[-1]
    assert argv[-4:] == ("--gpu-layers", "10", "--ctx-size", "1024")  # canonical, last
    assert "-ngl" not in argv and "-c" not in argv  # ours are shadowed
    assert "--fit" in argv  # not shadowed: the user did not set it
    (planned,) = [e for e in journaled(journal_path) if isinstance(e, ev.LaunchPlanned)]
    assert planned.request.context == 1024  # the extras' -c is an explicit context


def test_parallel_slots_is_part_of_the_target(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    assert engine.load({"model_path": str(tiny_model)}).status == "loaded"
    assert engine.load({"model_path": str(tiny_model)}).status == "already_loaded"
    again = engine.load({"model_path": str(tiny_model), "parallel_slots": 8})
    assert again.status == "loaded"
    assert flag_value(effects.spawned[-1], "--parallel") == "8"
    with pytest.raises(ValueError, match=r"parallel_slots: must be in 1\.\.64"):
        engine.load({"model_path": str(tiny_model), "parallel_slots": 65})


def test_a_changed_binary_reloads_an_identical_load(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, journal_path: Path
) -> None:
    engine, effects = fake_engine
    engine.load({"model_path": str(tiny_model)})
    assert engine.load({"model_path": str(tiny_model)}).status == "already_loaded"
    effects.binary_id = effects.binary_id.model_copy(update={"mtime_ns": 2, "version": "2"})
    result = engine.load({"model_path": str(tiny_model)})
    assert result.status == "loaded" and len(effects.spawned) == 2
    requested = [e for e in journaled(journal_path) if isinstance(e, ev.LoadRequested)]
    assert [e.reason for e in requested] == [None, "binary_changed"]
    spawns = [e for e in journaled(journal_path) if isinstance(e, ev.SpawnStarted)]
    assert spawns[-1].binary == effects.binary_id


def test_a_projector_is_refused_before_the_running_server_is_touched(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, tmp_path: Path
) -> None:
    engine, effects = fake_engine
    engine.load({"model_path": str(tiny_model)})
    serving = engine.status().pid
    projector = tmp_path / "mmproj-model-f16.gguf"
    projector.write_bytes(b"GGUF")
    result = engine.load({"model_path": str(projector)})
    assert result.status == "failed"
    assert "multimodal projector (mmproj), not a model" in (result.error or "")
    status = engine.status()
    assert (status.state, status.pid) == ("ready", serving)
    assert effects.alive[serving] and len(effects.spawned) == 1


def test_an_architecture_the_binary_does_not_list_is_refused(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    effects.known_architectures = {"qwen3"}
    result = engine.load({"model_path": str(tiny_model)})
    assert result.status == "failed"
    assert "architecture 'llama' is not supported by this llama-server build" in (
        result.error or ""
    )
    assert effects.spawned == []


def test_an_embedding_model_starts_with_embedding_not_as_chat(
    fake_engine: tuple[Engine, FakeEffects], tmp_path: Path
) -> None:
    engine, effects = fake_engine
    model = tmp_path / "embed-small.gguf"
    model.write_bytes(b"GGUF")
    engine.load({"model_path": str(model)})
    argv = effects.spawned[-1]
    assert "--embedding" in argv
    assert "--jinja" not in argv and "--spec-default" not in argv
    assert engine.status().kind == "embedding"


def test_one_slot_without_kv_unified_support(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, effects = fake_engine
    effects.help_text = "-c,    --ctx-size N       size of the prompt context\n"
    engine.load({"model_path": str(tiny_model)})
    argv = effects.spawned[-1]
    assert flag_value(argv, "--parallel") == "1"
    assert "--kv-unified" not in argv


def test_build_argv_without_a_plan_never_emits_c_0() -> None:
    model = ev.ResolvedModel(source="file:/m.gguf", model_file="/m.gguf")
    for ctx in (None, 0):
        argv = build_argv(
            "/bin/llama-server", model, ev.LoadSpec(model="/m.gguf", max_seq_length=ctx), (), port=1
        )
        assert "-c" not in argv


def test_parse_help_reads_aliases_values_and_env() -> None:
    capabilities = fixture_capabilities()
    assert capabilities.supports("--kv-unified") and capabilities.supports("-no-kvu")
    assert capabilities.canonical("--ctx_size=8192") == "--ctx-size"
    assert capabilities.canonical("-ngl") == "--gpu-layers"
    assert capabilities.flags["--ctx-size"].env == "LLAMA_ARG_CTX_SIZE"
    assert capabilities.flags["--ctx-size"].takes_value
    assert capabilities.flags["--fit"].takes_value  # `--fit [on|off]`
    assert not capabilities.flags["--kv-unified"].takes_value
    assert not capabilities.supports("--no-such-flag")
