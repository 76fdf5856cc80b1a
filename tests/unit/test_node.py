"""The Node across slots, with processes faked at the Effects boundary (real SQLite journal)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.adapters.journal import Journal
from engine.adapters.lease import SlotBusy
from engine.core import node_events as nev
from engine.core.errors import EngineError
from engine.core.rules import InvalidRequest
from engine.node import Node
from tests.fakes import FakeEffects

MIB = 1 << 20


@pytest.fixture
def models(tmp_path: Path) -> list[str]:
    paths = []
    for name in ("a", "b", "c", "d"):
        path = tmp_path / "models" / f"{name}.gguf"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"GGUF")
        paths.append(str(path))
    return paths


@pytest.fixture
def effects() -> FakeEffects:
    return FakeEffects()


def open_node(journal: Path, effects: FakeEffects, **options: object) -> Node:
    return Node.open(journal, effects=effects, monitor=False, **options)  # type: ignore[arg-type]


@pytest.fixture
def node(journal_path: Path, effects: FakeEffects) -> Iterator[Node]:
    node = open_node(journal_path, effects, max_servers=2)
    yield node
    node.close()


def node_events(journal_path: Path) -> list[nev.NodeEvent]:
    journal = Journal.open(journal_path, create=False)
    try:
        return [nev.parse_node_event(p) for *_, p in journal.read_rows(nev.NODE_STREAM)]
    finally:
        journal.close()


def evictions(journal_path: Path) -> list[nev.Evicted]:
    return [e for e in node_events(journal_path) if isinstance(e, nev.Evicted)]


def live(effects: FakeEffects) -> int:
    return sum(effects.alive.values())


def test_a_third_server_evicts_the_least_recently_used_idle_one(
    node: Node, models: list[str], effects: FakeEffects, journal_path: Path
) -> None:
    assert node.load("a", {"model_path": models[0]}).status == "loaded"
    assert node.load("b", {"model_path": models[1]}).status == "loaded"
    node.touch("a")  # b is now the least recently used
    assert node.load("c", {"model_path": models[2]}).status == "loaded"
    assert node.slot("b").status().state == "idle" and live(effects) == 2
    (evicted,) = evictions(journal_path)
    assert (evicted.slot, evicted.cause, evicted.for_slot) == ("b", "capacity", "c")
    assert evicted.freed_bytes == 100 * MIB  # the measured figure, not the planned one
    status = node.status()
    assert status.servers == 2 and set(status.slots) == {"a", "b", "c"}
    assert status.slots["a"].measured and status.slots["a"].held_bytes == 100 * MIB


def test_a_pinned_slot_is_never_evicted(node: Node, models: list[str], journal_path: Path) -> None:
    node.load("a", {"model_path": models[0]})
    node.load("b", {"model_path": models[1]})
    node.pin("a")  # the least recently used, but pinned
    node.load("c", {"model_path": models[2]})
    assert [e.slot for e in evictions(journal_path)] == ["b"]
    node.pin("c")
    refused = node.load("d", {"model_path": models[3]})
    assert refused.status == "failed"
    assert "pinned" in (refused.error or "") and "max_servers 2" in (refused.error or "")
    assert [e.slot for e in evictions(journal_path)] == ["b"]  # nothing evicted for nothing


def test_a_slot_in_use_is_not_evicted_and_the_load_fails_clearly(
    node: Node, models: list[str], effects: FakeEffects, journal_path: Path
) -> None:
    node.load("a", {"model_path": models[0]})
    node.load("b", {"model_path": models[1]})
    node.pin("b")
    with node.in_use("a"):
        refused = node.load("c", {"model_path": models[2]})
    assert refused.status == "failed" and "a (in use" in (refused.error or "")
    assert evictions(journal_path) == [] and live(effects) == 2
    assert node.slot("c").status().state == "failed"
    admission = [e for e in node_events(journal_path) if isinstance(e, nev.NodeAdmission)][-1]
    assert admission.verdict == "refused" and admission.servers == 2


def test_wait_for_capacity_waits_for_the_server_in_use(
    journal_path: Path, models: list[str], effects: FakeEffects
) -> None:
    with open_node(journal_path, effects, max_servers=1, wait_for_capacity=5.0) as node:
        node.load("a", {"model_path": models[0]})
        held = threading.Event()

        def use_a_briefly() -> None:
            with node.in_use("a"):
                held.set()
                time.sleep(0.3)

        user = threading.Thread(target=use_a_briefly)
        user.start()
        held.wait()
        result = node.load("b", {"model_path": models[1]})
        user.join()
        assert result.status == "loaded"
        admission = [e for e in node_events(journal_path) if isinstance(e, nev.NodeAdmission)][-1]
        assert admission.evicted == ("a",) and admission.waited_s >= 0.2


def test_in_use_is_refused_while_the_slot_is_being_evicted(node: Node, models: list[str]) -> None:
    node.load("a", {"model_path": models[0]})
    engine = node.slot("a")
    assert engine.claim_idle()
    try:
        with pytest.raises(EngineError, match="being evicted"), node.in_use("a"):
            pass
    finally:
        engine.release_claim()
    with node.in_use("a"):
        assert not engine.claim_idle()  # in use: not idle


def test_memory_limit_evicts_by_measured_memory(
    journal_path: Path, models: list[str], effects: FakeEffects
) -> None:
    # Planned need of a fake model: 512 MiB (runtime allowance); each measures 100 MiB.
    with open_node(journal_path, effects, memory_limit=700 * MIB) as node:
        node.load("a", {"model_path": models[0]})
        node.load("b", {"model_path": models[1]})
        assert node.load("c", {"model_path": models[2]}).status == "loaded"  # 200 + 512 > 700
        (evicted,) = evictions(journal_path)
        assert (evicted.slot, evicted.cause) == ("a", "memory")
        # The same launch again: its measured figure (100 MiB) is the need now, not 512.
        assert node.load("a", {"model_path": models[0]}).status == "loaded"
        admission = [e for e in node_events(journal_path) if isinstance(e, nev.NodeAdmission)][-1]
        assert admission.need_source == "measured" and admission.need_bytes == 100 * MIB


def test_ttl_evicts_an_idle_server(
    journal_path: Path, models: list[str], effects: FakeEffects
) -> None:
    with open_node(journal_path, effects) as node:
        node.load("a", {"model_path": models[0]}, ttl=0.2)
        node.load("b", {"model_path": models[1]})  # no TTL: stays
        deadline = time.monotonic() + 5
        while node.slot("a").status().state != "idle" and time.monotonic() < deadline:
            time.sleep(0.05)
        (evicted,) = evictions(journal_path)
        assert (evicted.slot, evicted.cause) == ("a", "ttl") and evicted.idle_s >= 0.2
        assert node.slot("b").status().state == "ready"


def test_restore_reloads_servers_that_died_while_the_node_was_down(
    journal_path: Path, models: list[str], effects: FakeEffects
) -> None:
    node = open_node(journal_path, effects, max_servers=3)
    node.load("a", {"model_path": models[0]})
    node.load("b", {"model_path": models[1]})
    node.load("c", {"model_path": models[2]})
    node.unload("c")  # a manual unload: not brought back
    pids = {name: node.slot(name).status().pid for name in ("a", "b")}
    node.close(keep_servers=True)
    for pid in pids.values():
        assert pid is not None
        effects.die(pid)
    with open_node(journal_path, effects, max_servers=3, restore=True) as again:
        status = again.status()
        assert {n for n, s in status.slots.items() if s.status.state == "ready"} == {"a", "b"}
        assert all(status.slots[n].status.pid not in pids.values() for n in ("a", "b"))
    assert [e.cause for e in evictions(journal_path)][:1] == ["manual"]


def test_pins_and_ttls_survive_a_restart(
    journal_path: Path, models: list[str], effects: FakeEffects
) -> None:
    node = open_node(journal_path, effects)
    node.load("a", {"model_path": models[0]}, ttl=30.0)
    node.pin("a")
    node.close()
    with open_node(journal_path, effects) as again:
        info = again.status().slots["a"]
        assert info.pinned and info.ttl_s == 30.0
    assert live(effects) == 0


def test_bad_names_and_options_are_clear_errors(
    journal_path: Path, effects: FakeEffects, node: Node, models: list[str]
) -> None:
    with pytest.raises(InvalidRequest, match="'@node'"):
        node.load("@node", {"model_path": models[0]})
    with pytest.raises(KeyError, match="no slot 'x'"):
        node.slot("x")
    with pytest.raises(ValueError, match="ttl"):
        node.load("a", {"model_path": models[0]}, ttl=0)
    with pytest.raises(ValueError, match="max_servers"):
        open_node(journal_path.with_name("other.db"), effects, max_servers=0)
    with pytest.raises(SlotBusy, match="'@node'"):
        open_node(journal_path, effects)  # one node per journal


def test_postmortem_says_why_a_server_was_evicted(
    node: Node,
    models: list[str],
    journal_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from engine.cli.main import main

    node.load("a", {"model_path": models[0]})
    node.load("b", {"model_path": models[1]})
    node.touch("a")
    third = node.load("c", {"model_path": models[2]})
    capsys.readouterr()
    assert main(["postmortem", str(journal_path), "--slot", "b"]) == 0
    text = capsys.readouterr().out
    assert "EVICTIONS (1)" in text
    assert f"max_servers: made room for load {third.load_id} on slot 'c'" in text
    assert "least recently used idle server (idle" in text and "held 100 MiB" in text
    assert models[2] in text  # the model that needed the room
    assert main(["postmortem", str(journal_path), "--slot", "@node", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(e["slot"], e["cause"]) for e in report["evictions"]] == [("b", "capacity")]
    assert report["evictions"][0]["for_need_bytes"] == 512 * MIB
    assert main(["verify", str(journal_path)]) == 0


def test_verify_fails_when_the_node_evicted_a_pinned_server(
    journal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli.main import main

    journal = Journal.open(journal_path)
    try:
        journal.append(
            nev.NODE_STREAM,
            0,
            [
                nev.SlotPinned(at=1.0, slot="a", pinned=True),
                nev.Evicted(at=2.0, slot="a", cause="memory", idle_s=1.0, freed_bytes=1),
            ],
        )
    finally:
        journal.close()
    assert main(["verify", str(journal_path)]) == 1
    assert "evicted_pinned" in capsys.readouterr().out


def test_a_ready_server_is_measured_again_when_its_memory_grows(
    journal_path: Path,
    models: list[str],
    effects: FakeEffects,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("engine.node.RESAMPLE_S", 0.0)
    with open_node(journal_path, effects) as node:
        node.load("a", {"model_path": models[0]})
        pid = node.slot("a").status().pid
        assert pid is not None
        effects.rss[pid] = 105 * MIB  # within max(64 MiB, 10 %): not journaled again
        time.sleep(1.2)
        effects.rss[pid] = 400 * MIB
        deadline = time.monotonic() + 5
        while node.status().slots["a"].held_bytes != 400 * MIB and time.monotonic() < deadline:
            time.sleep(0.05)
    measured = [e.rss_bytes for e in node_events(journal_path) if isinstance(e, nev.ServerMeasured)]
    assert measured == [100 * MIB, 400 * MIB]


def test_restore_follows_last_use_within_the_limits_and_lru_survives_a_restart(
    journal_path: Path, models: list[str], effects: FakeEffects
) -> None:
    node = open_node(journal_path, effects, max_servers=3)
    for name, model in zip(("a", "b", "c"), models, strict=False):
        node.load(name, {"model_path": model})
    for name in ("c", "b", "a"):  # a is the most recently used, c the least
        time.sleep(0.02)
        node.touch(name)
    pids = [node.slot(n).status().pid for n in ("a", "b", "c")]
    node.close(keep_servers=True)
    for pid in pids:
        assert pid is not None
        effects.die(pid)
    with open_node(journal_path, effects, max_servers=2, restore=True) as again:
        states = {n: s.status.state for n, s in again.status().slots.items()}
        assert states == {"a": "ready", "b": "ready", "c": "failed"}  # c: no room, no eviction
        refused = [e for e in node_events(journal_path) if isinstance(e, nev.NodeAdmission)][-1]
        assert refused.slot == "c" and refused.verdict == "refused" and refused.evicted == ()
        again.load("d", {"model_path": models[3]})  # b is older than a: it goes
        assert [e.slot for e in evictions(journal_path) if e.cause == "capacity"] == ["b"]
