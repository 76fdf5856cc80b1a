"""Failure classification and the retry ladder (pure).

The CPU-host messages are captured from the real binary by
tests/integration/test_failures.py; the GPU-only ones below are llama.cpp's own format
strings, filled in as llama.cpp fills them, each with the source file it comes from.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.core import events as ev
from engine.core.decide import respawn_events
from engine.core.evolve import evolve
from engine.core.failure import (
    Failure,
    apply_fallbacks,
    classify,
    fallback_reason,
    next_rung,
)
from engine.core.state import LoadedModel, ServerProcess, SlotState

# ggml/src/ggml-cuda/ggml-cuda.cu, ggml_backend_cuda_buffer_type_alloc_buffer:
#   GGML_LOG_ERROR("%s: allocating %.2f MiB on device %d: cudaMalloc failed: %s\n", __func__,
#                  size / 1024.0 / 1024.0, buft_ctx->device, cudaGetErrorString(err));
# (cudaGetErrorString(cudaErrorMemoryAllocation) is "out of memory")
CUDA_OOM = (
    "0.01.204.114 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 20480.00 MiB on "
    "device 0: cudaMalloc failed: out of memory\n"
    "0.01.204.120 E alloc_tensor_range: failed to allocate CUDA0 buffer of size 21474836480\n"
    "0.01.204.131 E llama_model_load: error loading model: unable to allocate CUDA0 buffer\n"
)
# tools/server/server-context.cpp, load_model (after mtmd_init_from_file returned null):
#   SRV_ERR("failed to load multimodal model, '%s'\n", mmproj_path.c_str());
PROJECTOR = (
    "0.00.310.002 E clip_init: failed to load model '/m/mmproj.gguf': unable to allocate\n"
    "0.00.310.010 E srv    load_model: failed to load multimodal model, '/m/mmproj.gguf'\n"
)
# tools/server/server-context.cpp, load_model, when the draft model fails (not verified
# against the source from this host: the search tools found the projector line, not this one)
SPECULATIVE = "0.00.200.000 E srv    load_model: failed to load draft model, '/m/draft.gguf'\n"


def test_gpu_out_of_memory_is_named_with_the_servers_line() -> None:
    failure = classify(1, CUDA_OOM)
    assert failure.kind == "gpu_out_of_memory"
    assert "\n" not in failure.message and "unable to allocate CUDA0 buffer" in failure.message


@pytest.mark.parametrize(
    ("returncode", "we_signalled", "kind"),
    [
        (-9, False, "oom_killed"),
        (-9, True, "crashed"),
        (-11, False, "crashed"),
        (3, False, "exited"),
    ],
)
def test_signals_and_codes(returncode: int, we_signalled: bool, kind: str) -> None:
    failure = classify(returncode, "", we_signalled=we_signalled, phase="ready")
    assert failure.kind == kind and "while serving" in failure.message


def test_health_timeout_wins_over_the_log() -> None:
    assert classify(None, CUDA_OOM, timed_out=True).kind == "health_timeout"


ARGV = ("llama-server", "-m", "m.gguf", "-ngl", "-1", "--fit", "off", "--spec-default")


def test_ladder_rungs() -> None:
    oom = classify(1, CUDA_OOM)
    assert next_rung(oom, CUDA_OOM, ARGV, ()) == "fit_on"
    assert next_rung(oom, CUDA_OOM, apply_fallbacks(ARGV, ("fit_on",)), ("fit_on",)) is None
    crash = classify(-11, "")
    assert next_rung(crash, "", ARGV, ()) == "flash_attn_off"
    assert next_rung(crash, "", (*ARGV, "-fa", "off"), ()) is None  # already off
    spec = classify(1, SPECULATIVE)
    assert next_rung(spec, SPECULATIVE, ARGV, ()) == "spec_off"
    vision = (*ARGV, "--mmproj", "p.gguf")
    projector = classify(1, PROJECTOR)
    assert next_rung(projector, PROJECTOR, vision, ()) == "mmproj_cpu"
    assert next_rung(projector, PROJECTOR, vision, ("mmproj_cpu",)) == "text_only"
    port = Failure("port_in_use", "taken")
    assert next_rung(port, "", ARGV, ("new_port", "new_port", "new_port")) is None  # 3 at most


def test_ladder_hints_come_from_failure_lines_only() -> None:
    # Lines every vision / speculative start prints: no projector or speculative rung for a
    # start that failed for another reason.
    info = (
        "0.00.300.000 I clip_model_loader: model name:   tiny\n"
        "0.00.300.100 I srv    load_model: speculative decoding: ngram-mod, n_max 64\n"
        "0.00.400.000 E llama_model_load: error loading model: something else\n"
    )
    failure = classify(1, info)
    vision = (*ARGV, "--mmproj", "p.gguf")
    assert next_rung(failure, info, vision, ()) is None


def test_fallbacks_rewrite_the_command_line_last_wins() -> None:
    vision = (*ARGV, "--mmproj", "p.gguf", "--flash-attn", "on")
    line = apply_fallbacks(
        vision, ("fit_on", "flash_attn_off", "spec_off", "mmproj_cpu", "text_only")
    )
    assert "-ngl" not in line and line.count("--fit") == 1 and "--spec-default" not in line
    assert "--mmproj" not in line and "p.gguf" not in line
    assert line[3:] == (
        *("--fit", "on", "--flash-attn", "off", "--spec-type", "none"),
        *("--no-mmproj-offload", "--no-mmproj"),
    )
    assert fallback_reason(("new_port",)) is None
    assert "flash attention is off" in (fallback_reason(("new_port", "flash_attn_off")) or "")


def test_crash_loop_counts_crashes_within_five_minutes() -> None:
    spec = ev.LoadSpec(model="/m/a.gguf")
    model = ev.ResolvedModel(source="file:/m/a.gguf", model_file="/m/a.gguf")
    served = LoadedModel(spec, model, (), None, ())
    state = SlotState(last_loaded=spec)
    verdicts = []
    for at in (0.0, 100.0, 400.0, 420.0, 430.0):  # 0 and 100 are over 5 minutes old by 430
        # A served server again (as after a respawn), with the crash history kept.
        state = replace(state, state="ready", process=ServerProcess(7, 1.0, 9000, "a", "m", "/l"))
        state = evolve(replace(state, serving=served), ev.Crashed(at=at, pid=7))
        verdicts.append([e.type for e in respawn_events(state, at)])
    assert verdicts == [["respawn_requested"]] * 4 + [["load_failed"]]
    assert state.crash_times == (400.0, 420.0, 430.0)
    (failed,) = respawn_events(state, 430.0)
    assert isinstance(failed, ev.LoadFailed) and failed.failure_kind == "crash_loop"
    assert respawn_events(state, 800.0)[0].type == "respawn_requested"  # the window moved on
