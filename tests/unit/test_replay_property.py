"""Random command sequences against the in-memory effects layer: the journal's replay equals
the live state after every event (every prefix), and never two live servers."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from engine.core.state import SlotState
from engine.orchestrator import Engine
from engine.replay import replay_state
from tests.conftest import rows
from tests.fakes import FakeEffects
from tests.workload import Command, apply, commands, write_models


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands("cancel", max_size=12))
def test_replay_of_every_prefix_equals_the_live_state(script: list[Command]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_models(folder)
        effects = FakeEffects()
        journal_path = folder / "journal.db"
        engine = Engine.open(journal_path, effects=effects, monitor=False, synchronous="OFF")
        live: list[SlotState] = []
        engine.observe(lambda _event, state: live.append(state))
        try:
            for command in script:
                assert apply(engine, effects, folder, command)
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
