"""The reload rules as pure functions over replayed state: one table row per case."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from engine.adapters.local_models import locate_model_file
from engine.core import events as ev
from engine.core.decide import Load, decide, duplicate_of_serving
from engine.core.evolve import fold
from engine.core.request import to_spec
from engine.core.rules import (
    InvalidRequest,
    effective_extra_args,
    split_flags,
    strip_shadowed,
)
from engine.core.state import SlotState
from engine.orchestrator import Engine
from tests.fakes import FakeEffects, fixture_capabilities

MODEL = "/models/qwen.gguf"
OTHER = "/models/llama.gguf"


def spec(model: str = MODEL, **fields: Any) -> ev.LoadSpec:
    if "extra_args" in fields and fields["extra_args"] is not None:
        fields["extra_args"] = tuple(fields["extra_args"])
    return ev.LoadSpec(model=model, **fields)


def served_state(
    requested: ev.LoadSpec,
    *,
    source: str | None = None,
    variant: str | None = None,
    is_vision: bool = False,
    extra_args: tuple[str, ...] = (),
) -> SlotState:
    """The state replayed from a journal in which `requested` loaded successfully."""
    source = source or f"file:{requested.model}"
    model = ev.ResolvedModel(
        source=source, model_file="/cache/model.gguf", variant=variant, is_vision=is_vision
    )
    events: list[ev.Event] = [
        ev.LoadRequested(at=1, load_id="a", spec=requested),
        ev.ModelResolved(at=2, load_id="a", model=model),
        ev.SettleStarted(at=3, load_id="a"),
        ev.Settled(at=4, load_id="a", outcome="cold"),
        ev.SpawnStarted(
            at=5,
            load_id="a",
            argv=("llama-server",),
            port=8080,
            marker="j/default/a",
            log_path="/logs/a.log",
            extra_args=extra_args,
            extra_args_source=source,
        ),
        ev.Spawned(at=6, load_id="a", pid=4242, create_time=6.0),
        ev.HealthPassed(at=7, load_id="a", waited_s=0.1),
        ev.LoadSucceeded(at=8, load_id="a"),
    ]
    return fold(events)


def then(state: SlotState, *events: ev.Event) -> SlotState:
    return fold(events, state)


# --- duplicate-load short-circuit ---------------------------------------------------------

HUB = "unsloth/Qwen3-0.6B-GGUF"

# (case, served request, served facts, new request, short-circuits?)
SHORT_CIRCUIT: list[tuple[str, ev.LoadSpec, dict[str, Any], ev.LoadSpec, bool]] = [
    ("same local file", spec(), {}, spec(), True),
    ("different local file", spec(), {}, spec(OTHER), False),
    ("hub id case-insensitive", spec(HUB), {"source": f"hf:{HUB}"}, spec(HUB.lower()), True),
    (
        "auto-picked variant matches explicit request",
        spec(HUB),
        {"source": f"hf:{HUB}", "variant": "Q4_K_M"},
        spec(HUB, variant="q4_k_m"),
        True,
    ),
    (
        "explicit variant differs",
        spec(HUB, variant="Q4_K_M"),
        {"source": f"hf:{HUB}", "variant": "Q4_K_M"},
        spec(HUB, variant="Q8_0"),
        False,
    ),
    (
        "explicit variant, case differs",
        spec(HUB, variant="Q4_K_M"),
        {"source": f"hf:{HUB}", "variant": "Q4_K_M"},
        spec(HUB, variant="q4_k_m"),
        True,
    ),
    ("same requested context", spec(max_seq_length=8192), {}, spec(max_seq_length=8192), True),
    (
        "8192 -> auto reloads even when capped",
        spec(max_seq_length=8192),
        {},
        spec(max_seq_length=0),
        False,
    ),
    ("auto == not set", spec(max_seq_length=0), {}, spec(), True),
    ("context changed", spec(max_seq_length=4096), {}, spec(max_seq_length=8192), False),
    (
        "cache type case-insensitive",
        spec(cache_type_kv="q8_0"),
        {},
        spec(cache_type_kv="Q8_0"),
        True,
    ),
    ("blank cache type = none", spec(), {}, spec(cache_type_kv=" "), True),
    ("cache type changed", spec(cache_type_kv="q8_0"), {}, spec(cache_type_kv="f16"), False),
    ("speculative none = default", spec(), {}, spec(speculative_type="default"), True),
    ("speculative changed", spec(), {}, spec(speculative_type="off"), False),
    (
        "vision: speculative is always off",
        spec(),
        {"is_vision": True},
        spec(speculative_type="default"),
        True,
    ),
    ("template changed", spec(), {}, spec(chat_template_override="{{ x }}"), False),
    (
        "same template",
        spec(chat_template_override="{{ x }}"),
        {},
        spec(chat_template_override="{{ x }}"),
        True,
    ),
    (
        "omitted extras inherit",
        spec(extra_args=["--top-k", "20"]),
        {"extra_args": ("--top-k", "20")},
        spec(),
        True,
    ),
    (
        "inherited --ctx-size shadows a set context",
        spec(max_seq_length=8192, extra_args=["--ctx-size", "4096"]),
        {"extra_args": ("--ctx-size", "4096")},
        spec(max_seq_length=8192),
        False,
    ),
    (
        "inherited --ctx-size does not matter when context is not set",
        spec(extra_args=["--ctx-size", "4096"]),
        {"extra_args": ("--ctx-size", "4096")},
        spec(),
        True,
    ),
    (
        "identical explicit extras",
        spec(extra_args=["--seed", "42"]),
        {"extra_args": ("--seed", "42")},
        spec(extra_args=["--seed", "42"]),
        True,
    ),
    (
        "explicit extras differ",
        spec(extra_args=["--seed", "42"]),
        {"extra_args": ("--seed", "42")},
        spec(extra_args=["--seed", "7"]),
        False,
    ),
    (
        "explicit [] against stored extras",
        spec(extra_args=["--seed", "42"]),
        {"extra_args": ("--seed", "42")},
        spec(extra_args=[]),
        False,
    ),
    ("explicit [] against no extras", spec(), {}, spec(extra_args=[]), True),
]


@pytest.mark.parametrize(
    ("served", "facts", "request_", "expected"),
    [row[1:] for row in SHORT_CIRCUIT],
    ids=[row[0] for row in SHORT_CIRCUIT],
)
def test_short_circuit(
    served: ev.LoadSpec, facts: dict[str, Any], request_: ev.LoadSpec, expected: bool
) -> None:
    state = served_state(served, **facts)
    assert duplicate_of_serving(request_, state) is expected
    first = decide(Load("b", request_, 9.0), state)[0]
    assert isinstance(first, ev.LoadShortCircuited) is expected


def test_no_short_circuit_unless_ready() -> None:
    ready = served_state(spec())
    crashed = then(ready, ev.Crashed(at=9, pid=4242, returncode=-9))
    reloading = then(ready, ev.LoadRequested(at=9, load_id="b", spec=spec(OTHER)))
    assert duplicate_of_serving(spec(), ready)
    assert not duplicate_of_serving(spec(), crashed)
    assert not duplicate_of_serving(spec(), reloading)
    assert not duplicate_of_serving(spec(), SlotState())


# --- extra-args inheritance -----------------------------------------------------------------

STORED = ("--top-k", "20", "--seed", "42")

# (case, new request, stored extras, stored source, effective extras)
INHERITANCE: list[tuple[str, ev.LoadSpec, tuple[str, ...], str | None, tuple[str, ...]]] = [
    ("none inherits", spec(), STORED, f"file:{MODEL}", STORED),
    ("different model inherits nothing", spec(OTHER), STORED, f"file:{MODEL}", ()),
    ("nothing stored", spec(), (), None, ()),
    ("[] clears", spec(extra_args=[]), STORED, f"file:{MODEL}", ()),
    ("a list replaces", spec(extra_args=["--seed", "1"]), STORED, f"file:{MODEL}", ("--seed", "1")),
    (
        "hub source case-insensitive",
        spec(HUB.upper()),
        STORED,
        f"hf:{HUB}",
        STORED,
    ),
    (
        "context group stripped when set",
        spec(max_seq_length=8192),
        ("--ctx-size", "4096", "--seed", "42"),
        f"file:{MODEL}",
        ("--seed", "42"),
    ),
    (
        "context kept when not set",
        spec(),
        ("--ctx-size", "4096", "--seed", "42"),
        f"file:{MODEL}",
        ("--ctx-size", "4096", "--seed", "42"),
    ),
    (
        "a flag with two values is stripped whole",
        spec(max_seq_length=0),
        ("--control-vector-layer-range", "1", "2", "--ctx-size", "8", "--top-k", "20"),
        f"file:{MODEL}",
        ("--control-vector-layer-range", "1", "2", "--top-k", "20"),
    ),
    (
        "cache group stripped, context kept",
        spec(cache_type_kv="q8_0"),
        ("--cache-type-k", "f16", "--cache-type-v", "f16", "--ctx-size", "4096"),
        f"file:{MODEL}",
        ("--ctx-size", "4096"),
    ),
    (
        "spec group: boolean --spec-default consumes no value",
        spec(speculative_type="off"),
        ("--spec-default", "--seed", "42", "--draft", "16", "--spec-ngram-size-n", "4"),
        f"file:{MODEL}",
        ("--seed", "42"),
    ),
    (
        "spec group: other --spec-* flags, the draft model among them",
        spec(speculative_type="ngram-mod"),
        (
            *("--spec-draft-n-max", "1", "--spec-draft-p-min", "0.5"),
            *("--spec-draft-model", "/d", "--top-k", "20"),
        ),
        f"file:{MODEL}",
        ("--top-k", "20"),
    ),
    (
        "template group with booleans",
        spec(chat_template_override="{{ x }}"),
        ("--jinja", "--chat-template", "chatml", "--no-jinja", "--temp", "0.2"),
        f"file:{MODEL}",
        ("--temp", "0.2"),
    ),
    (
        "-1 is a value, not a flag",
        spec(max_seq_length=512),
        ("--seed", "-1", "--ctx-size", "4096", "--predict", "-1", "--temp", "1e-5"),
        f"file:{MODEL}",
        ("--seed", "-1", "--predict", "-1", "--temp", "1e-5"),
    ),
]


@pytest.mark.parametrize(
    ("request_", "stored", "stored_source", "expected"),
    [row[1:] for row in INHERITANCE],
    ids=[row[0] for row in INHERITANCE],
)
def test_inheritance(
    request_: ev.LoadSpec,
    stored: tuple[str, ...],
    stored_source: str | None,
    expected: tuple[str, ...],
) -> None:
    source = f"file:{request_.model}" if request_.model.startswith("/") else f"hf:{request_.model}"
    assert effective_extra_args(request_, source, stored, stored_source) == expected


def test_stored_extras_survive_unload_and_change_only_on_success() -> None:
    state = served_state(spec(extra_args=list(STORED)), extra_args=STORED)
    unloaded = then(state, ev.UnloadRequested(at=9), ev.Unloaded(at=10))
    assert unloaded.state == "idle" and unloaded.extra_args == STORED
    # A load with new extras that fails does not touch the stored extras.
    failed = then(
        unloaded,
        ev.LoadRequested(at=11, load_id="b", spec=spec(extra_args=["--bad"])),
        ev.LoadFailed(at=12, load_id="b", error="boom"),
    )
    assert failed.extra_args == STORED and failed.extra_args_source == f"file:{MODEL}"


def test_split_flags_groups_values() -> None:
    tokens = ["--jinja", "--top-k", "20", "--predict", "-1", "--range", "1", "2", "--flag"]
    assert list(split_flags(tokens)) == [
        ("--jinja",),
        ("--top-k", "20"),
        ("--predict", "-1"),
        ("--range", "1", "2"),
        ("--flag",),
    ]
    assert strip_shadowed(["--ctx-size"], spec(max_seq_length=1)) == ()


# --- request validation (the extra-args policy itself: tests/unit/test_policy.py) -----------

TOKEN = "hf_" + "a1B2c3D4e5" * 3

# (case, request fields, text the error must contain)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("bad -c value", {"llama_extra_args": ["-c", "big"]}, "-c needs a context length"),
    ("-c without value", {"llama_extra_args": ["-c"]}, "'-c' needs a value"),
    ("negative -c", {"llama_extra_args": ["--ctx-size", "-5"]}, "--ctx-size needs"),
    ("huge -c", {"llama_extra_args": ["-c=99999999999"]}, "-c needs"),
    ("token in extras", {"llama_extra_args": ["--seed", TOKEN]}, "llama_extra_args[1]"),
    ("token in model path", {"model_path": f"owner/{TOKEN}"}, "model_path: looks like"),
    ("token in template", {"chat_template_override": f"hi {TOKEN}"}, "chat_template_override"),
    ("control char in extras", {"llama_extra_args": ["--x", "a\x00b"]}, "control characters"),
    ("control char in variant", {"gguf_variant": "Q4\x1b"}, "gguf_variant: control"),
    ("extras as one string", {"llama_extra_args": "--top-k 20"}, "llama_extra_args"),
    ("bad max_seq_length", {"max_seq_length": -1}, "max_seq_length"),
    ("bad cache type", {"cache_type_kv": "q3"}, "cache_type_kv: 'q3'"),
    ("bad speculative mode", {"speculative_type": "fast"}, "speculative_type: 'fast'"),
    ("unknown field", {"n_gpu_layers": 3}, "n_gpu_layers"),
    ("not a repo id nor a file", {"model_path": "no spaces allowed"}, "model_path"),
]


@pytest.mark.parametrize(
    ("fields", "message"), [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED]
)
def test_refused_requests_name_the_problem(fields: dict[str, Any], message: str) -> None:
    request = {"model_path": "unsloth/Qwen3-0.6B-GGUF", **fields}
    with pytest.raises(InvalidRequest) as caught:
        to_spec(request, locate_model_file, capabilities=fixture_capabilities())
    assert message in str(caught.value)
    assert TOKEN not in str(caught.value), "the error message must not echo a token"


def test_template_may_contain_newlines_and_tabs() -> None:
    parsed = to_spec(
        {"model_path": "owner/repo", "chat_template_override": "{% for m in x %}\n\t{{ m }}"},
        locate_model_file,
        capabilities=fixture_capabilities(),
    )
    assert parsed.chat_template_override is not None


def test_a_refused_request_journals_nothing(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path
) -> None:
    engine, _ = fake_engine
    engine.load({"model_path": str(tiny_model), "llama_extra_args": ["--seed", "42"]})
    version = engine.status().journal_version
    with pytest.raises(InvalidRequest, match="'--port' is refused: the engine owns"):
        engine.load({"model_path": str(tiny_model), "llama_extra_args": ["--port", "1"]})
    assert engine.status().journal_version == version
    engine.unload()
    engine.load({"model_path": str(tiny_model)})
    assert engine.status().extra_args == ("--seed", "42"), "the refused extras poisoned nothing"


LOAD_CHECKPOINTS = [
    "load_requested",
    "model_resolved",
    "admission_checked",
    "kill_started",
    "process_exited",
    "settle_started",
    "settled",
    "spawn_started",
    "spawned",
    "health_passed",
]


@pytest.mark.parametrize("checkpoint", LOAD_CHECKPOINTS)
def test_an_unload_arriving_at_any_instant_of_a_reload_is_never_lost(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, checkpoint: str
) -> None:
    engine, effects = fake_engine
    engine.load({"model_path": str(tiny_model)})
    unloads: list[threading.Thread] = []

    def unload_now(event: ev.Event, state: SlotState) -> None:
        if event.type != checkpoint or unloads:
            return
        flight = engine._flights[0]
        unloads.append(threading.Thread(target=engine.unload))
        unloads[0].start()
        assert flight.token._event.wait(5), "the unload never reached the load's token"

    engine.observe(unload_now)
    result = engine.load({"model_path": str(tiny_model), "max_seq_length": 512})
    unloads[0].join(5)
    # Past its last checkpoint (health passed) a load commits; the unload then runs after it.
    assert result.status == ("loaded" if checkpoint == "health_passed" else "cancelled")
    assert engine.status().state == "idle"
    assert not any(effects.alive.values()), "a server outlived the unload"
