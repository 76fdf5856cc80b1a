"""Random command sequences against the in-memory effects layer: the journal's replay equals
the live state after every event (every prefix), and never two live servers."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.orchestrator import Engine
from engine.replay import replay_state
from engine.request import LoadRequest
from engine.state import SlotState
from tests.conftest import rows
from tests.fakes import FakeEffects

MODELS = ("a.gguf", "b.gguf", "broken.gguf", "crashy.gguf")

load = st.tuples(
    st.just("load"),
    st.sampled_from(MODELS),
    st.sampled_from([None, 0, 512]),
    st.sampled_from([None, [], ["--top-k", "20"], ["-c", "4096", "--seed", "1"]]),
)
commands = st.lists(
    st.one_of(load, st.just(("unload",)), st.just(("crash",)), st.just(("cancel",))),
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands)
def test_replay_of_every_prefix_equals_the_live_state(script: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in MODELS:
            (folder / name).write_bytes(b"GGUF")
        effects = FakeEffects()
        journal_path = folder / "journal.db"
        engine = Engine.open(journal_path, effects=effects, monitor=False, synchronous="OFF")
        live: list[SlotState] = []
        engine.observe(lambda _event, state: live.append(state))
        try:
            for command in script:
                match command:
                    case ("load", model, ctx, extras):
                        engine.load(
                            LoadRequest(
                                model_path=str(folder / model),
                                max_seq_length=ctx,
                                llama_extra_args=extras,
                            )
                        )
                    case ("unload",):
                        engine.unload()
                    case ("cancel",):
                        engine.cancel()
                    case ("crash",):
                        if engine.state.process is not None:
                            effects.die(engine.state.process.pid)
                            engine.check_crashed()
        finally:
            engine.close()
        final = engine.state
        recorded = rows(journal_path)
        for k in range(1, len(live) + 1):
            assert replay_state(recorded[:k]) == live[k - 1], f"prefix of {k} events"
        assert len(recorded) == len(live)
        assert replay_state(recorded) == final
        assert effects.max_alive <= 1
        assert not any(effects.alive.values()), "close() leaves no server running"
