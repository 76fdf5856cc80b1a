"""One engine per journal slot: a lease row in the journal database (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine import EngineError
from engine.adapters.journal import Journal
from engine.adapters.lease import Lease, SlotBusy, db_now, this_process
from engine.adapters.schema import leases_table
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from tests.fakes import FakeEffects


def _open(url: str, **options: object) -> Engine:
    return Engine.open(url, effects=FakeEffects(), monitor=False, **options)  # type: ignore[arg-type]


def _set_holder(url: str, **values: object) -> None:
    journal = Journal.open(url)
    try:
        with journal.engine.begin() as conn:
            conn.execute(leases_table.update().values(**values))
    finally:
        journal.close()


def _lease_rows(url: str) -> list[sa.Row[tuple[object, ...]]]:
    journal = Journal.open(url)
    try:
        with journal.engine.connect() as conn:
            return list(conn.execute(sa.select(leases_table)))
    finally:
        journal.close()


def test_a_second_engine_on_the_same_slot_is_refused(any_journal_url: str) -> None:
    first = _open(any_journal_url)
    try:
        with pytest.raises(SlotBusy, match=r"slot 'default' .* managed by another engine \(pid"):
            _open(any_journal_url)
        other_slot = _open(any_journal_url, slot="second")  # another slot is independent
        other_slot.close()
    finally:
        first.close()
    assert _lease_rows(any_journal_url) == []  # released at close
    _open(any_journal_url).close()


def _forget_lease(engine: Engine) -> None:
    """Drop the engine's lease without releasing it: as if the engine were SIGKILLed."""
    assert engine._lease is not None
    engine._lease.stop()
    engine._lease = None


def test_lease_of_a_dead_process_on_this_host_is_taken_over(any_journal_url: str) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = _open(any_journal_url)
    _set_holder(any_journal_url, pid=dead.pid, holder="crashed-engine")
    _forget_lease(first)  # forget it without releasing: as if SIGKILLed
    first.close()
    second = _open(any_journal_url)  # the holder's pid is gone: taken over
    second.close()


def test_reused_pid_is_not_the_holder(any_journal_url: str) -> None:
    first = _open(any_journal_url)
    # Our own (live) pid, but other start ticks: the pid was reused by someone else.
    _set_holder(any_journal_url, holder="old-engine", create_time=1.0, start_ticks=1)
    _forget_lease(first)
    first.close()
    _open(any_journal_url).close()


def test_a_clock_step_does_not_make_a_live_holder_dead(any_journal_url: str) -> None:
    first = _open(any_journal_url)
    # The wall clock stepped an hour since the holder wrote its create_time; its start ticks
    # (our own live process) still say it is alive.
    (row,) = _lease_rows(any_journal_url)
    _set_holder(any_journal_url, holder="old-engine", create_time=row.create_time - 3600)
    _forget_lease(first)
    first.close()
    with pytest.raises(SlotBusy):
        _open(any_journal_url)
    _set_holder(any_journal_url, start_ticks=None, create_time=0.0)  # an older engine's row
    _open(any_journal_url).close()  # without ticks, create_time still decides


def test_another_pid_namespace_of_this_host_is_not_checked_by_pid(any_journal_url: str) -> None:
    first = _open(any_journal_url)
    # A container with our hostname and boot: pid 999999 means nothing in our namespace.
    _set_holder(any_journal_url, holder="container", pid=999_999, pid_namespace="pid:[1]")
    _forget_lease(first)
    first.close()
    with pytest.raises(SlotBusy, match="pid 999999"):
        _open(any_journal_url)


def test_other_host_lease_blocks_until_it_expires(any_journal_url: str) -> None:
    first = _open(any_journal_url, lease_ttl=30.0)
    _set_holder(any_journal_url, holder="remote", host="another-host", pid=1)
    _forget_lease(first)
    first.close()
    with pytest.raises(SlotBusy, match="pid 1 on host 'another-host'"):
        _open(any_journal_url)
    journal = Journal.open(any_journal_url)
    try:
        with journal.engine.connect() as conn:
            now = db_now(conn)
    finally:
        journal.close()
    _set_holder(any_journal_url, heartbeat_at=now - 60, expires_at=now - 30)
    _open(any_journal_url).close()  # expired: taken over


def test_heartbeat_renews_and_a_taken_lease_stops_the_engine(
    any_journal_url: str, tmp_path: Path
) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"GGUF")
    engine = _open(any_journal_url)
    try:
        lease = engine._lease
        assert lease is not None
        (before,) = _lease_rows(any_journal_url)
        assert lease.heartbeat()
        (after,) = _lease_rows(any_journal_url)
        assert after.expires_at >= before.expires_at
        _set_holder(any_journal_url, holder="usurper")
        assert not lease.heartbeat() and lease.lost
        with pytest.raises(EngineError, match="taken over by another engine"):
            engine.load(LoadRequest(model_path=str(model)))
    finally:
        _forget_lease(engine)
        engine.close()


def test_holder_identity_is_this_process() -> None:
    me = this_process()
    assert me.pid == os.getpid() and me.host and me.boot_id


def test_bad_ttl_is_refused(any_journal_url: str) -> None:
    journal = Journal.open(any_journal_url)
    try:
        with pytest.raises(ValueError, match="lease ttl must be positive"):
            Lease.acquire(journal, "default", ttl=0)
    finally:
        journal.close()
