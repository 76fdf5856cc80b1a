"""A Node of several real llama-servers on one host: eviction by count and by measured memory,
pins, in-use servers, parallel loads, adoption and restore after kill -9."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from engine.adapters.journal import Journal
from engine.adapters.process import ProcessManager
from engine.cli.tiny_model import write_tiny_model
from engine.core import node_events as nev
from engine.node import Node
from engine.replay import replay_state

pytestmark = pytest.mark.server

MIB = 1 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    base = tmp_path_factory.mktemp("node-models")
    return [str(write_tiny_model(base / f"m{i}.gguf", seed=i)) for i in range(4)]


def live_pids(journal_id: str) -> dict[str, int]:
    """slot -> pid of the live marked servers of this journal (from the process table)."""
    found = {}
    for pid, _, marker in ProcessManager().marked_processes(journal_id + "/"):
        found[marker.split("/")[1]] = pid
    return found


def node_events(journal: Path) -> list[nev.NodeEvent]:
    opened = Journal.open(journal, create=False)
    try:
        return [nev.parse_node_event(p) for *_, p in opened.read_rows(nev.NODE_STREAM)]
    finally:
        opened.close()


def check_closed(node: Node, journal: Path) -> None:
    """Every slot replays to its live state, and no server of this journal is left."""
    journal_id = node.slot(node.names()[0]).journal_id
    states = {name: node.slot(name).state for name in node.names()}
    node.close()
    opened = Journal.open(journal, create=False)
    try:
        for name in states:
            replayed = replay_state(opened.read_rows(name))
            assert replayed.state == "idle", (name, replayed.state)
    finally:
        opened.close()
    assert live_pids(journal_id) == {}, "a llama-server was left running"


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def node(journal: Path, tmp_path: Path) -> Iterator[Node]:
    node = Node.open(journal, run_dir=tmp_path / "run", max_servers=2)
    yield node
    check_closed(node, journal)


def test_max_servers_pins_and_in_use(node: Node, models: list[str], journal: Path) -> None:
    assert node.load("chat", {"model_path": models[0]}).ok
    assert node.load("embed", {"model_path": models[1]}).ok
    journal_id = node.slot("chat").journal_id
    node.touch("chat")  # embed is now the least recently used
    assert node.load("third", {"model_path": models[2]}).ok
    assert set(live_pids(journal_id)) == {"chat", "third"}
    evicted = [e for e in node_events(journal) if isinstance(e, nev.Evicted)]
    assert [(e.slot, e.cause, e.for_slot) for e in evicted] == [("embed", "capacity", "third")]
    assert evicted[0].freed_bytes > 0  # its measured RSS

    node.pin("chat")  # now the least recently used, but pinned
    with node.in_use("third"):
        refused = node.load("embed", {"model_path": models[1]})
    assert refused.status == "failed"
    assert "chat (pinned" in (refused.error or "") and "third (in use" in (refused.error or "")
    assert set(live_pids(journal_id)) == {"chat", "third"}  # nothing evicted for nothing
    assert node.load("embed", {"model_path": models[1]}).ok  # third is idle again
    assert set(live_pids(journal_id)) == {"chat", "embed"}


def test_memory_limit_from_measured_rss_evicts_by_memory(
    journal: Path, tmp_path: Path, models: list[str]
) -> None:
    with Node.open(journal, run_dir=tmp_path / "run") as first:  # measure three servers
        for name, model in zip(("a", "b", "c"), models, strict=False):
            assert first.load(name, {"model_path": model}).ok
        measured = {n: s.held_bytes for n, s in first.status().slots.items()}
    assert all(figure > 0 for figure in measured.values()), measured
    # Room for two of them, not three (measured figures are the needs now).
    limit = measured["a"] + measured["b"] + min(measured.values()) // 2
    node = Node.open(journal, run_dir=tmp_path / "run", memory_limit=limit)
    try:
        assert node.load("a", {"model_path": models[0]}).ok
        assert node.load("b", {"model_path": models[1]}).ok
        assert node.load("c", {"model_path": models[2]}).ok
        evicted = [e for e in node_events(journal) if isinstance(e, nev.Evicted)]
        assert [(e.slot, e.cause) for e in evicted if e.cause != "manual"] == [("a", "memory")]
        admissions = [e for e in node_events(journal) if isinstance(e, nev.NodeAdmission)]
        assert admissions[-1].need_source == "measured" and admissions[-1].evicted == ("a",)
        assert node.status().used_bytes <= limit
    finally:
        check_closed(node, journal)


def test_loads_on_two_slots_overlap_in_time(node: Node, models: list[str], journal: Path) -> None:
    barrier = threading.Barrier(2)
    results = {}

    def load(name: str, model: str) -> None:
        barrier.wait()
        results[name] = node.load(name, {"model_path": model})

    threads = [
        threading.Thread(target=load, args=(name, model))
        for name, model in (("chat", models[0]), ("embed", models[1]))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.ok for r in results.values()), results
    opened = Journal.open(journal, create=False)
    try:
        spans = {}
        for name in ("chat", "embed"):
            times = {e.event.type: e.at for e in opened.read(name)}
            spans[name] = (times["spawn_started"], times["load_succeeded"])
    finally:
        opened.close()
    start = min(s for s, _ in spans.values())
    for name, (begin, end) in sorted(spans.items()):  # the timeline, shown with -s
        print(f"{name:>6}: spawn at +{begin - start:.3f} s, ready at +{end - start:.3f} s")
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, f"the loads ran one after the other: {spans}"


def test_reopen_adopts_live_servers_and_restore_reloads_killed_ones(
    journal: Path, tmp_path: Path, models: list[str]
) -> None:
    run = tmp_path / "run"
    node = Node.open(journal, run_dir=run)
    for name, model in (("chat", models[0]), ("embed", models[1])):
        assert node.load(name, {"model_path": model}).ok
    journal_id = node.slot("chat").journal_id
    pids = live_pids(journal_id)
    node.close(keep_servers=True)

    node = Node.open(journal, run_dir=run)  # adopts: same processes, nothing reloaded
    assert {n: node.slot(n).status().pid for n in ("chat", "embed")} == pids
    node.close(keep_servers=True)

    for pid in pids.values():  # every server dies while the node is down
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(5) if psutil.pid_exists(pid) else None
    node = Node.open(journal, run_dir=run, restore=True)
    try:
        restored = live_pids(journal_id)
        assert set(restored) == {"chat", "embed"}
        assert not set(restored.values()) & set(pids.values())
        assert all(node.slot(n).status().state == "ready" for n in ("chat", "embed"))
    finally:
        check_closed(node, journal)


def test_measure_server_reads_rss_and_the_vram_nvml_attributes_to_the_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import replace

    from engine.adapters.gpu import NvmlProbe
    from engine.adapters.memory import measure_server
    from engine.core.state import ServerProcess

    me = psutil.Process()
    process = ServerProcess(os.getpid(), me.create_time(), 0, "load", "marker", "/dev/null")
    probe = NvmlProbe()
    monkeypatch.setattr(
        probe, "used_by_gpu", lambda pid: [(0, 100 * MIB), (1, 200 * MIB)] if pid else []
    )
    use = measure_server(probe, process)
    assert use.vram_bytes == 300 * MIB and use.vram_by_gpu == ((0, 100 * MIB), (1, 200 * MIB))
    assert abs(use.rss_bytes - me.memory_info().rss) < 64 * MIB and use.rss_bytes > 0
    reused = replace(process, create_time=process.create_time - 100)  # the pid is not ours
    assert measure_server(probe, reused).total == 0


def test_each_slot_keeps_its_own_server_key_across_another_slots_reloads(
    tmp_path: Path, models: list[str]
) -> None:
    """Key retention is per slot: slot a's reload must not delete slot b's key, which b's
    server may not have read yet and which a restart needs to talk to b again."""
    journal, run = tmp_path / "node.db", tmp_path / "run"
    node = Node.open(journal, run_dir=run)
    try:
        assert node.load("a", {"model_path": models[0]}).ok
        assert node.load("b", {"model_path": models[1]}).ok
        assert node.load("a", {"model_path": models[0], "max_seq_length": 512}).ok  # reload
        b_key = run / "keys" / "b" / f"{node.slot('b').state.process.load_id}.key"  # type: ignore[union-attr]
        assert b_key.exists(), "slot a's retention deleted slot b's key"
        node.close(keep_servers=True)
        node = Node.open(journal, run_dir=run)  # adopts both servers
        status = node.slot("b").status()
        assert status.state == "ready" and status.api_key is not None
        answer = httpx.get(
            f"{status.base_url}/v1/models",
            headers={"Authorization": f"Bearer {status.api_key.get_secret_value()}"},
            trust_env=False,
            timeout=5,
        )
        assert answer.status_code == 200
    finally:
        check_closed(node, journal)
