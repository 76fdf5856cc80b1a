"""Closed means closed; every call is journaled with its end; no-op events skip the fsync."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from engine import EngineClosed, EngineError, JournalUnavailable, LoadRequest
from engine.adapters.journal import Journal
from engine.cli.main import main as cli_main
from engine.core import events as ev
from engine.core.postmortem import analyse
from engine.core.request import LoadResult
from engine.core.state import PendingLoad, SlotState
from engine.effects import CancelToken
from engine.orchestrator import Engine
from tests.fakes import FakeEffects


def _model(folder: Path, name: str) -> str:
    path = folder / name
    path.write_bytes(b"GGUF")
    return str(path)


def test_every_public_call_after_close_raises_engine_closed(
    journal_path: Path, tmp_path: Path
) -> None:
    engine = Engine.open(journal_path, effects=FakeEffects(), monitor=False)
    request = LoadRequest(model_path=_model(tmp_path, "a.gguf"))
    engine.close()
    engine.close()  # closing twice is a no-op
    calls = {
        "load": lambda: engine.load(request),
        "unload": engine.unload,
        "cancel": engine.cancel,
        "status": engine.status,
        "progress": engine.progress,
        "aload": lambda: asyncio.run(engine.aload(request)),
        "aunload": lambda: asyncio.run(engine.aunload()),
    }
    for name, call in calls.items():
        with pytest.raises(EngineClosed, match="is closed"):
            call()
        assert name


class SlowResolve(FakeEffects):
    """Loads take a few milliseconds, so concurrent calls queue behind each other."""

    def resolve(self, spec: ev.LoadSpec, cancel: CancelToken, **kwargs: object) -> ev.ResolvedModel:
        time.sleep(0.003)
        return super().resolve(spec, cancel)  # type: ignore[arg-type]


def test_thirty_racing_loads_are_thirty_journaled_calls_with_ends(
    journal_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [_model(tmp_path, f"m{i % 7}.gguf") for i in range(30)]
    engine = Engine.open(journal_path, effects=SlowResolve(), monitor=False)
    results: list[LoadResult] = []
    start = threading.Barrier(30)

    def call(model: str) -> None:
        start.wait()
        results.append(engine.load(LoadRequest(model_path=model)))

    threads = [threading.Thread(target=call, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.close()
    assert len(results) == 30

    journal = Journal.open(journal_path, read_only=True)
    try:
        events = [r.event for r in journal.read("default")]
    finally:
        journal.close()
    calls = [
        e
        for e in events
        if e.type in ("load_requested", "load_short_circuited", "load_joined", "load_superseded")
    ]
    assert len(calls) == 30, [e.type for e in calls]
    assert any(e.type == "load_superseded" for e in events)  # the race did supersede some
    verified = cli_main(["verify", str(journal_path)])
    assert verified == 0, capsys.readouterr().out
    capsys.readouterr()
    assert cli_main(["postmortem", str(journal_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["loads"]) == 30


def test_verify_flags_a_load_that_never_ended() -> None:
    spec = ev.LoadSpec(model="/m/a.gguf")
    pending = SlotState(state="resolving", version=1, pending=PendingLoad("a", spec))
    records = [
        (1, ev.LoadRequested(at=1.0, load_id="a", spec=spec), pending),
        (2, ev.RecoveryStarted(at=2.0, previous_state="resolving"), SlotState("recovering", 2)),
    ]
    report = analyse(records)
    assert [a.kind for a in report.violations] == ["unended_load"]
    still_in_flight = analyse(records[:1])  # the journal simply ends mid-load: not a violation
    assert not still_in_flight.violations


def test_short_circuit_and_join_skip_the_fsync_and_state_changes_do_not(
    journal_path: Path, tmp_path: Path
) -> None:
    engine = Engine.open(journal_path, effects=FakeEffects(), monitor=False)
    journal = engine.journal
    synchronous: list[int] = []
    append = journal.append

    def recording(*args: object, **kwargs: object) -> None:
        append(*args, **kwargs)  # type: ignore[arg-type]
        writer = journal._writer
        assert writer is not None
        synchronous.append(writer.exec_driver_sql("PRAGMA synchronous").scalar())
        writer.commit()

    try:
        request = LoadRequest(model_path=_model(tmp_path, "a.gguf"))
        assert engine.load(request).status == "loaded"
        engine.journal.append = recording  # type: ignore[method-assign]
        assert engine.load(request).status == "already_loaded"
        assert synchronous == [0]  # OFF: no fsync of its own
        engine.unload()  # unload_requested, kill_started (write-ahead), process_exited, unloaded
        assert synchronous == [0, 0, 2, 0, 0]  # only the intent before the kill is fsynced
    finally:
        engine.close()
    reader = Journal.open(journal_path, read_only=True)
    try:
        kinds = [r.event.type for r in reader.read("default")]
    finally:
        reader.close()
    assert kinds[-5:] == [
        "load_short_circuited",
        "unload_requested",
        "kill_started",
        "process_exited",
        "unloaded",
    ]


def test_monitor_outlives_any_journal_error_and_catches_up(
    journal_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    effects = FakeEffects()
    engine = Engine.open(journal_path, effects=effects)  # with its crash monitor
    try:
        assert engine.load(LoadRequest(model_path=_model(tmp_path, "a.gguf"))).status == "loaded"
        append = engine.journal.append
        failures = [JournalUnavailable("disk full"), EngineError("lease lost"), OSError("EIO")]

        def flaky(*args: object, **kwargs: object) -> None:
            if failures:
                raise failures.pop(0)
            append(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(engine.journal, "append", flaky)
        pid = engine.status().pid
        assert pid is not None
        effects.die(pid)
        deadline = time.monotonic() + 5
        while engine.state.state != "crashed" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not failures and engine.state.state == "crashed"
        assert engine._monitor is not None and engine._monitor.is_alive()
    finally:
        engine.close()
