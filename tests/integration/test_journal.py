"""The journal on real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from engine.adapters.journal import Journal
from engine.adapters.schema import HEAD_REVISION
from engine.core import events as ev
from engine.core.errors import ConcurrencyConflict, SecretInPayload

SPEC = ev.LoadSpec(model="/models/a.gguf", max_seq_length=4096, extra_args=("--top-k", "20"))
EVENTS = [
    ev.LoadRequested(at=1.5, load_id="a1", spec=SPEC),
    ev.ModelResolved(
        at=1.6,
        load_id="a1",
        model=ev.ResolvedModel(source="file:/models/a.gguf", model_file="/models/a.gguf"),
    ),
    ev.SettleStarted(at=1.7, load_id="a1"),
]


def test_round_trip(any_journal_url: str) -> None:
    journal = Journal.open(any_journal_url)
    try:
        assert journal.schema_revision() == HEAD_REVISION
        journal.append("default", 0, EVENTS[:2])
        journal.append("default", 2, EVENTS[2:])
        journal.append("other", 0, EVENTS[:1])
        recorded = list(journal.read("default"))
        assert [r.event for r in recorded] == EVENTS
        assert [r.version for r in recorded] == [1, 2, 3]
        assert [r.at for r in recorded] == [1.5, 1.6, 1.7]
        assert journal.streams() == ["default", "other"]
        assert [r.event for r in journal.read("default", until_seq=recorded[1].seq)] == EVENTS[:2]
        assert [r.event for r in journal.read("default", until_time=1.6)] == EVENTS[:2]
    finally:
        journal.close()
    reopened = Journal.open(any_journal_url)  # already at head: opens without migrating
    try:
        assert [r.event for r in reopened.read("default")] == EVENTS
    finally:
        reopened.close()


def test_two_writers_at_the_same_version_exactly_one_wins(any_journal_url: str) -> None:
    first, second = Journal.open(any_journal_url), Journal.open(any_journal_url)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def write(journal: Journal, load_id: str) -> None:
        event = ev.LoadRequested(at=1.0, load_id=load_id, spec=SPEC)
        barrier.wait()
        try:
            journal.append("default", 0, [event])
            outcomes.append("won")
        except ConcurrencyConflict as exc:
            assert "another writer appended first" in str(exc)
            outcomes.append("conflict")

    try:
        threads = [
            threading.Thread(target=write, args=(j, n))
            for j, n in ((first, "one"), (second, "two"))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["conflict", "won"]
        assert len(list(first.read("default"))) == 1
    finally:
        first.close()
        second.close()


def test_a_token_never_reaches_the_journal(any_journal_url: str) -> None:
    journal = Journal.open(any_journal_url)
    try:
        leaky = ev.LoadFailed(at=1.0, error="auth failed for hf_" + "a" * 34)
        with pytest.raises(SecretInPayload):
            journal.append("default", 0, [ev.LoadRequested(at=1.0, spec=SPEC), leaky])
        assert list(journal.read("default")) == []  # nothing half-written
    finally:
        journal.close()


def test_sqlite_file_is_private_and_durable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "journal.db"
    Journal.open(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    journal = Journal.open(path)
    with journal.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    journal.close()
