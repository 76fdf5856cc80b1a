"""The event feed: `Engine.events()`, `Feed` on SQLite and PostgreSQL, and `tail -f` reading
what another process appends."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from engine.adapters.feed import Feed, FeedEvent
from engine.adapters.journal import Journal
from engine.core import events as ev
from engine.core import node_events as nev
from engine.node import Node
from engine.orchestrator import Engine
from tests.fakes import FakeEffects

SPEC = ev.LoadSpec(model="/models/a.gguf")


def _requested(load_id: str, at: float = 1.0) -> ev.LoadRequested:
    return ev.LoadRequested(at=at, load_id=load_id, spec=SPEC)


def _follow_in_thread(feed: Feed) -> tuple[list[FeedEvent], threading.Event, threading.Thread]:
    seen: list[FeedEvent] = []
    stop = threading.Event()

    def run() -> None:
        seen.extend(feed.follow(stop))

    thread = threading.Thread(target=run)
    thread.start()
    return seen, stop, thread


def _wait_for(condition: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_engine_events_lists_and_follows_the_slot(journal_path: Path, tiny_model: Path) -> None:
    engine = Engine.open(journal_path, effects=FakeEffects(), monitor=False)
    seen: list[FeedEvent] = []
    journaled: list[ev.Event] = []
    follower = threading.Thread(target=lambda: seen.extend(engine.events()))
    try:
        engine.load({"model_path": str(tiny_model)})
        follower.start()
        engine.unload()
        journaled += [r.event for r in engine.journal.read("default")]
        assert [f.event for f in engine.events(follow=False)] == journaled
        _wait_for(lambda: len(seen) == len(journaled))
        since = seen[2].seq
        assert [f.event for f in engine.events(since, follow=False)] == journaled[3:]
    finally:
        engine.close()  # ends the follower
        follower.join(5)
    assert not follower.is_alive()
    assert [f.event for f in seen] == journaled
    assert seen[-1].event.type == "unloaded"


def test_a_follower_sees_every_stream_in_order(any_journal_url: str) -> None:
    journal = Journal.open(any_journal_url)
    feed = Feed(Journal.open(any_journal_url), poll_s=0.05)
    seen, stop, thread = _follow_in_thread(feed)
    try:
        for n in range(5):
            journal.append("a", n, [_requested(f"a{n}")])
            journal.append("b", n, [_requested(f"b{n}")])
        _wait_for(lambda: len(seen) == 10)
    finally:
        stop.set()
        thread.join(5)
        feed.journal.close()
        journal.close()
    assert [f.event.load_id for f in seen] == [f"{s}{n}" for n in range(5) for s in "ab"]
    assert [f.seq for f in seen] == sorted(f.seq for f in seen)


def test_postgres_holds_back_an_append_that_commits_out_of_seq_order(
    postgres_url: str,
) -> None:
    journal = Journal.open(postgres_url)
    feed = Feed(journal)
    slow = sa.create_engine(postgres_url)
    try:
        journal.append("a", 0, [_requested("first", time.time())])
        assert [f.event.load_id for f in feed.poll()] == ["first"]
        with slow.connect() as conn:
            transaction = conn.begin()
            conn.execute(  # takes seq n and holds it uncommitted
                sa.text(
                    "INSERT INTO events (stream, version, type, schema_version, at, payload) "
                    "VALUES ('slow', 1, 'load_requested', 1, :at, :payload)"
                ),
                {"at": time.time(), "payload": _requested("slow", time.time()).model_dump_json()},
            )
            journal.append("a", 1, [_requested("fast", time.time())])  # seq n + 1, committed
            assert feed.poll() == [], "delivered past an append that is still committing"
            transaction.commit()
        assert [f.event.load_id for f in feed.poll()] == ["slow", "fast"]
    finally:
        slow.dispose()
        journal.close()


def test_tail_follow_prints_what_another_process_appends(journal_path: Path) -> None:
    Journal.open(journal_path).close()
    tail = subprocess.Popen(
        [sys.executable, "-m", "engine", "tail", str(journal_path), "-f", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = (
        "import sys, time\n"
        "from engine.adapters.journal import Journal\n"
        "from engine.core import events as ev\n"
        "j = Journal.open(sys.argv[1])\n"
        "spec = ev.LoadSpec(model='/m/a.gguf')\n"
        "for n in range(3):\n"
        "    j.append('default', n, [ev.LoadRequested(at=time.time(), load_id=f'l{n}',"
        " spec=spec)] if n == 0 else [ev.LoadJoined(at=time.time(), load_id=f'l{n}',"
        " joined_load_id='l0')])\n"
        "    time.sleep(0.3)\n"
        "j.close()\n"
    )
    try:
        time.sleep(0.5)  # the follower is up before the first append
        appender = subprocess.Popen([sys.executable, "-c", writer, str(journal_path)])
        lines = []
        assert tail.stdout is not None
        for _ in range(3):
            record = json.loads(tail.stdout.readline())
            lines.append(record)
            # Printed within 1 s of being journaled (the feed polls every 0.1 s).
            assert time.time() - record["event"]["at"] < 1.0
        assert appender.wait(10) == 0
    finally:
        tail.terminate()
        tail.wait(5)
    assert [r["event"]["load_id"] for r in lines] == ["l0", "l1", "l2"]
    assert [r["state"] for r in lines] == ["resolving"] * 3


def test_node_events_cover_every_slot_and_the_node(journal_path: Path, tiny_model: Path) -> None:
    node = Node.open(journal_path, effects=FakeEffects(), monitor=False)
    try:
        node.load("chat", {"model_path": str(tiny_model)})
        node.load("embed", {"model_path": str(tiny_model)})
        streams = {item.stream for item in node.events(follow=False)}
        assert {"chat", "embed", nev.NODE_STREAM} <= streams
    finally:
        node.close()


def test_aevents_ends_when_the_engine_closes(journal_path: Path, tiny_model: Path) -> None:
    engine = Engine.open(journal_path, effects=FakeEffects(), monitor=False)
    engine.load({"model_path": str(tiny_model)})

    async def collect() -> list[FeedEvent]:
        seen = []
        async for item in engine.aevents():
            seen.append(item)
            if item.event.kind == "load_succeeded":
                await asyncio.to_thread(engine.close)  # the stream must end on its own now
        return seen

    seen = asyncio.run(asyncio.wait_for(collect(), 10))
    assert [f.event.kind for f in seen][-1] in ("load_succeeded", "unload_requested", "unloaded")
