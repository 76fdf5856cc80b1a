"""llama-server's argv, built from a load (pure: no I/O).

Order matters: llama-server is last-wins, so the user's extra args come last and the
first-class settings the engine manages come before them (FIELD-NOTES.md).
"""

from __future__ import annotations

from engine.core.events import LoadSpec, ResolvedModel
from engine.core.rules import normal_speculative

SPECULATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "default": ("--spec-default",),
    "off": (),
    "ngram-simple": ("--spec-type", "ngram-simple"),
    "ngram-mod": ("--spec-type", "ngram-mod"),
}


def build_argv(
    binary: str,
    model: ResolvedModel,
    spec: LoadSpec,
    extra_args: tuple[str, ...],
    *,
    port: int,
    threads: int | None = None,
    template_file: str | None = None,
    api_key_file: str | None = None,
    host: str = "127.0.0.1",
) -> tuple[str, ...]:
    """`host` may be a Unix socket path ending in `.sock`; the key is passed as a file (0600),
    never in argv, which every local user can read in /proc/<pid>/cmdline."""
    argv = [
        binary,
        "-m",
        model.model_file,
        "--host",
        host,
        "--port",
        str(port),
        "-c",
        str(spec.max_seq_length or 0),
        "--parallel",
        "1",
        "--no-context-shift",
    ]
    if api_key_file:
        argv += ["--api-key-file", api_key_file]
    if threads:
        argv += ["--threads", str(threads)]
    argv.append("--jinja")
    if spec.cache_type_kv:
        argv += ["--cache-type-k", spec.cache_type_kv, "--cache-type-v", spec.cache_type_kv]
    user_flags = set(extra_args)  # canonical tokens (engine.core.policy)
    if not user_flags & {"--spec-type", "--spec-default"}:
        argv += SPECULATIVE_FLAGS[normal_speculative(spec.speculative_type, model.is_vision)]
    if template_file:
        argv += ["--chat-template-file", template_file]
    if model.mmproj_file:
        argv += ["--mmproj", model.mmproj_file]
    argv += extra_args
    return tuple(argv)
