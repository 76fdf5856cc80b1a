"""A corrupt or future journal is a clear error naming the event, never traceback soup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.adapters.journal import Journal
from engine.cli.main import main
from engine.core import events as ev
from engine.core.errors import CorruptJournal, SchemaTooNew
from engine.replay import replay
from tests.conftest import run_sql

SPEC = ev.LoadSpec(model="/models/a.gguf")


def _write(path: Path, *events: ev.BaseEvent) -> None:
    journal = Journal.open(path)
    journal.append("default", 0, events)
    journal.close()


def test_illegal_event_names_its_sequence_number(journal_path: Path) -> None:
    # Appending bypasses evolve, as a hand-edited or buggy writer would.
    _write(journal_path, ev.LoadRequested(at=1.0, load_id="a", spec=SPEC), ev.Unloaded(at=2.0))
    with pytest.raises(
        CorruptJournal,
        match=r"#2: 'unloaded' is not a legal transition from "
        r"state 'resolving'",
    ):
        replay(journal_path)


def test_garbage_payload_names_its_sequence_number(journal_path: Path) -> None:
    _write(journal_path, ev.LoadRequested(at=1.0, load_id="a", spec=SPEC))
    run_sql(journal_path, 'UPDATE events SET payload = \'{"type": "load_req\' WHERE seq = 1')
    with pytest.raises(CorruptJournal, match=r"#1: unreadable 'load_requested' payload"):
        replay(journal_path)


def test_truncated_payload_missing_field(journal_path: Path) -> None:
    _write(journal_path, ev.LoadRequested(at=1.0, load_id="a", spec=SPEC))
    payload = json.dumps({"type": "load_requested", "at": 1.0})
    run_sql(journal_path, f"UPDATE events SET payload = '{payload}' WHERE seq = 1")
    with pytest.raises(CorruptJournal, match=r"#1: unreadable 'load_requested' payload \(spec"):
        replay(journal_path)


def test_event_from_a_future_schema(journal_path: Path) -> None:
    _write(journal_path, ev.LoadRequested(at=1.0, load_id="a", spec=SPEC))
    payload = json.dumps(
        {
            "type": "load_requested",
            "at": 1.0,
            "schema_version": 9,
            "spec": {"model": "/m.gguf"},
            "new_field": 1,
        }
    )
    run_sql(journal_path, f"UPDATE events SET payload = '{payload}' WHERE seq = 1")
    with pytest.raises(CorruptJournal, match=r"#1: written with event schema v9, newer"):
        replay(journal_path)


def test_journal_from_a_newer_schema_revision_is_refused(journal_path: Path) -> None:
    Journal.open(journal_path).close()
    run_sql(journal_path, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaTooNew, match="'9999', newer than this engine"):
        Journal.open(journal_path)


def test_missing_events_are_reported(journal_path: Path) -> None:
    _write(
        journal_path,
        ev.LoadRequested(at=1.0, load_id="a", spec=SPEC),
        ev.LoadCancelled(at=2.0, load_id="a", reason="x"),
    )
    run_sql(journal_path, "DELETE FROM events WHERE seq = 1")
    with pytest.raises(CorruptJournal, match=r"#2: version 2 follows 0: events missing"):
        replay(journal_path)


@pytest.mark.parametrize("command", ["replay", "verify"])
def test_cli_exits_non_zero_with_one_clear_line(
    journal_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(journal_path, ev.LoadRequested(at=1.0, load_id="a", spec=SPEC), ev.Unloaded(at=2.0))
    assert main([command, str(journal_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"studio-engine: error: {journal_path}: journal event #2:")
    assert "Traceback" not in err


def test_cli_refuses_a_missing_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.db"
    assert main(["replay", str(missing)]) == 2
    assert f"no journal at {missing}" in capsys.readouterr().err
    assert not missing.exists()


def test_replay_api_refuses_a_missing_journal(tmp_path: Path) -> None:
    from engine.core.errors import JournalError

    missing = tmp_path / "nope.db"
    with pytest.raises(JournalError, match="no journal at"):
        replay(missing)
    assert not missing.exists()


def test_cli_output_into_a_closed_pipe_ends_quietly(journal_path: Path) -> None:
    # `studio-engine replay J | head -1`: the reader is gone before the output is written.
    _write(journal_path, ev.LoadRequested(at=1.0, load_id="a", spec=SPEC))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "engine", "replay", str(journal_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, b"")
