"""llama-server's argv, built from a load (pure: no I/O).

Order matters: llama-server is last-wins, so the user's extra args come last and the
first-class settings the engine manages come before them (FIELD-NOTES.md).
"""

from __future__ import annotations

from engine.core.events import LaunchPlan, LoadSpec, ResolvedModel
from engine.core.rules import normal_speculative

SPECULATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "default": ("--spec-default",),
    "off": (),
    "ngram-simple": ("--spec-type", "ngram-simple"),
    "ngram-mod": ("--spec-type", "ngram-mod"),
}


# Flags the plan sets, by group: a user's extra arg of the same group shadows ours (it would
# win anyway, coming last; dropping ours keeps the command line honest).
PLAN_FLAG_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"-c", "--ctx-size"}),
    frozenset({"-ngl", "--gpu-layers", "--n-gpu-layers"}),
    frozenset({"-fit", "--fit"}),
    frozenset({"-fitt", "--fit-target"}),
    frozenset({"-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"}),
)
KIND_FLAGS: dict[str, tuple[str, ...]] = {"embedding": ("--embedding",), "rerank": ("--reranking",)}


def _unshadowed(flags: tuple[str, ...], user_flags: set[str]) -> list[str]:
    """`flags` as (flag, value?) runs, minus the runs whose group the user's extras set."""
    kept: list[str] = []
    run: list[str] = []
    for token in (*flags, "-"):  # a sentinel flushes the last run
        if token.startswith("-") and not token.lstrip("-").isdigit():
            if run and not any(run[0] in g and g & user_flags for g in PLAN_FLAG_GROUPS):
                kept += run
            run = [token]
        else:
            run.append(token)
    return kept


def build_argv(
    binary: str,
    model: ResolvedModel,
    spec: LoadSpec,
    extra_args: tuple[str, ...],
    *,
    port: int,
    threads: int | None = None,
    template_file: str | None = None,
    plan: LaunchPlan | None = None,
    api_key_file: str | None = None,
    host: str = "127.0.0.1",
) -> tuple[str, ...]:
    """The command line; `plan` (engine.core.plan) sets context, slots and offload flags.

    `-c 0` is never emitted: without a plan an unset context is left to llama-server.
    `host` may be a Unix socket path ending in `.sock`; the key is passed as a file (0600),
    never in argv, which every local user can read in /proc/<pid>/cmdline.
    """
    user_flags = set(extra_args)  # canonical tokens (engine.core.policy)
    argv = [binary, "-m", model.model_file, "--host", host, "--port", str(port)]
    if plan is not None:
        planned = ("-c", str(plan.context), *(("--kv-unified",) if plan.kv_unified else ()))
        argv += _unshadowed(planned, user_flags)
        argv += ["--parallel", str(plan.parallel_slots)]
    else:
        argv += ["-c", str(spec.max_seq_length)] if spec.max_seq_length else []
        argv += ["--parallel", "1"]
    argv.append("--no-context-shift")
    if plan is not None:
        argv += _unshadowed(plan.flags, user_flags)
    if api_key_file:
        argv += ["--api-key-file", api_key_file]
    if threads:
        argv += ["--threads", str(threads)]
    kind_flags = KIND_FLAGS.get(model.kind, ())
    argv += kind_flags or ("--jinja",)  # an embedding or rerank model is not a chat model
    if spec.cache_type_kv:
        argv += ["--cache-type-k", spec.cache_type_kv, "--cache-type-v", spec.cache_type_kv]
    if not kind_flags and not user_flags & {"--spec-type", "--spec-default"}:
        argv += SPECULATIVE_FLAGS[normal_speculative(spec.speculative_type, model.is_vision)]
    if template_file:
        argv += ["--chat-template-file", template_file]
    if model.mmproj_file:
        argv += ["--mmproj", model.mmproj_file]
    argv += extra_args
    return tuple(argv)
