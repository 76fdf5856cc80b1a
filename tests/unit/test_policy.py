"""The extra-args policy over every flag of the real `llama-server --help` (saved as a fixture)."""

from __future__ import annotations

import pytest

from engine.core.capabilities import FlagSpec, ServerCapabilities, parse_help
from engine.core.policy import (
    REFUSED,
    REVIEWED,
    canonical_allow,
    check_extra_args,
    refusal,
    unclassified,
)
from engine.core.rules import InvalidRequest
from tests.fakes import HELP_FIXTURE, fixture_capabilities

CAPS = fixture_capabilities()
FLAGS = sorted(CAPS.flags.values(), key=lambda spec: spec.canonical)


def sample_values(spec: FlagSpec) -> list[str]:
    if not spec.takes_value:
        return []
    choices = spec.choices
    return [sorted(choices)[0] if choices else "1"] * spec.values


def spellings(spec: FlagSpec) -> list[str]:
    """Every way a user can write the flag: each alias, and `_` for `-` in a long one."""
    found = list(spec.aliases)
    found += [a[:2] + a[2:].replace("-", "_") for a in spec.aliases if a.startswith("--")]
    return sorted(set(found))


# --- the parser ---------------------------------------------------------------------------


def test_the_help_parses_into_flags_with_aliases_values_and_env() -> None:
    ctx = CAPS.flags["--ctx-size"]
    assert (
        ctx.aliases == ("-c", "--ctx-size") and ctx.takes_value and ctx.env == "LLAMA_ARG_CTX_SIZE"
    )
    agent, no_agent = CAPS.flags["--agent"], CAPS.flags["--no-agent"]
    assert agent.aliases == ("-ag", "--agent") and not agent.takes_value
    assert no_agent.aliases == ("-no-ag", "--no-agent") and no_agent.negates == "--agent"
    assert CAPS.flags["--no-kv-offload"].aliases == ("-nkvo", "--no-kv-offload")
    assert CAPS.flags["--no-kv-unified"].aliases == ("-no-kvu", "--no-kv-unified")
    assert CAPS.flags["--control-vector-layer-range"].values == 2
    assert CAPS.flags["--flash-attn"].choices == {"on", "off", "auto"}
    assert CAPS.flags["--version"].takes_value is False


@pytest.mark.parametrize(
    ("flag", "canonical"),
    [
        ("-c", "--ctx-size"),
        ("--ctx_size", "--ctx-size"),
        ("--ctx-size=8", "--ctx-size"),
        ("-kvu", "--kv-unified"),
        ("-no-kvu", "--no-kv-unified"),
        ("--kv_unified", "--kv-unified"),
        ("-hfr", "--hf-repo"),
        ("--webui", "--ui"),
        ("--no-webui", "--no-ui"),
        ("--nope", None),
        ("-ctx_size", None),  # `_` is only `-` in a long flag
    ],
)
def test_supports_and_canonical_accept_any_alias_and_spelling(
    flag: str, canonical: str | None
) -> None:
    assert CAPS.canonical(flag) == canonical
    assert CAPS.supports(flag) is (canonical is not None)


def test_a_help_without_flags_is_an_error() -> None:
    with pytest.raises(ValueError, match="no flags"):
        parse_help("llama-server: error while loading shared libraries\n")


# --- the policy, table-tested over every flag ----------------------------------------------


@pytest.mark.parametrize("spec", FLAGS, ids=[spec.canonical for spec in FLAGS])
def test_every_flag_of_the_binary_is_refused_or_canonicalised(spec: FlagSpec) -> None:
    values = sample_values(spec)
    for spelling in spellings(spec):
        forms = [[spelling, *values]]
        if spec.values == 1:
            forms.append([f"{spelling}={values[0]}"])
        for form in forms:
            if refusal(spec) is None:
                assert check_extra_args(form, CAPS) == (spec.canonical, *values)
                continue
            with pytest.raises(InvalidRequest) as caught:
                check_extra_args(["--top-k", "20", *form], CAPS)
            message = str(caught.value)
            assert repr(spelling.split("=")[0]) in message or spelling.split("=")[0] in message
            assert spec.canonical in message and "is refused" in message
            # ... unless the operator allowed it
            allowed = frozenset({spec.negates or spec.canonical})
            assert check_extra_args(form, CAPS, allowed) == (spec.canonical, *values)


def test_every_risky_flag_is_classified() -> None:
    """A flag whose help mentions a file, path, URL, directory, command, tool or socket must be
    refused or reviewed: a new dangerous llama.cpp flag fails here, by name."""
    assert unclassified(CAPS) == []


def test_the_classification_names_only_real_flags() -> None:
    stale = [name for name in (*REFUSED, *REVIEWED) if name not in CAPS.flags]
    assert stale == []


def test_an_unclassified_risky_flag_is_named() -> None:
    text = HELP_FIXTURE.read_text() + (
        "\n--exec-hook CMD                         run this shell command after each request\n"
    )
    assert unclassified(parse_help(text)) == ["--exec-hook"]


# --- the attacks of issue 12, one by one -----------------------------------------------------

ATTACKS = [
    (["--api_key", "x"], "--api-key"),
    (["--log_file", "/tmp/f"], "--log-file"),
    (["--slot_save_path", "/tmp"], "--slot-save-path"),
    (["--hf_repo", "a/b"], "--hf-repo"),
    (["--model_url", "http://x/m.gguf"], "--model-url"),
    (["--ssl_key_file", "/k"], "--ssl-key-file"),
    (["--reuse_port"], "--reuse-port"),
    (["--models_dir", "/m"], "--models-dir"),
    (["-ag"], "--agent"),
    (["--agent"], "--agent"),
    (["--mcp-servers-json", '{"mcpServers":{"x":{"command":"sh"}}}'], "--mcp-servers-json"),
    (["--media-path", "/"], "--media-path"),
    (["--lora", "/x.gguf"], "--lora"),
    (["--rpc", "10.0.0.1:50052"], "--rpc"),
    (["--cors-origins", "*"], "--cors-origins"),
    (["--log-prompts-dir", "/tmp"], "--log-prompts-dir"),
    (["--chat-template-file", "/etc/shadow"], "--chat-template-file"),
    (["--chat_template_file=/etc/shadow"], "--chat-template-file"),
    (["-m", "/x.gguf"], "--model"),
    (["--host=0.0.0.0"], "--host"),
    (["--port", "9"], "--port"),
    (["-np", "4"], "--parallel"),
    (["--no-webui"], "--no-ui"),
    (["--props"], "--props"),
    (["--path", "/"], "--path"),
    (["--tools", "all"], "--tools"),
    (["--embeddings"], "--embedding"),
]


@pytest.mark.parametrize(("args", "flag"), ATTACKS, ids=[" ".join(a)[:40] for a, _ in ATTACKS])
def test_each_attack_is_refused_naming_the_flag(args: list[str], flag: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_extra_args(args, CAPS)
    assert flag in str(caught.value) and "is refused" in str(caught.value)


VALUES = [
    (["-c", "٥١٢"], "-c needs a context length"),  # Unicode digits are not digits here
    (["-c", "99999999999"], "-c needs a context length"),
    (["--ctx-size", "-5"], "--ctx-size needs a context length"),
    (["--top-k", "twenty"], "--top-k needs a number written in ASCII digits"),
    (["--top-k", "\uff12\uff10"], "--top-k needs a number"),  # fullwidth 20
    (["-fa", "maybe"], "-fa must be one of auto, off, on"),
    (["--alias", "-m"], "may not start with '-'"),
    (["--no-warmup=1"], "'--no-warmup' takes no value"),
    (["--seed"], "'--seed' needs a value"),
    (["--nope", "1"], "'--nope' is not a flag this llama-server knows"),
    (["-np8"], "'-np8' is not a flag this llama-server knows"),
    (["20"], "llama_extra_args[0]: '20' is not a flag"),
    (["--alias", "a\x00b"], "control characters"),
    (["--alias", "hf_" + "a1B2c3D4e5" * 3], "looks like a Hugging Face token"),
]


@pytest.mark.parametrize(("args", "message"), VALUES, ids=[m for _, m in VALUES])
def test_bad_values_are_refused_naming_the_flag(args: list[str], message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_extra_args(args, CAPS)
    assert message in str(caught.value)


CANONICAL = [
    (["--top-k=20"], ("--top-k", "20")),  # llama-server itself refuses `=`: split it
    (["-c", "4096", "--seed", "-1"], ("--ctx-size", "4096", "--seed", "-1")),
    (["--ctx_size", "300"], ("--ctx-size", "300")),
    (["-ngl", "all", "--temp", "0.7"], ("--gpu-layers", "all", "--temp", "0.7")),
    (["-no-kvu", "-nkvo"], ("--no-kv-unified", "--no-kv-offload")),
    (["--control-vector-layer-range", "1", "3"], ("--control-vector-layer-range", "1", "3")),
    ([], ()),
]


@pytest.mark.parametrize(("args", "expected"), CANONICAL, ids=[" ".join(a) for a, _ in CANONICAL])
def test_allowed_args_come_out_canonical(args: list[str], expected: tuple[str, ...]) -> None:
    assert check_extra_args(args, CAPS) == expected


def test_allow_flags_are_canonicalised_and_checked() -> None:
    assert canonical_allow(CAPS, {"--lora", "--log_file", "-ag"}) == {
        "--lora",
        "--log-file",
        "--agent",
    }
    with pytest.raises(InvalidRequest, match="allow_flags: '--nope'"):
        canonical_allow(CAPS, {"--nope"})


def test_capabilities_are_a_frozen_value() -> None:
    caps = ServerCapabilities({"--x": FlagSpec("--x", ("-x", "--x"), False)})
    assert caps.supports("-x") and caps.canonical("--x=1") == "--x"
    with pytest.raises(TypeError):
        caps.flags["--y"] = caps.flags["--x"]  # type: ignore[index]
