"""Every unreadable journal is one line naming the file (and the event #seq), exit code 2, and
not one byte written: `replay`, `verify`, `postmortem` and `Engine.open` alike."""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.cli.main import main as cli_main
from engine.core.errors import EngineError, JournalBusy, JournalError
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from tests.fakes import FakeEffects


def _good_journal(path: Path, model: Path) -> Path:
    # No snapshot: Engine.open must read every event (a snapshot would skip the bad one).
    engine = Engine.open(path, effects=FakeEffects(), monitor=False, snapshot_every=0)
    engine.load(LoadRequest(model_path=str(model)))
    engine.load(LoadRequest(model_path=str(model)))  # short-circuit
    engine.unload()
    engine.close()
    return path


def _sql(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


def _not_a_database(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 200)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _no_events_table(path: Path) -> None:
    _sql(path, "DROP TABLE events")


def _foreign_database(path: Path) -> None:
    path.unlink()
    _sql(path, "CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('ada')")


def _nested_payload(path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    _sql(path, f"UPDATE events SET payload = '{deep}' WHERE version = 2")


def _huge_at(path: Path) -> None:
    _sql(path, "UPDATE events SET at = 1e300 WHERE version = 2")


def _text_at(path: Path) -> None:
    _sql(path, "UPDATE events SET at = 'soon' WHERE version = 2")


def _nan_at(path: Path) -> None:
    _sql(
        path,
        "UPDATE events SET payload = json_set(payload, '$.at', 'x') WHERE version = 2",
        'UPDATE events SET payload = replace(payload, \'"at":"x"\', \'"at":NaN\') '
        "WHERE version = 2",
    )


BAD: dict[str, Callable[[Path], None]] = {
    "not a database": _not_a_database,
    "truncated": _truncated,
    "no events table": _no_events_table,
    "foreign database": _foreign_database,
    "nested payload": _nested_payload,
    "huge at": _huge_at,
    "text at": _text_at,
    "NaN at": _nan_at,
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    return _good_journal(tmp_path_factory.mktemp("good") / "journal.db", tiny_model)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_journal_is_one_line_exit_2_and_untouched(
    kind: str, pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "journal.db"
    shutil.copy(pristine, path)
    BAD[kind](path)
    before = _digest(path)
    for command in (["replay"], ["verify"], ["postmortem"], ["replay", "--json"]):
        code = cli_main([command[0], str(path), *command[1:]])
        err = capsys.readouterr().err
        assert code == 2, (kind, command, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("studio-engine: error:"), (kind, err)
        assert str(path) in lines[0], (kind, lines[0])
        assert _digest(path) == before, (kind, command)
    with pytest.raises((JournalError, EngineError)) as refused:
        Engine.open(path, effects=FakeEffects(), monitor=False).close()
    message = str(refused.value)
    assert "\n" not in message and str(path) in message, (kind, message)
    assert _digest(path) == before, (kind, "Engine.open")


def test_bad_event_names_its_seq(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "journal.db"
    shutil.copy(pristine, path)
    _text_at(path)
    assert cli_main(["verify", str(path)]) == 2
    assert "journal event #2" in capsys.readouterr().err


def test_read_only_copy_and_older_schema_are_read_as_they_are(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    read_only = tmp_path / "ro.db"
    shutil.copy(pristine, read_only)
    read_only.chmod(0o444)
    older = tmp_path / "older.db"
    shutil.copy(pristine, older)
    _sql(older, "DROP TABLE journal_identity", "UPDATE alembic_version SET version_num = '0002'")
    for path in (read_only, older):
        before = _digest(path)
        for command in ("replay", "verify", "postmortem"):
            assert cli_main([command, str(path)]) == 0, capsys.readouterr().err
            assert _digest(path) == before, (path.name, command)
    with sqlite3.connect(older) as conn:  # never migrated by a reader
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0002",)
    conn.close()


def test_naive_until_is_utc(pristine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # FakeEffects' clock starts at 1_800_000_000 = 2027-01-15T08:00:00Z.
    assert cli_main(["replay", str(pristine), "--until", "2027-01-15T07:59:59"]) == 0
    assert "0 events" in capsys.readouterr().out
    assert cli_main(["replay", str(pristine), "--until", "2027-01-15T08:00:01"]) == 0
    assert "0 events" not in capsys.readouterr().out


def test_engine_open_with_a_snapshot_and_a_bad_last_event(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "journal.db"
    engine = Engine.open(path, effects=FakeEffects(), monitor=False)  # snapshots on close
    engine.load(LoadRequest(model_path=str(tiny_model)))
    engine.close()
    _sql(path, "UPDATE events SET at = 'soon' WHERE version = (SELECT max(version) FROM events)")
    _sql(path, "UPDATE snapshots SET at = 'later'")
    before = _digest(path)
    with pytest.raises(JournalError) as refused:
        Engine.open(path, effects=FakeEffects(), monitor=False).close()
    assert "journal event #" in str(refused.value) and str(path) in str(refused.value)
    assert _digest(path) == before
    capsys.readouterr()  # the ignored snapshot's warning


def test_held_lock_at_open_is_journal_busy_in_one_line(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "journal.db"
    shutil.copy(pristine, path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        started = time.monotonic()
        with pytest.raises(JournalBusy) as busy:
            Engine.open(path, effects=FakeEffects(), monitor=False, busy_timeout=0.2)
        assert time.monotonic() - started < 3
        message = str(busy.value)
        assert "\n" not in message and str(path) in message and "locked" in message
        assert cli_main(["verify", str(path)]) == 0  # readers never need the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    Engine.open(path, effects=FakeEffects(), monitor=False).close()


def test_random_damage_is_never_a_traceback(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes flipped at random (a bad disk, a bad copy): every reader ends in one line or a
    report, never a traceback, and a refused open writes nothing."""
    data = pristine.read_bytes()
    rng = random.Random(20261129)
    for trial in range(40):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 3, 10, 50))):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path = tmp_path / f"damaged-{trial}.db"
        path.write_bytes(bytes(damaged))
        before = _digest(path)
        for command in ("replay", "verify", "postmortem"):
            code = cli_main([command, str(path)])
            err = capsys.readouterr().err.strip().splitlines()
            assert code in (0, 1, 2), (trial, command)
            if code == 2:
                assert len(err) == 1 and err[0].startswith("studio-engine: error:"), (trial, err)
            assert _digest(path) == before, (trial, command)
        try:
            Engine.open(path, effects=FakeEffects(), monitor=False).close()
        except (JournalError, EngineError) as exc:
            assert "\n" not in str(exc), (trial, str(exc))
            assert _digest(path) == before, (trial, "Engine.open")
