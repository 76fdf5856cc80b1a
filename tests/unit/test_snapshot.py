"""Snapshots are an exact cache: replay from zero == replay from any snapshot, and a missing,
corrupt or foreign snapshot only costs a full replay (with a warning)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from engine.adapters.journal import Journal
from engine.core.machine import STATES, TRANSITION_TABLE
from engine.core.snapshot import STATE_FORMAT, SnapshotError, decode, encode
from engine.core.state import SlotState
from engine.orchestrator import Engine
from engine.replay import open_state, replay_state
from tests.conftest import rows, run_sql
from tests.fakes import FakeEffects
from tests.workload import Command, apply, commands, write_models


def _run(folder: Path, script: list[Command], every: int) -> tuple[Path, SlotState]:
    write_models(folder)
    effects = FakeEffects()
    path = folder / "journal.db"

    def open_engine() -> Engine:
        return Engine.open(
            path, effects=effects, monitor=False, synchronous="OFF", snapshot_every=every
        )

    engine = open_engine()
    try:
        for command in script:
            if apply(engine, effects, folder, command):
                continue
            assert command == ("reopen",), command
            # An open starts from a snapshot: the same state as a replay from zero.
            engine.close(keep_server=True)
            journal = Journal.open(path, create=False)
            try:
                assert open_state(journal, "default", every) == replay_state(rows(path))
            finally:
                journal.close()
            engine = open_engine()  # (recovery: the fakes report no live server)
    finally:
        engine.close()
    return path, engine.state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands("reopen", max_size=10))
def test_replay_from_any_snapshot_equals_replay_from_zero(script: list[Command]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, final = _run(Path(tmp), script, every=3)
        recorded = rows(path)
        assert replay_state(recorded) == final
        state = SlotState()
        for k in range(len(recorded) + 1):
            text = encode(state)
            restored = decode(text)
            assert restored == state, f"snapshot at version {k} does not round-trip"
            assert replay_state(recorded[k:], restored) == final, f"from snapshot at {k}"
            if k < len(recorded):
                state = replay_state(recorded[k : k + 1], state)
        # The engine wrote snapshots as it went (every 3 events), and they are all exact.
        journal = Journal.open(path, create=False)
        try:
            stored = journal.snapshots("default")
            if len(recorded) >= 3:
                assert stored, "no snapshot written"
            for version, _, _, text in stored:
                assert decode(text) == replay_state(recorded[:version])
        finally:
            journal.close()


def _engine_journal(tmp_path: Path, every: int = 5) -> tuple[Path, SlotState]:
    script: list[tuple[object, ...]] = [
        ("load", "a.gguf", None, ["--top-k", "20"], None, None),
        ("load", "b.gguf", 512, None, "q8_0", None),
        ("unload",),
        ("load", "a.gguf", 0, [], None, "{{ x }}"),
    ]
    return _run(tmp_path, script, every)


def _open_state(path: Path, every: int = 5) -> SlotState:
    journal = Journal.open(path, create=False)
    try:
        return open_state(journal, "default", every)
    finally:
        journal.close()


def test_snapshots_are_written_every_n_events_and_pruned(tmp_path: Path) -> None:
    path, final = _engine_journal(tmp_path)
    journal = Journal.open(path, create=False)
    try:
        versions = [v for v, _, _, _ in journal.snapshots("default")]
    finally:
        journal.close()
    assert len(versions) == 2, "keeps the newest two"
    assert versions[0] > versions[1] and final.version - versions[0] < 5
    assert _open_state(path) == final


@pytest.mark.parametrize(
    "damage",
    [
        'UPDATE snapshots SET state = \'{"format": "\' || state',  # not JSON
        'UPDATE snapshots SET state = replace(state, \'"state":"\', \'"state":"x\')',
        "UPDATE snapshots SET state = replace(state, '\"version\":', '\"versio\":')",
        f"UPDATE snapshots SET state = replace(state, '{STATE_FORMAT}', 'other-format')",
        "UPDATE snapshots SET version = version + 1",  # filed under the wrong version
    ],
)
def test_a_corrupt_snapshot_falls_back_to_full_replay_with_a_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, final = _engine_journal(tmp_path)
    run_sql(path, damage)
    with caplog.at_level(logging.WARNING, logger="studio-engine"):
        assert _open_state(path) == final
    assert "snapshot" in caplog.text


def test_a_missing_snapshot_replays_in_full_warns_and_stores_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, final = _engine_journal(tmp_path)
    run_sql(path, "DELETE FROM snapshots")
    with caplog.at_level(logging.WARNING, logger="studio-engine"):
        assert _open_state(path) == final
    assert "no usable snapshot" in caplog.text
    journal = Journal.open(path, create=False)
    try:
        assert [v for v, _, _, _ in journal.snapshots("default")] == [final.version]
    finally:
        journal.close()


def test_a_snapshot_of_a_wrong_state_is_caught_by_the_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, final = _engine_journal(tmp_path, every=4)
    recorded = rows(path)
    journal = Journal.open(path, create=False)
    try:
        (newest, *_), (older, _, _, text) = journal.snapshots("default")
        run_sql(path, f"DELETE FROM snapshots WHERE version = {newest}")
        true_state = decode(text)
        next_type = recorded[older][3]  # the event right after the snapshot
        lie = next(s for s in STATES if (s, next_type) not in TRANSITION_TABLE)
        journal.save_snapshot(
            "default", older, true_state.updated_at or 0.0, encode(replace(true_state, state=lie))
        )
    finally:
        journal.close()
    with caplog.at_level(logging.WARNING, logger="studio-engine"):
        assert _open_state(path, every=100) == final
    assert "disagrees with the journal" in caplog.text


def test_decode_names_the_problem() -> None:
    with pytest.raises(SnapshotError, match="not JSON"):
        decode("{")
    with pytest.raises(SnapshotError, match="state format"):
        decode('{"format": "x", "state": {}}')
    text = encode(SlotState()).replace('"version":0', '"version":"0"')
    with pytest.raises(SnapshotError, match=r"state\.version: Input should be a valid integer"):
        decode(text)
