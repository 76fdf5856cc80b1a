"""Faults around the journal and the process table, with a real llama-server and real
SQLite / PostgreSQL: each ends with at most one live server per slot, nothing unowned, and a
journal that verifies.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from engine import Engine, JournalUnavailable, LoadRequest
from engine.adapters.binary import locate_server
from engine.adapters.process import ProcessManager
from engine.adapters.runtime import RealEffects
from engine.cli.main import main as cli_main
from engine.core import events as ev
from engine.core.state import SlotState
from tests.conftest import run_sql
from tests.integration.conftest import marked_servers

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


class HeldLock:
    """A second SQLite connection holding the write lock, as another process would."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)

    def hold(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.release()
        self.conn.close()


def _on(kind: str, action: object) -> object:
    def observer(event: ev.Event, _state: SlotState) -> None:
        if event.type == kind:
            action()  # type: ignore[operator]

    return observer


def _verify_ok(url: str | Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["verify", str(url)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err


def test_lock_held_6s_right_after_spawn_is_waited_out(
    journal_path: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = Engine.open(journal_path, run_dir=tmp_path / "run")
    lock = HeldLock(journal_path)
    try:

        def hold_6s() -> None:
            lock.hold()
            threading.Timer(6.0, lock.release).start()

        engine.observe(_on("spawn_started", hold_6s))
        result = engine.load(LoadRequest(model_path=str(tiny_model)))
        assert result.status == "loaded", result
        assert len(marked_servers(engine)) == 1
        engine.unload()
    finally:
        engine.close()
        lock.close()
    assert not marked_servers(engine)
    _verify_ok(journal_path, capsys)


def test_lock_held_past_the_retries_kills_the_child_and_reports(
    journal_path: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = Engine.open(journal_path, run_dir=tmp_path / "run", busy_timeout=0.2)
    lock = HeldLock(journal_path)
    try:
        engine.observe(_on("spawn_started", lock.hold))
        request = LoadRequest(model_path=str(tiny_model))
        with pytest.raises(JournalUnavailable) as refused:
            engine.load(request)
        message = str(refused.value)
        assert str(journal_path) in message and "locked" in message, message
        assert "INSERT" not in message and "\n" not in message
        assert not marked_servers(engine), "the server the journal never heard of still runs"
        lock.release()
        engine._observers.clear()
        again = engine.load(request)  # reconciles the slot first, then loads
        assert again.status == "loaded", again
        assert len(marked_servers(engine)) == 1
    finally:
        engine.close()
        lock.close()
    assert not marked_servers(engine)
    _verify_ok(journal_path, capsys)


def test_monitor_survives_a_held_lock_and_journals_the_crash(
    journal_path: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = Engine.open(journal_path, run_dir=tmp_path / "run", busy_timeout=0.2)
    lock = HeldLock(journal_path)
    try:
        request = LoadRequest(model_path=str(tiny_model))
        assert engine.load(request).status == "loaded"
        pid = engine.status().pid
        assert pid is not None
        lock.hold()
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)  # the monitor fails a few times meanwhile
        assert engine._monitor is not None and engine._monitor.is_alive()
        assert engine.state.state == "ready"  # nothing journaled yet: nothing published
        lock.release()
        released = time.monotonic()
        while engine.state.state != "crashed" and time.monotonic() - released < 5:
            time.sleep(0.01)
        caught_up = time.monotonic() - released
        assert engine.state.state == "crashed"
        assert caught_up < 1.5, f"crash journaled {caught_up:.2f} s after the lock went"
        result = engine.load(request)
        assert result.status == "loaded" and result.pid != pid, result
    finally:
        engine.close()
        lock.close()
    assert not marked_servers(engine)
    _verify_ok(journal_path, capsys)


def test_close_under_a_held_lock_leaves_nothing_running(
    journal_path: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = Engine.open(journal_path, run_dir=tmp_path / "run", busy_timeout=0.2)
    lock = HeldLock(journal_path)
    try:
        assert engine.load(LoadRequest(model_path=str(tiny_model))).status == "loaded"
        lock.hold()
        with pytest.raises(JournalUnavailable):
            engine.close()
        assert not marked_servers(engine)
    finally:
        lock.close()
    # The lease could not be released either; a restarted backend would find its holder dead,
    # but this test process still lives, so drop it as that restart would.
    run_sql(journal_path, "DELETE FROM leases")
    again = Engine.open(journal_path, run_dir=tmp_path / "run")  # journals the pid as gone
    again.close()
    _verify_ok(journal_path, capsys)


def test_disk_full_during_a_load(
    journal_path: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.disk_full_workload",
            str(journal_path),
            str(tmp_path / "run"),
            str(tiny_model),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["first"].startswith("JournalUnavailable: ") and str(journal_path) in out["first"]
    assert out["live_after_first"] == 0, out
    # Not IllegalTransition, not a silent no-op: either the journal took the reconciliation
    # (the failed transaction's space is reused) or it says it cannot.
    assert out["unload"] == "ok" or out["unload"].startswith("JournalUnavailable: "), out
    assert out["second"] == "loaded" and out["live_after_second"] == 1, out
    assert out["live_after_close"] == 0, out
    assert not ProcessManager().marked_processes(out["journal_id"] + "/")
    failed = [e for e in _events(journal_path) if isinstance(e, ev.LoadFailed)]
    assert len(failed) == 1  # the load whose server could not be journaled
    _verify_ok(journal_path, capsys)


def test_wrapper_script_server_is_killed_at_recovery(
    journal_path: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = locate_server().path
    wrapper = tmp_path / "llama-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\n"{real}" "$@"\n')  # no exec: the server is its child
    wrapper.chmod(0o755)
    engine = Engine.open(journal_path, llama_server=wrapper, run_dir=tmp_path / "run")
    assert engine.load(LoadRequest(model_path=str(tiny_model))).status == "loaded"
    script = psutil.Process(engine.status().pid)
    (server,) = script.children()
    engine.close(keep_server=True)
    script.kill()  # the backend and the wrapper die; the server leads no process group
    script.wait(5)
    assert server.is_running() and os.getpgid(server.pid) != server.pid

    started = time.monotonic()
    again = Engine.open(journal_path, llama_server=wrapper, run_dir=tmp_path / "run")
    try:
        assert time.monotonic() - started < 5
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
        assert not marked_servers(again)
        kinds = [e.type for e in _events(journal_path)]
        assert "orphan_killed" in kinds
    finally:
        again.close()
    _verify_ok(journal_path, capsys)


def test_two_journals_spelled_alike_leave_each_other_alone(
    tmp_path: Path,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    monkeypatch.chdir(first_dir)
    first = Engine.open("sqlite:///studio.db")
    try:
        assert first.load(LoadRequest(model_path=str(tiny_model))).status == "loaded"
        monkeypatch.chdir(second_dir)
        second = Engine.open("sqlite:///studio.db")
        try:
            assert second.journal_id != first.journal_id
            assert first.check_crashed() is False and first.state.state == "ready"
            assert second.load(LoadRequest(model_path=str(tiny_model))).status == "loaded"
            assert first.effects.health(first.status().port or 0) == "ok"
        finally:
            second.close()
        assert first.state.state == "ready" and first.check_crashed() is False
    finally:
        first.close()
    for folder in (first_dir, second_dir):
        _verify_ok(folder / "studio.db", capsys)


def test_one_journal_spelled_two_ways_adopts_its_own_server(
    tmp_path: Path,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "sub").mkdir()
    journal = tmp_path / "journal.db"
    engine = Engine.open(journal, run_dir=tmp_path / "run")
    assert engine.load(LoadRequest(model_path=str(tiny_model))).status == "loaded"
    pid = engine.status().pid
    engine.close(keep_server=True)
    monkeypatch.chdir(tmp_path)
    again = Engine.open("sqlite:///./sub/../journal.db", run_dir=tmp_path / "run")
    try:
        assert again.journal_id == engine.journal_id
        assert again.status().state == "ready" and again.status().pid == pid
        assert len(marked_servers(again)) == 1
    finally:
        again.close()
    _verify_ok(journal, capsys)


def test_clock_step_neither_crashes_nor_kills_a_healthy_server(
    journal_path: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step = [0.0]

    def boot_time() -> float:  # what the kernel says now: it moves when the clock steps
        return psutil.boot_time() + step[0]

    def effects() -> RealEffects:
        return RealEffects(locate_server(), tmp_path / "run", boot_time=boot_time)

    engine = Engine.open(journal_path, effects=effects())
    try:
        assert engine.load(LoadRequest(model_path=str(tiny_model))).status == "loaded"
        pid = engine.status().pid
        step[0] = 3600.0  # NTP / VM resume: the wall clock jumps an hour
        time.sleep(0.6)  # the crash monitor looks twice meanwhile
        assert engine.state.state == "ready", engine.state.last_error
    finally:
        engine.close(keep_server=True)
    step[0] = -7200.0
    again = Engine.open(journal_path, effects=effects())
    try:
        assert again.status().state == "ready" and again.status().pid == pid  # adopted
        assert len(marked_servers(again)) == 1
        assert [e.type for e in _events(journal_path)][-2:] == [
            "recovery_adopted",
            "recovery_finished",
        ]
    finally:
        again.close()
    _verify_ok(journal_path, capsys)


def _events(journal: Path) -> list[ev.Event]:
    from engine.adapters.journal import Journal

    reader = Journal.open(journal, read_only=True)
    try:
        return [r.event for r in reader.read("default")]
    finally:
        reader.close()


# --- PostgreSQL: the same faults on the fleet journal ------------------------------------------


def test_postgres_connection_dropped_mid_load_is_retried(
    postgres_url: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    engine = Engine.open(postgres_url, run_dir=tmp_path / "run")

    def drop_every_connection() -> None:
        with admin.connect() as conn:
            dropped = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
        assert dropped

    try:
        engine.observe(_on("spawn_started", drop_every_connection))
        result = engine.load(LoadRequest(model_path=str(tiny_model)))
        assert result.status == "loaded", result
        assert len(marked_servers(engine)) == 1
    finally:
        engine.close()
        admin.dispose()
    assert not marked_servers(engine)
    _verify_ok(postgres_url, capsys)


def test_postgres_lock_held_past_the_retries_kills_the_child(
    postgres_url: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locker_engine = sa.create_engine(postgres_url)
    locker = locker_engine.connect()
    engine = Engine.open(postgres_url, run_dir=tmp_path / "run", busy_timeout=0.2)
    try:
        engine.observe(
            _on(
                "spawn_started",
                lambda: locker.execute(sa.text("LOCK TABLE events IN EXCLUSIVE MODE")),
            )
        )
        request = LoadRequest(model_path=str(tiny_model))
        with pytest.raises(JournalUnavailable) as refused:
            engine.load(request)
        assert "lock timeout" in str(refused.value)
        assert not marked_servers(engine)
        locker.rollback()
        engine._observers.clear()
        assert engine.load(request).status == "loaded"
        assert len(marked_servers(engine)) == 1
    finally:
        engine.close()
        locker.close()
        locker_engine.dispose()
    assert not marked_servers(engine)
    _verify_ok(postgres_url, capsys)
