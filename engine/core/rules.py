"""The reload rules production Studio backends learned the hard way, as pure functions.

* which extra args a load gets (inherit / clear / replace, shadowed flags stripped by group),
* which extra args are refused (the engine manages them),
* when a load is a duplicate of what is serving (the full target, not just the model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final

from engine.core.events import LoadSpec

CACHE_TYPES: Final = frozenset(
    {"f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "f32"}
)
SPECULATIVE_TYPES: Final = frozenset({"default", "off", "ngram-simple", "ngram-mod"})
MAX_CONTEXT: Final = 1 << 24
MAX_SLOTS: Final = 64  # llama-server's parallel slots a load may ask for

# Flags that take no value; every other flag consumes the next token unless it is a flag.
BOOLEAN_FLAGS: Final = frozenset(
    {
        "--spec-default",
        "--jinja",
        "--no-jinja",
        "--no-mmap",
        "--mlock",
        "--verbose",
        "-v",
        "--no-warmup",
        "--cont-batching",
        "-cb",
        "--no-cont-batching",
        "--context-shift",
        "--no-context-shift",
        "--no-kv-offload",
        "-nkvo",
        "--check-tensors",
        "--no-perf",
        "--metrics",
        "--slots",
        "--no-slots",
        "--props",
        "--log-disable",
        "--swa-full",
    }
)

# Groups of inherited flags that shadow a first-class setting, keyed by the request field.
SHADOW_GROUPS: Final[dict[str, frozenset[str]]] = {
    "max_seq_length": frozenset({"-c", "--ctx-size"}),
    "cache_type_kv": frozenset({"-ctk", "--cache-type-k", "-ctv", "--cache-type-v"}),
    "speculative_type": frozenset(
        {
            "--spec-default",
            "--spec-type",
            "--spec-ngram-size-n",
            "--draft-min",
            "--draft-max",
            "--model-draft",
            "-md",
        }
    ),
    "chat_template_override": frozenset(
        {
            "--chat-template",
            "--chat-template-file",
            "--chat-template-kwargs",
            "--jinja",
            "--no-jinja",
        }
    ),
}
_SPEC_PREFIXES: Final = ("--spec-", "--draft-", "--draft")

# What the engine manages: user extra args may never set these (contract rule 5).
DENIED_FLAGS: Final[dict[str, str]] = {
    **dict.fromkeys(
        (
            "-m",
            "--model",
            "-mu",
            "--model-url",
            "-hf",
            "-hfr",
            "--hf-repo",
            "-hff",
            "--hf-file",
            "-hft",
            "--hf-token",
            "-mm",
            "--mmproj",
            "-mmu",
            "--mmproj-url",
            "-dr",
            "--docker-repo",
            "-hfv",
            "-hffv",
        ),
        "model identity",
    ),
    **dict.fromkeys(("--host", "--port", "--path", "--api-prefix", "--reuse-port"), "network"),
    **dict.fromkeys(
        ("--api-key", "--api-key-file", "--ssl-key-file", "--ssl-cert-file"), "auth/TLS"
    ),
    **dict.fromkeys(
        (
            "--ui",
            "--no-ui",
            "--webui",
            "--no-webui",
            "--ui-config",
            "--ui-config-file",
            "--ui-mcp-proxy",
            "--no-ui-mcp-proxy",
        ),
        "web UI",
    ),
    **dict.fromkeys(("-np", "--parallel", "--n-parallel"), "parallel slots"),
    **dict.fromkeys(
        (
            "--models-dir",
            "--models-preset",
            "--models-max",
            "--models-autoload",
            "--no-models-autoload",
        ),
        "model router",
    ),
    **dict.fromkeys(("--embedding", "--embeddings", "--rerank", "--reranking"), "server mode"),
    "--tools": "tools",
    "--log-file": "log file",
    "--slot-save-path": "slot save path",
}
_ATTACHED_VALUE_FLAGS: Final = ("-np",)  # `-np8` is `-np 8`

HF_TOKEN_PATTERN: Final = re.compile(r"hf_[A-Za-z0-9]{30,}")
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")
_NUMBER: Final = re.compile(r"^-?\d+(\.\d+)?$")


class InvalidRequest(ValueError):
    """A load request the engine refuses; the message names the field or flag."""


# --- tokenising extra args -----------------------------------------------------------------


def is_flag(token: str) -> bool:
    return token.startswith("-") and not _NUMBER.match(token) and token != "-"


def flag_name(token: str) -> str:
    return token.split("=", 1)[0]


def split_flags(args: Iterable[str]) -> Iterator[tuple[str, ...]]:
    """Group a token list into (flag, value?) runs; `--flag=value` is one token."""
    tokens = list(args)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        takes_value = (
            is_flag(token)
            and "=" not in token
            and token not in BOOLEAN_FLAGS
            and i + 1 < len(tokens)
            and not is_flag(tokens[i + 1])
        )
        if takes_value:
            yield (token, tokens[i + 1])
            i += 2
        else:
            yield (token,)
            i += 1


def _in_group(flag: str, group: str) -> bool:
    if flag in SHADOW_GROUPS[group]:
        return True
    return group == "speculative_type" and flag.startswith(_SPEC_PREFIXES)


def fields_set(spec: LoadSpec) -> frozenset[str]:
    """The first-class fields this request sets (and whose inherited flags it shadows)."""
    return frozenset(name for name in SHADOW_GROUPS if getattr(spec, name) is not None)


def shadowing_flags(extra_args: Iterable[str], spec: LoadSpec) -> list[str]:
    groups = fields_set(spec)
    return [
        run[0]
        for run in split_flags(extra_args)
        if is_flag(run[0]) and any(_in_group(flag_name(run[0]), g) for g in groups)
    ]


def strip_shadowed(extra_args: Iterable[str], spec: LoadSpec) -> tuple[str, ...]:
    """Drop inherited flags (with their values) that shadow a field the request sets."""
    groups = fields_set(spec)
    kept: list[str] = []
    for run in split_flags(extra_args):
        if is_flag(run[0]) and any(_in_group(flag_name(run[0]), g) for g in groups):
            continue
        kept.extend(run)
    return tuple(kept)


def effective_extra_args(
    spec: LoadSpec, source: str, stored: tuple[str, ...], stored_source: str | None
) -> tuple[str, ...]:
    """None = inherit from the last successful load of the same source; [] = clear; else replace."""
    if spec.extra_args is not None:
        return spec.extra_args
    if stored_source is None or not same_source(stored_source, source):
        return ()
    return strip_shadowed(stored, spec)


# --- validation ------------------------------------------------------------------------------


def check_text(field: str, value: str) -> None:
    if _CONTROL_CHARS.search(value):
        raise InvalidRequest(f"{field}: control characters are not allowed")
    if HF_TOKEN_PATTERN.search(value):
        raise InvalidRequest(
            f"{field}: looks like a Hugging Face token; pass tokens through `hf_token`, "
            "never inside other fields"
        )


def check_extra_args(extra_args: Iterable[str]) -> None:
    args = list(extra_args)
    for index, token in enumerate(args):
        check_text(f"llama_extra_args[{index}]", token)
    for run in split_flags(args):
        token = run[0]
        name = flag_name(token)
        denied = DENIED_FLAGS.get(name)
        if denied is None:
            denied = next(
                (
                    DENIED_FLAGS[f]
                    for f in _ATTACHED_VALUE_FLAGS
                    if token.startswith(f) and token[len(f) :].isdigit()
                ),
                None,
            )
        if denied is not None:
            raise InvalidRequest(
                f"llama_extra_args: {name!r} is managed by the engine ({denied}) and cannot be "
                "passed through"
            )
        if name in SHADOW_GROUPS["max_seq_length"]:
            value = token.split("=", 1)[1] if "=" in token else (run[1] if len(run) > 1 else None)
            if value is None or not value.isdigit() or int(value) > MAX_CONTEXT:
                raise InvalidRequest(
                    f"llama_extra_args: {name} needs a context length in 0..{MAX_CONTEXT}, "
                    f"got {value!r}"
                )


# --- identity and duplicate detection --------------------------------------------------------


def same_source(a: str, b: str) -> bool:
    """Model identity: file paths compare exactly, hub repo ids case-insensitively."""
    if a.startswith("hf:") and b.startswith("hf:"):
        return a.casefold() == b.casefold()
    return a == b


def source_of(spec: LoadSpec) -> str:
    """The identity a spec names before resolution (local specs carry a resolved path)."""
    return f"file:{spec.model}" if spec.model.startswith("/") else f"hf:{spec.model}"


def normal_cache_type(value: str | None) -> str | None:
    return value.strip().lower() or None if value is not None else None


def normal_speculative(value: str | None, is_vision: bool) -> str:
    return "off" if is_vision else (value or "default")


def same_target(a: LoadSpec, b: LoadSpec) -> bool:
    """Two requests that would load the same server, known before resolution.

    Used for a load queued behind another: it waits and then short-circuits instead of
    cancelling an equivalent load (e.g. `max_seq_length` None vs 0, repo id casing).
    Conservative: anything resolution could still tell apart counts as different.
    """
    return (
        same_source(source_of(a), source_of(b))
        and (a.variant or "").casefold() == (b.variant or "").casefold()
        and (a.max_seq_length or 0) == (b.max_seq_length or 0)
        and normal_cache_type(a.cache_type_kv) == normal_cache_type(b.cache_type_kv)
        and normal_speculative(a.speculative_type, False)
        == normal_speculative(b.speculative_type, False)
        and a.chat_template_override == b.chat_template_override
        and a.extra_args == b.extra_args
        and a.token_fingerprint == b.token_fingerprint
        and a.parallel_slots == b.parallel_slots
    )


def reload_reason(
    spec: LoadSpec,
    served: LoadSpec,
    served_source: str,
    served_variant: str | None,
    is_vision: bool,
    served_extra_args: tuple[str, ...],
) -> str | None:
    """Why `spec` is not a duplicate of what is serving, or None when it is (contract rule 3)."""
    if not same_source(source_of(spec), served_source):
        return "different model"
    if spec.variant is not None:
        if (served_variant or "").casefold() != spec.variant.casefold():
            return "different variant"
    elif served.variant is not None:
        return "different variant (auto-pick requested)"
    if (spec.max_seq_length or 0) != (served.max_seq_length or 0):
        return "different context length"
    if normal_cache_type(spec.cache_type_kv) != normal_cache_type(served.cache_type_kv):
        return "different KV cache type"
    if normal_speculative(spec.speculative_type, is_vision) != normal_speculative(
        served.speculative_type, is_vision
    ):
        return "different speculative mode"
    if spec.chat_template_override != served.chat_template_override:
        return "different chat template"
    if spec.parallel_slots != served.parallel_slots:
        return "different parallel slots"
    if spec.extra_args is None:
        shadowing = shadowing_flags(served_extra_args, spec)
        if shadowing:
            return f"inherited {' '.join(shadowing)} must be stripped"
    elif tuple(spec.extra_args) != served_extra_args:
        return "different extra args"
    return None
