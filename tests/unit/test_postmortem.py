"""`postmortem`, `verify` and `diagram --journal` on engine-written and hand-made journals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.adapters.journal import Journal
from engine.cli.main import main
from engine.core import events as ev
from engine.core.evolve import evolve
from engine.core.postmortem import analyse
from engine.core.request import LoadRequest
from engine.core.state import SlotState
from engine.orchestrator import Engine
from tests.fakes import FakeEffects

SPEC = ev.LoadSpec(model="/m/a.gguf", max_seq_length=4096, extra_args=("--top-k", "20"))
MODEL = ev.ResolvedModel(source="file:/m/a.gguf", model_file="/m/a.gguf")


def _load(load_id: str, t: float, pid: int, *, waited: float = 0.1) -> list[ev.BaseEvent]:
    """A complete load from idle (or after a confirmed kill) starting at time t."""
    return [
        ev.LoadRequested(at=t, load_id=load_id, spec=SPEC),
        ev.ModelResolved(at=t + 0.5, load_id=load_id, model=MODEL),
        ev.SettleStarted(at=t + 0.5, load_id=load_id),
        ev.Settled(at=t + 0.75, load_id=load_id, outcome="cpu-only"),
        ev.SpawnStarted(
            at=t + 0.75,
            load_id=load_id,
            argv=("llama-server", "-m", "/m/a.gguf", "--top-k", "20"),
            port=9000 + pid,
            marker=f"j/default/{load_id}",
            log_path=f"/l/{load_id}.log",
            extra_args=("--top-k", "20"),
            extra_args_source="file:/m/a.gguf",
        ),
        ev.Spawned(at=t + 1.0, load_id=load_id, pid=pid, create_time=float(pid)),
        ev.HealthPassed(at=t + 1.0 + waited, load_id=load_id, waited_s=waited),
        ev.LoadSucceeded(at=t + 1.0 + waited, load_id=load_id),
    ]


def _write(path: Path, events: list[ev.BaseEvent]) -> None:
    journal = Journal.open(path)
    try:
        journal.append("default", 0, events)
    finally:
        journal.close()


def _records(events: list[ev.BaseEvent]) -> list[tuple[int, ev.Event, SlotState]]:
    """What replay_steps yields: each event with the state it led to."""
    records, state = [], SlotState()
    for seq, event in enumerate(events, start=1):
        state = evolve(state, event, seq)  # type: ignore[arg-type]
        records.append((seq, event, state))
    return records  # type: ignore[return-value]


def test_phases_settings_and_extra_args_of_each_load() -> None:
    events = _load("a", 100.0, 1)
    report = analyse(_records(events))
    (load,) = report.loads
    assert load.outcome == "loaded"
    assert load.phases == pytest.approx(
        {"resolve": 0.5, "settle": 0.25, "spawn": 0.25, "warm": 0.1}
    )
    assert load.total_s == pytest.approx(1.1)
    assert load.settings["max_seq_length"] == 4096
    assert load.requested_extra_args == ["--top-k", "20"]
    assert load.extra_args == ["--top-k", "20"] and load.pid == 1
    assert report.anomalies == [] and report.final_state == "ready"


def test_reload_without_a_confirmed_kill_is_a_violation(
    journal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Legal for the machine (settle may start from resolving), but pid 1 was never killed.
    events = _load("a", 100.0, 1) + _load("b", 200.0, 2)
    _write(journal_path, events)
    assert main(["verify", str(journal_path)]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION slot 'default': event #13: spawn_without_confirmed_kill" in out
    assert "event #14: two_live_processes: pid 2 is live while pid 1" in out


def test_reload_with_a_confirmed_kill_verifies(
    journal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = _load("b", 200.0, 2)
    kill = [
        ev.KillStarted(at=200.5, load_id="b", pid=1, create_time=1.0, reason="replace"),
        ev.ProcessExited(at=200.7, load_id="b", pid=1, returncode=0),
    ]
    events = [*_load("a", 100.0, 1), *second[:2], *kill, *second[2:]]
    _write(journal_path, events)
    assert main(["verify", str(journal_path)]) == 0
    assert "ok: 1 slot(s)" in capsys.readouterr().out
    report = analyse(_records(events))
    assert report.loads[1].phases["kill"] == pytest.approx(0.2)
    assert report.violations == []


def test_anomalies_settle_timeout_slow_health_orphan(journal_path: Path) -> None:
    events = _load("a", 100.0, 1, waited=90.0)
    events[3] = ev.Settled(at=100.75, load_id="a", outcome="timeout", waited_s=2.0)
    events += [
        ev.RecoveryStarted(at=300.0, previous_state="ready"),
        ev.OrphanKilled(at=300.1, pid=77, create_time=7.0, marker="j/default/x"),
        ev.RecoveryAdopted(at=300.2, pid=1, create_time=1.0),
        ev.RecoveryFinished(at=300.2, summary="adopted healthy llama-server pid 1"),
    ]
    report = analyse(_records(events))
    kinds = [a.kind for a in report.anomalies]
    assert kinds == ["settle_timeout", "slow_health", "orphan_killed"]
    assert report.violations == []
    (recovery,) = report.recoveries
    assert (recovery.adopted_pid, recovery.orphans_killed) == (1, (77,))
    assert [a.kind for a in analyse(_records(events), health_wait_s=120).anomalies] == [
        "settle_timeout",
        "orphan_killed",
    ]


def test_interrupted_load_and_window(journal_path: Path) -> None:
    events = [
        *_load("a", 100.0, 1),
        ev.LoadRequested(at=200.0, load_id="b", spec=SPEC),
        ev.RecoveryStarted(at=300.0, previous_state="resolving"),
        ev.KillStarted(at=300.1, pid=1, create_time=1.0, reason="recovery"),
        ev.ProcessExited(at=300.2, pid=1),
        ev.LoadFailed(at=300.3, load_id="b", error="interrupted by backend crash"),
        ev.RecoveryFinished(at=300.3, summary="interrupted"),
    ]
    report = analyse(_records(events))
    assert [(i.kind, i.load_id) for i in report.incidents] == [("interrupted", "b")]
    assert report.loads[1].outcome == "interrupted"
    windowed = analyse(_records(events), since=150.0, until=10)
    assert [row.seq for row in windowed.timeline] == [9, 10]
    assert [load.load_id for load in windowed.loads] == ["b"]


def test_postmortem_cli_on_an_engine_journal(
    journal_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a.gguf", "crashy.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    effects = FakeEffects()
    engine = Engine.open(journal_path, effects=effects, monitor=False)
    try:
        assert engine.load(LoadRequest(model_path=str(tmp_path / "a.gguf"))).status == "loaded"
        failed = engine.load(
            LoadRequest(model_path=str(tmp_path / "crashy.gguf"), llama_extra_args=["--seed", "1"])
        )
        assert failed.status == "failed"
        assert engine.load(LoadRequest(model_path=str(tmp_path / "a.gguf"))).status == "loaded"
        assert engine.state.process is not None
        effects.die(engine.state.process.pid)
        assert engine.check_crashed()
    finally:
        engine.close()
    assert main(["postmortem", str(journal_path)]) == 0
    text = capsys.readouterr().out
    assert "LOADS (3)" in text and "resolve" in text and "warm" in text
    assert "failed (load " in text and "error: fake server failed to load" in text
    assert "extra args: requested --seed 1; in force --seed 1" in text
    assert "crashed (load " in text
    assert main(["postmortem", str(journal_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    outcomes = [load["outcome"] for load in document["loads"]]
    assert outcomes == ["loaded", "failed", "loaded"]
    assert set(document["loads"][1]["phases"]) == {"resolve", "kill", "settle", "spawn", "warm"}
    assert [i["kind"] for i in document["incidents"]] == ["failed", "crashed"]
    assert main(["verify", str(journal_path)]) == 0
    assert main(["diagram", "--journal", str(journal_path), "--stdout"]) == 0
    diagram = capsys.readouterr().out
    assert "ready --> crashed : crashed x1" in diagram
    assert "idle --> resolving : load_requested x1" in diagram


def test_postmortem_cli_rejects_bad_bounds(
    journal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(journal_path, _load("a", 100.0, 1))
    assert main(["postmortem", str(journal_path), "--since", "yesterday"]) == 2
    assert "--since or --until takes a sequence number or an ISO time" in capsys.readouterr().err
    assert main(["postmortem", str(journal_path), "--slot", "nope"]) == 2
    assert "no slot 'nope'" in capsys.readouterr().err


def _planned_load(load_id: str, t: float, pid: int, n_ctx: int) -> list[ev.BaseEvent]:
    """A load with its launch plan (8192 tokens, 4 unified slots) and the server's /props."""
    plan = ev.LaunchPlan(
        context=8192,
        max_context=16384,
        native_context=131072,
        parallel_slots=4,
        kv_unified=True,
        gpus=(1,),
        offload="full",
        flags=("-ngl", "-1", "--fit", "off"),
        devices=(ev.DeviceBudget(index=1, budget_bytes=10 << 30, planned_bytes=9 << 30),),
        weights_bytes=8 << 30,
        kv_cache_bytes=1 << 29,
        need_bytes=9 << 30,
        reason="auto-fit context 8192 of 131072 native fits on GPU 1",
    )
    planned = ev.LaunchPlanned(
        at=t + 0.75,
        load_id=load_id,
        inventory=ev.Inventory(ram_total_bytes=1 << 34, ram_available_bytes=1 << 33),
        request=ev.PlanRequest(),
        policy=ev.PlanPolicy(supports_kv_unified=True, supports_fit=True),
        plan=plan,
    )
    props = ev.ServerPropsRead(
        at=t + 1.1, load_id=load_id, props=ev.ServerProps(n_ctx=n_ctx, total_slots=4)
    )
    events = _load(load_id, t, pid)
    return [*events[:4], planned, *events[4:7], props, events[7]]


def test_postmortem_shows_planned_vs_effective_and_a_context_mismatch(
    journal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(journal_path, _planned_load("a", 100.0, 1, n_ctx=4096))
    assert main(["postmortem", str(journal_path)]) == 0
    text = capsys.readouterr().out
    assert (
        "planned: context 8192 (ceiling 16384, native 131072), 4 slots kv-unified, GPUs 1, "
        "offload full: auto-fit context 8192 of 131072 native fits on GPU 1"
    ) in text
    assert "effective: n_ctx 4096, 4 slots (GET /props)" in text
    assert (
        "context_mismatch: load a planned 8192 tokens per slot, the server reports n_ctx 4096"
        in text
    )
    assert main(["verify", str(journal_path)]) == 0  # worth a look, not a contract violation


def test_no_anomaly_when_the_server_got_the_planned_context() -> None:
    report = analyse(_records(_planned_load("a", 100.0, 1, n_ctx=8192)))
    (load,) = report.loads
    assert load.planned is not None and load.planned["gpus"] == (1,)
    assert load.effective == {"n_ctx": 8192, "total_slots": 4}
    assert report.anomalies == []
