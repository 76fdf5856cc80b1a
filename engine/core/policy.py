"""The extra-args policy: user extra args are hostile input (DESIGN.md rule 5).

`check_extra_args(args, capabilities, allow)` canonicalises every token the way llama.cpp
parses it (`_` = `-` in a long flag, `--flag=value` = `--flag value`, every alias -> the
canonical name the binary's own `--help` gives), then refuses, naming the flag:

* a flag this binary does not know, or a token that is not a flag;
* a flag of a refused class (`REFUSED`: it reads or writes files, opens a socket, runs code,
  or sets what the engine manages) unless the operator allowed it (`Engine.open(allow_flags=)`);
* a value the engine understands that is wrong: numbers must be ASCII numbers, a choice one of
  the choices, a context length in range; no value may hold a control character or a token.

What comes out is the canonical token list that rules.py and cmdline.py work on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from engine.core.capabilities import FlagSpec, ServerCapabilities
from engine.core.rules import MAX_CONTEXT, NUMBER, InvalidRequest, check_text, is_flag

_MODEL = "the engine sets the model"
_DOWNLOAD = "downloads a model"
_NETWORK = "the engine owns the listening socket"
_AUTH = "the engine sets the API key and TLS"
_CODE = "runs code or tools inside the server"
_READS = "reads a file the server then uses or serves"
_WRITES = "writes files"
_UI = "the web UI is off-limits for pass-through"

# Refused classes, by canonical name (a negative switch is refused with the flag it negates).
REFUSED: Final[dict[str, str]] = {
    **dict.fromkeys(
        ("--model", "--mmproj", "--spec-draft-model", "--hf-file", "--hf-token"), _MODEL
    ),
    **dict.fromkeys(
        (
            "--model-url",
            "--mmproj-url",
            "--docker-repo",
            "--hf-repo",
            "--spec-draft-hf",
            "--embd-gemma-default",
            "--fim-qwen-1.5b-default",
            "--fim-qwen-3b-default",
            "--fim-qwen-7b-default",
            "--fim-qwen-7b-spec",
            "--fim-qwen-14b-spec",
            "--fim-qwen-30b-default",
            "--gpt-oss-20b-default",
            "--gpt-oss-120b-default",
            "--vision-gemma-4b-default",
            "--vision-gemma-12b-default",
        ),
        _DOWNLOAD,
    ),
    **dict.fromkeys(
        (
            "--host",
            "--port",
            "--reuse-port",
            "--path",
            "--api-prefix",
            "--rpc",
            "--cors-origins",
            "--cors-methods",
            "--cors-headers",
            "--cors-credentials",
        ),
        _NETWORK,
    ),
    **dict.fromkeys(("--api-key", "--api-key-file", "--ssl-key-file", "--ssl-cert-file"), _AUTH),
    **dict.fromkeys(
        (
            "--agent",
            "--tools",
            "--tools-runtime",
            "--mcp-servers-config",
            "--mcp-servers-json",
            "--video-ffmpeg-dir",
        ),
        _CODE,
    ),
    **dict.fromkeys(
        (
            "--lora",
            "--lora-scaled",
            "--lora-init-without-apply",
            "--control-vector",
            "--control-vector-scaled",
            "--grammar-file",
            "--json-schema-file",
            "--lookup-cache-static",
            "--chat-template-file",
            "--media-path",
            "--models-preset",
        ),
        _READS,
    ),
    **dict.fromkeys(
        ("--log-file", "--slot-save-path", "--log-prompts-dir", "--lookup-cache-dynamic"),
        _WRITES,
    ),
    **dict.fromkeys(("--ui", "--ui-config", "--ui-config-file", "--ui-mcp-proxy"), _UI),
    "--props": "lets any client change server properties (POST /props)",
    "--parallel": "the engine sets the parallel slots",
    **dict.fromkeys(
        ("--models-dir", "--models-max", "--models-autoload"), "the model router is not managed"
    ),
    **dict.fromkeys(("--embedding", "--rerank"), "the engine sets the server mode"),
    **dict.fromkeys(
        ("--help", "--version", "--cache-list", "--completion-bash", "--list-devices"),
        "prints and exits instead of serving",
    ),
}

# Flags whose help mentions a file, path, URL, directory, command, tool or socket but which
# were reviewed and are safe to pass through (the reason says why).
REVIEWED: Final[dict[str, str]] = {
    "--numa": "mentions a GitHub issue link only",
    "--swa-full": "mentions a pull-request link only",
    "--cache-ram": "mentions a pull-request link only",
    "--ctx-checkpoints": "mentions a pull-request link only",
    "--adaptive-target": "mentions a pull-request link only",
    "--cache-reuse": "mentions an image link only",
    "--grammar": "inline grammar text; 'dir' refers to llama.cpp's samples",
    "--json-schema": "inline schema text; mentions a link only",
    "--mmproj-auto": "only matters with -hf, which is refused",
    "--reasoning-preserve": "mentions a documentation link only",
    "--skip-chat-parsing": "mentions tool calls in the model's output only",
    "--threads-http": "a thread count for HTTP requests",
    "--chat-template": "inline template text or a built-in name",
}

# Words in a flag's help that make it a candidate for a refused class.
RISKY_HELP: Final = re.compile(
    r"\b(files?|path|paths|urls?|dir|directory|directories|command|commands|tools?|sockets?|"
    r"download|internet|https?|exec\w*|shell)\b",
    re.IGNORECASE,
)
_QUOTED_WORD: Final = re.compile(r"'([a-z]+)'")


def refusal(spec: FlagSpec) -> str | None:
    """Why `spec` is refused (None if it may pass): a negative switch goes with its flag."""
    return REFUSED.get(spec.negates or spec.canonical)


def unclassified(capabilities: ServerCapabilities) -> list[str]:
    """Flags whose help looks risky and that neither REFUSED nor REVIEWED covers."""
    return sorted(
        name
        for name, spec in capabilities.flags.items()
        if RISKY_HELP.search(spec.help)
        and refusal(spec) is None
        and (spec.negates or name) not in REVIEWED
    )


def canonical_allow(capabilities: ServerCapabilities, allow: Iterable[str]) -> frozenset[str]:
    """`Engine.open(allow_flags=)` in canonical names; an unknown flag is an error there."""
    names = set()
    for flag in allow:
        canonical = capabilities.canonical(flag)
        if canonical is None:
            raise InvalidRequest(f"allow_flags: {flag!r} is not a flag this llama-server knows")
        names.add(canonical)
    return frozenset(names)


def check_extra_args(
    args: Iterable[str], capabilities: ServerCapabilities, allow: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """The canonical form of `args`, or InvalidRequest naming the first refused token."""
    tokens = list(args)
    for index, token in enumerate(tokens):
        check_text(f"llama_extra_args[{index}]", token)
    canonical: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not is_flag(token):
            raise InvalidRequest(
                f"llama_extra_args[{index}]: {token!r} is not a flag (a value with no flag "
                "before it)"
            )
        name, has_value, attached = token.partition("=")
        spec = capabilities.spec(name)
        if spec is None:
            raise InvalidRequest(
                f"llama_extra_args: {name!r} is not a flag this llama-server knows"
            )
        reason = refusal(spec)
        if reason is not None and spec.canonical not in allow and spec.negates not in allow:
            alias = "" if name == spec.canonical else f" (= {spec.canonical})"
            raise InvalidRequest(
                f"llama_extra_args: {name!r}{alias} is refused: {reason}; an operator can "
                f"allow it with Engine.open(allow_flags={{{spec.canonical!r}}})"
            )
        if not spec.takes_value:
            if has_value:
                raise InvalidRequest(f"llama_extra_args: {name!r} takes no value")
            canonical.append(spec.canonical)
            index += 1
            continue
        values = [attached] if has_value else []
        missing = spec.values - len(values)
        values += tokens[index + 1 : index + 1 + missing]
        if len(values) < spec.values:
            raise InvalidRequest(f"llama_extra_args: {name!r} needs a value ({spec.metavar})")
        for value in values:
            check_value(name, spec, value)
        canonical += [spec.canonical, *values]
        index += 1 + max(missing, 0)
    return tuple(canonical)


def check_value(name: str, spec: FlagSpec, value: str) -> None:
    if spec.canonical == "--ctx-size":
        if not re.fullmatch(r"[0-9]+", value) or int(value) > MAX_CONTEXT:
            raise InvalidRequest(
                f"llama_extra_args: {name} needs a context length in 0..{MAX_CONTEXT}, "
                f"got {value!r}"
            )
        return
    choices = spec.choices
    if choices is not None and value not in choices:
        raise InvalidRequest(
            f"llama_extra_args: {name} must be one of {', '.join(sorted(choices))}, got {value!r}"
        )
    if spec.metavar == "N" and not NUMBER.fullmatch(value):
        words = set(_QUOTED_WORD.findall(spec.help))  # `-ngl all`, `-ngl auto`
        if value not in words:
            raise InvalidRequest(
                f"llama_extra_args: {name} needs a number written in ASCII digits, got {value!r}"
            )
    if value.startswith("-") and not NUMBER.fullmatch(value):
        # llama.cpp would take it as the value; we refuse it so that a flag never hides there.
        raise InvalidRequest(
            f"llama_extra_args: the value of {name} may not start with '-', got {value!r}"
        )
