"""Several threads firing random loads, unloads, pins, touches and in-use holds at a Node of four
slots (max_servers=2) for ~20 s, real llama-servers, and a sampler reading the process table
every 5 ms: never two servers for a slot, never more than max_servers, never a pinned or
in-use server evicted, and `verify` clean."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from engine.adapters.journal import Journal
from engine.adapters.process import MARKER_ENV
from engine.cli.main import main
from engine.cli.tiny_model import write_tiny_model
from engine.core import node_events as nev
from engine.core.errors import EngineError
from engine.node import Node

pytestmark = pytest.mark.server

THREADS = 6
SLOTS = ("chat", "embed", "code", "vision")
MAX_SERVERS = 2
DURATION_S = float(os.environ.get("STUDIO_ENGINE_NODE_STRESS_SECONDS", "20"))
SAMPLE_EVERY_S = 0.005


def live_by_slot(prefix: str) -> Counter[str]:
    """Live (non-zombie) servers of this journal, counted per slot."""
    found: Counter[str] = Counter()
    for proc in psutil.process_iter(["name"]):
        try:
            if "llama-server" not in (proc.info["name"] or ""):
                continue
            marker = proc.environ().get(MARKER_ENV, "")
            if marker.startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                found[marker.split("/")[1]] += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_random_node_traffic_keeps_every_guarantee(tmp_path: Path) -> None:
    models = [str(write_tiny_model(tmp_path / f"m{i}.gguf", seed=i)) for i in range(3)]
    journal = tmp_path / "journal.db"
    node = Node.open(journal, run_dir=tmp_path / "run", max_servers=MAX_SERVERS)
    node.load(SLOTS[0], {"model_path": models[0]})
    prefix = node.slot(SLOTS[0]).journal_id + "/"
    stop = threading.Event()
    per_slot_peak: Counter[int] = Counter()
    total_peak: Counter[int] = Counter()
    outcomes: Counter[str] = Counter()
    held: list[tuple[str, float, float]] = []  # (slot, entered, leaving): wall clock
    errors: list[BaseException] = []

    def sampler() -> None:
        while not stop.is_set():
            live = live_by_slot(prefix)
            per_slot_peak[max(live.values(), default=0)] += 1
            total_peak[sum(live.values())] += 1
            time.sleep(SAMPLE_EVERY_S)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + DURATION_S
        try:
            while time.monotonic() < deadline:
                slot, roll = rng.choice(SLOTS), rng.random()
                try:
                    if roll < 0.45:
                        result = node.load(slot, {"model_path": rng.choice(models)})
                        outcomes[f"load:{result.status}"] += 1
                        if result.status == "failed":  # only ever refused for want of room
                            assert (result.error or "").startswith("no room"), result.error
                    elif roll < 0.55:
                        outcomes[f"unload:{node.unload(slot).state}"] += 1
                    elif roll < 0.65:
                        (node.pin if rng.random() < 0.4 else node.unpin)(slot)
                        outcomes["pin"] += 1
                    elif roll < 0.8:
                        node.touch(slot)
                        outcomes["touch"] += 1
                    else:
                        with node.in_use(slot):
                            entered = time.time()
                            time.sleep(rng.random() * 0.05)
                            held.append((slot, entered, time.time()))
                        outcomes["in_use"] += 1
                except KeyError:
                    outcomes["no such slot yet"] += 1
                except EngineError as exc:
                    assert "being evicted" in str(exc), exc
                    outcomes["in_use refused: being evicted"] += 1
                time.sleep(rng.random() * 0.02)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(THREADS)]
    try:
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(DURATION_S + 120)
    finally:
        stop.set()
        watcher.join()
        node.close()

    assert not errors, errors
    assert not any(thread.is_alive() for thread in clients), "a client never returned"
    assert max(per_slot_peak) <= 1, f"two live servers for one slot: {dict(per_slot_peak)}"
    assert max(total_peak) <= MAX_SERVERS, f"more servers than max_servers: {dict(total_peak)}"
    assert total_peak[MAX_SERVERS] > 0, "never full: the test proved nothing"
    assert live_by_slot(prefix) == Counter(), "a llama-server was left running"

    opened = Journal.open(journal, create=False)
    try:
        node_events = [nev.parse_node_event(p) for *_, p in opened.read_rows(nev.NODE_STREAM)]
    finally:
        opened.close()
    evicted = [e for e in node_events if isinstance(e, nev.Evicted) and e.cause != "manual"]
    assert evicted, f"nothing was ever evicted: {outcomes}"
    for eviction in evicted:  # journaled after the claim: no holder could be inside then
        inside = [h for h in held if h[0] == eviction.slot and h[1] <= eviction.at <= h[2]]
        assert not inside, f"evicted {eviction.slot!r} while in use: {eviction}, {inside}"
    assert outcomes["load:loaded"] > 0 and outcomes["in_use"] > 0, outcomes
    # Replays cleanly, no two servers per slot in the journal, no pinned server evicted.
    assert main(["verify", str(journal)]) == 0
    print(dict(outcomes), f"evictions {len(evicted)}", dict(total_peak))
