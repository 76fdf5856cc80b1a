"""The reload rules production Studio backends learned the hard way, as pure functions.

* which extra args a load gets (inherit / clear / replace, shadowed flags stripped by group),
* when a load is a duplicate of what is serving (the full target, not just the model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final

from engine.core.events import LoadSpec
from engine.core.scrub import looks_secret

CACHE_TYPES: Final = frozenset(
    {"f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "f32"}
)
SPECULATIVE_TYPES: Final = frozenset({"default", "off", "ngram-simple", "ngram-mod"})
MAX_CONTEXT: Final = 1 << 24
MAX_SLOTS: Final = 64  # llama-server's parallel slots a load may ask for

# Groups of inherited flags that shadow a first-class setting, keyed by the request field.
# Canonical names only: extra args are canonicalised by engine.core.policy before they are
# stored, so `-c`, `--ctx_size` and `--ctx-size=8` all arrive here as `--ctx-size`.
SHADOW_GROUPS: Final[dict[str, frozenset[str]]] = {
    "max_seq_length": frozenset({"--ctx-size"}),
    "cache_type_kv": frozenset({"--cache-type-k", "--cache-type-v"}),
    "speculative_type": frozenset({"--spec-default", "--spec-type", "--draft", "--draft-min"}),
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

_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")
# A number written in ASCII (`-1`, `0.7`, `1e-5`): a value, never a flag.
NUMBER: Final = re.compile(r"[-+]?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")


class InvalidRequest(ValueError):
    """A load request the engine refuses; the message names the field or flag."""


# --- tokenising extra args -----------------------------------------------------------------


def is_flag(token: str) -> bool:
    return token.startswith("-") and not NUMBER.fullmatch(token) and token != "-"


def split_flags(args: Iterable[str]) -> Iterator[tuple[str, ...]]:
    """Group canonical tokens into (flag, values...) runs.

    Canonical tokens (engine.core.policy) make this exact: a value never starts with `-`
    unless it is a number, and every non-flag token is the value of the flag before it.
    """
    tokens = list(args)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        takes_value = is_flag(token) and i + 1 < len(tokens) and not is_flag(tokens[i + 1])
        if takes_value:
            end = i + 1
            while end < len(tokens) and not is_flag(tokens[end]):
                end += 1  # `--control-vector-layer-range START END`
            yield tuple(tokens[i:end])
            i = end
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
        if is_flag(run[0]) and any(_in_group(run[0], g) for g in groups)
    ]


def strip_shadowed(extra_args: Iterable[str], spec: LoadSpec) -> tuple[str, ...]:
    """Drop inherited flags (with their values) that shadow a field the request sets."""
    groups = fields_set(spec)
    kept: list[str] = []
    for run in split_flags(extra_args):
        if is_flag(run[0]) and any(_in_group(run[0], g) for g in groups):
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
    if looks_secret(value):
        raise InvalidRequest(
            f"{field}: looks like a Hugging Face token; pass tokens through `hf_token`, "
            "never inside other fields"
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
