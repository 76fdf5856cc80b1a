"""Why a llama-server would not start or died, and what to change before spawning it again.

Pure: from the exit code (or the signal), whether the engine sent that signal, the server's
log tail and the phase. The patterns are llama.cpp's own messages: those the CPU build prints
were captured from the real binary (tests/integration/test_failures.py); the GPU-only ones are
quoted from llama.cpp's source (see tests/unit/test_failure.py for each file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

FailureKind = Literal[
    "oom_killed",  # SIGKILL the engine did not send: the kernel's OOM killer, most likely
    "gpu_out_of_memory",
    "missing_library",
    "unknown_argument",
    "bad_value",
    "unknown_architecture",
    "invalid_model_file",
    "port_in_use",
    "health_timeout",
    "crashed",  # another signal
    "exited",  # another exit code
    "crash_loop",  # the engine's own verdict: too many crashes in a row (engine.core.respawn)
]
Phase = Literal["starting", "ready"]
# What a retry changes on the command line (the ladder's rungs).
Change = Literal["new_port", "fit_on", "flash_attn_off", "spec_off", "mmproj_cpu", "text_only"]

MAX_RETRIES: Final = 3  # spawns retried per load, all rungs together

_LAST_LINE = r"([^\n]*)"
# (kind, pattern): the first that matches the log tail wins, so specific before generic.
_PATTERNS: Final[tuple[tuple[FailureKind, re.Pattern[str]], ...]] = (
    # The dynamic loader, before main(): "<exe>: error while loading shared libraries: X.so: ..."
    ("missing_library", re.compile(r"error while loading shared libraries: ([^:\s]+)")),
    # common/arg.cpp, common_params_parse_ex: unknown flag, then a handler's refusal.
    ("unknown_argument", re.compile(r"error: invalid argument: (\S+)")),
    ("bad_value", re.compile(r'error while handling argument "([^"]+)": ' + _LAST_LINE)),
    ("port_in_use", re.compile(r"couldn't bind HTTP server socket|address already in use", re.I)),
    ("unknown_architecture", re.compile(r"unknown model architecture: '([^']*)'")),
    # ggml-cuda.cu (ggml_backend_cuda_buffer_type_alloc_buffer), the CUDA error macro, Vulkan,
    # Metal and the graph allocator (ggml-alloc.c, ggml_gallocr_reserve_n).
    (
        "gpu_out_of_memory",
        re.compile(
            r"cudaMalloc failed: out of memory|CUDA error: out of memory|ErrorOutOfDeviceMemory"
            r"|failed to allocate CUDA\d* buffer|error: Insufficient Memory"
        ),
    ),
    (
        "invalid_model_file",
        re.compile(
            r"invalid magic characters|failed to read magic|not within the file bounds"
            r"|model is corrupted or incomplete|llama_model_loader: failed to load model"
            r"|gguf_init_from_file\w*: failed"
        ),
    ),
)
# Hints for the ladder: the subsystem a start failure came from, read from its *failure* lines
# only (llama-server logs "clip_model_loader: ..." and speculative settings on every start).
_FAILED = r"(?:error|failed|unable|cannot)"
_PROJECTOR = re.compile(
    rf"failed to load multimodal model|^.*(?:clip|mmproj|mtmd).*{_FAILED}.*$", re.I | re.M
)
_SPECULATIVE = re.compile(
    rf"^.*(?:draft|speculative).*{_FAILED}.*$|^.*{_FAILED}.*(?:draft|speculative).*$",
    re.I | re.M,
)


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    message: str  # one human line
    flag: str | None = None  # the flag an unknown_argument / bad_value is about


SIGKILL: Final = 9
# POSIX numbers (the `signal` module is not pure enough for the core; these do not vary).
_SIGNALS: Final = {
    2: "SIGINT",
    4: "SIGILL",
    6: "SIGABRT",
    7: "SIGBUS",
    8: "SIGFPE",
    9: "SIGKILL",
    11: "SIGSEGV",
    15: "SIGTERM",
}


def signal_name(returncode: int) -> str:
    return _SIGNALS.get(-returncode, f"signal {-returncode}")


def server_line(log_tail: str) -> str | None:
    """The server's own last error line (timestamps and level tags stripped)."""
    for line in reversed(log_tail.splitlines()):
        text = line.strip()
        if re.search(r"error|failed|fail |out of memory|cannot|invalid", text, re.I):
            text = re.sub(r"^[\d.]+ [EWI] ", "", text)
            return text[-300:]
    return None


def classify(
    returncode: int | None,
    log_tail: str,
    *,
    we_signalled: bool = False,
    phase: Phase = "starting",
    timed_out: bool = False,
) -> Failure:
    """Name what happened to a server. `returncode` < 0 is a signal (-9: SIGKILL); None: the
    process was not our child (its code is unknown); `timed_out`: never healthy in time."""
    when = "before it was healthy" if phase == "starting" else "while serving"
    if timed_out:
        return Failure("health_timeout", "llama-server did not become healthy in time")
    for kind, pattern in _PATTERNS:
        found = pattern.search(log_tail)
        if found is None:
            continue
        subject = found.group(1) if found.groups() else None
        match kind:
            case "missing_library":
                text = f"llama-server cannot start: the shared library {subject} is missing"
            case "unknown_argument":
                text = f"llama-server does not know the flag {subject}"
            case "bad_value":
                reason = found.group(2).strip().removeprefix("error: ")
                text = f"llama-server refused the value of {subject}: {reason}"
            case "port_in_use":
                text = "llama-server could not bind its port: another listener holds it"
            case "unknown_architecture":
                text = f"this llama-server build does not know the architecture {subject!r}"
            case "gpu_out_of_memory":
                text = f"the GPU ran out of memory {when}: {server_line(log_tail) or ''}".strip()
            case _:
                text = f"the model file is not a valid GGUF: {server_line(log_tail) or ''}"
        flag = subject if kind in ("unknown_argument", "bad_value") else None
        return Failure(kind, text.rstrip(": "), flag)
    if returncode is not None and returncode < 0:
        name = signal_name(returncode)
        if returncode == -SIGKILL and not we_signalled:
            return Failure(
                "oom_killed",
                f"llama-server was killed by SIGKILL {when}, not by the engine "
                "(the kernel's out-of-memory killer, most likely)",
            )
        return Failure("crashed", f"llama-server died of {name} {when}")
    code = "an unknown code" if returncode is None else f"code {returncode}"
    own = server_line(log_tail)
    return Failure(
        "exited", f"llama-server exited with {code} {when}" + (f": {own}" if own else "")
    )


# --- the retry ladder ---------------------------------------------------------------------

FALLBACK_REASONS: Final[dict[Change, str]] = {
    "new_port": "its port was taken: started on another port",
    "fit_on": "the GPU ran out of memory with --fit off: llama-server fits the layers itself",
    "flash_attn_off": "it crashed with flash attention: flash attention is off",
    "spec_off": "speculative decoding failed: speculative decoding is off",
    "mmproj_cpu": "the projector failed on the GPU: the projector runs on the CPU",
    "text_only": "the projector failed: text only, images are not accepted",
}


def _last_value(argv: tuple[str, ...], flags: frozenset[str]) -> str | None:
    """The value llama-server uses for `flags` (last wins), None when not on the line."""
    value = None
    for i, token in enumerate(argv[:-1]):
        if token in flags:
            value = argv[i + 1]
    return value


FIT: Final = frozenset({"-fit", "--fit"})
FLASH_ATTN: Final = frozenset({"-fa", "--flash-attn"})
GPU_LAYERS: Final = frozenset({"-ngl", "--gpu-layers", "--n-gpu-layers"})
SPEC_TYPE: Final = frozenset({"--spec-type"})
MMPROJ: Final = frozenset({"-mm", "--mmproj"})


def next_rung(
    failure: Failure, log_tail: str, argv: tuple[str, ...], done: tuple[Change, ...]
) -> Change | None:
    """The change to try next for a start that failed this way (None: give up).

    At most MAX_RETRIES retries per load; each rung except `new_port` is tried once.
    """
    if len(done) >= MAX_RETRIES:
        return None
    rung: Change | None = None
    projector = "--mmproj" in argv or "-mm" in argv
    if failure.kind == "port_in_use":
        return "new_port"
    if failure.kind == "gpu_out_of_memory" and _last_value(argv, FIT) == "off":
        rung = "fit_on"
    elif projector and _PROJECTOR.search(log_tail):
        rung = "mmproj_cpu" if "mmproj_cpu" not in done else "text_only"
    elif _SPECULATIVE.search(log_tail) and speculative_on(argv):
        rung = "spec_off"
    elif (
        failure.kind == "crashed"  # died of a signal it did not get from us
        and _last_value(argv, FLASH_ATTN) != "off"  # on, or auto (on where supported)
    ):
        rung = "flash_attn_off"
    return rung if rung is not None and rung not in done else None


def speculative_on(argv: tuple[str, ...]) -> bool:
    return "--spec-default" in argv or _last_value(argv, SPEC_TYPE) not in (None, "none")


def _drop(argv: list[str], flags: frozenset[str], *, values: bool = True) -> list[str]:
    kept: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in flags:
            skip = values
        else:
            kept.append(token)
    return kept


def apply_fallbacks(argv: tuple[str, ...], changes: tuple[Change, ...]) -> tuple[str, ...]:
    """`argv` with each fallback applied; they come last, so they win over the user's extras."""
    line = list(argv)
    for change in changes:
        match change:
            case "fit_on":  # llama-server fits only what is unset: the layer count goes too
                line = [*_drop(_drop(line, FIT), GPU_LAYERS), "--fit", "on"]
            case "flash_attn_off":
                line = [*_drop(line, FLASH_ATTN), "--flash-attn", "off"]
            case "spec_off":
                line = _drop(_drop(line, SPEC_TYPE), frozenset({"--spec-default"}), values=False)
                line += ["--spec-type", "none"]
            case "mmproj_cpu":
                line.append("--no-mmproj-offload")
            case "text_only":
                line = [*_drop(line, MMPROJ), "--no-mmproj"]
    return tuple(line)


def fallback_reason(changes: tuple[Change, ...]) -> str | None:
    """What the served process gave up, one line (None: nothing; a new port gives up nothing)."""
    given_up = [FALLBACK_REASONS[c] for c in dict.fromkeys(changes) if c != "new_port"]
    return "; ".join(given_up) or None
