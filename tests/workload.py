"""Random command scripts against the in-memory effects (hypothesis strategies + a runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from tests.fakes import FakeEffects

# FakeEffects: a `broken` model fails to resolve, a `crashy` one exits before it is healthy.
MODELS = ("a.gguf", "b.gguf", "broken.gguf", "crashy.gguf")

load = st.tuples(
    st.just("load"),
    st.sampled_from(MODELS),
    st.sampled_from([None, 0, 512]),
    st.sampled_from([None, [], ["--top-k", "20"], ["-c", "4096", "--seed", "1"]]),
    st.sampled_from([None, "q8_0"]),
    st.sampled_from([None, "{{ messages }}"]),
)

Command = tuple[Any, ...]


def commands(*specials: str, max_size: int) -> st.SearchStrategy[list[Command]]:
    """Scripts of loads, unloads and server crashes, plus the given one-word commands."""
    words = [st.just((word,)) for word in ("unload", "crash", *specials)]
    return st.lists(st.one_of(load, *words), max_size=max_size)


def write_models(folder: Path) -> None:
    for name in MODELS:
        (folder / name).write_bytes(b"GGUF")


def apply(engine: Engine, effects: FakeEffects, folder: Path, command: Command) -> bool:
    """Run one command; False when it is not a common one (the caller handles it)."""
    match command:
        case ("load", model, ctx, extras, cache, template):
            engine.load(
                LoadRequest(
                    model_path=str(folder / model),
                    max_seq_length=ctx,
                    llama_extra_args=extras,
                    cache_type_kv=cache,
                    chat_template_override=template,
                )
            )
        case ("unload",):
            engine.unload()
        case ("cancel",):
            engine.cancel()
        case ("crash",):  # the server dies on its own; the monitor's check notices
            if engine.state.process is not None:
                effects.die(engine.state.process.pid)
                engine.check_crashed()
        case _:
            return False
    return True
