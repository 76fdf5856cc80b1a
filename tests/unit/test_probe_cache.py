"""The hub probe cache: single flight per key, only definitive answers, kept in the journal."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from freezegun import freeze_time

from engine.adapters.journal import Journal
from engine.adapters.probe_cache import ERROR_RETRY_S, ProbeCache
from engine.core import events as ev
from engine.core.errors import StepFailed
from engine.effects import Cancelled, CancelToken


def record(key: tuple[str, str | None], **fields: object) -> ev.HubProbed:
    return ev.HubProbed(at=time.time(), key=key[0], token_fingerprint=key[1], **fields)  # type: ignore[arg-type]


def test_concurrent_probes_of_one_key_run_once() -> None:
    cache = ProbeCache(None)
    calls = 0
    release = threading.Event()

    def probe() -> ev.HubProbed:
        nonlocal calls
        calls += 1
        release.wait(2)
        return record(("a/b", None), repo_id="a/b", commit="c" * 40)

    results: list[ev.HubProbed] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.get(("a/b", None), probe, CancelToken()))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    release.set()
    for thread in threads:
        thread.join(2)
    assert calls == 1 and len(results) == 4 and len({id(r) for r in results}) == 1


def test_different_keys_never_wait_for_each_other() -> None:
    cache = ProbeCache(None)
    stuck = threading.Event()
    release = threading.Event()

    def slow() -> ev.HubProbed:
        stuck.set()
        release.wait(5)
        return record(("slow/repo", None), error="gone")

    thread = threading.Thread(target=lambda: cache.get(("slow/repo", None), slow, CancelToken()))
    thread.start()
    assert stuck.wait(2)
    t = time.perf_counter()
    other = cache.get(
        ("fast/repo", None), lambda: record(("fast/repo", None), error="x"), CancelToken()
    )
    assert other.error == "x" and time.perf_counter() - t < 0.5
    release.set()
    thread.join(2)


def test_a_waiter_can_be_cancelled() -> None:
    cache = ProbeCache(None)
    release = threading.Event()

    def slow() -> ev.HubProbed:
        release.wait(5)
        return record(("a/b", None), error="x")

    owner = threading.Thread(target=lambda: cache.get(("a/b", None), slow, CancelToken()))
    owner.start()
    time.sleep(0.05)
    token = CancelToken()
    threading.Timer(0.1, token.cancel, args=("stop",)).start()
    with pytest.raises(Cancelled):
        cache.get(("a/b", None), slow, token)
    release.set()
    owner.join(2)


def test_transient_failures_are_shared_but_not_cached() -> None:
    cache = ProbeCache(None)
    attempts = 0

    def flaky() -> ev.HubProbed:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise StepFailed("HTTP 500")
        return record(("a/b", None), error="definitive")

    with pytest.raises(StepFailed, match="HTTP 500"):
        cache.get(("a/b", None), flaky, CancelToken())
    assert cache.cached(("a/b", None)) is None
    assert cache.get(("a/b", None), flaky, CancelToken()).error == "definitive"
    assert cache.get(("a/b", None), flaky, CancelToken()).error == "definitive"
    assert attempts == 2


def test_a_cached_refusal_is_probed_again_after_the_retry_interval() -> None:
    cache = ProbeCache(None)
    with freeze_time("2026-11-26 12:00:00") as clock:
        answers = iter([record(("a/b", None), error="gated"), record(("a/b", None), repo_id="a/b")])
        assert cache.get(("a/b", None), lambda: next(answers), CancelToken()).error == "gated"
        clock.tick(ERROR_RETRY_S - 1)
        assert cache.get(("a/b", None), lambda: next(answers), CancelToken()).error == "gated"
        clock.tick(2)  # the user accepted the repo's terms meanwhile
        assert cache.get(("a/b", None), lambda: next(answers), CancelToken()).error is None


def test_the_cache_lives_in_its_own_journal_stream(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.db")
    try:
        fp = "ab" * 32
        first = ProbeCache(journal)
        first.get(
            ("a/b", fp), lambda: record(("a/b", fp), repo_id="A/b", error="gone"), CancelToken()
        )
        assert journal.streams() == [ev.HUB_PROBE_STREAM]
        assert not ev.is_slot_stream(ev.HUB_PROBE_STREAM)
        again = ProbeCache(journal)  # a restart: read back, no probe
        hit = again.get(("a/b", fp), lambda: pytest.fail("probed again"), CancelToken())
        assert (hit.repo_id, hit.error) == ("A/b", "gone")
        assert again.cached(("a/b", None)) is None  # another token is another key
        # Two caches on one journal (two slots): a write-write race catches up, never fails.
        first.get(("c/d", None), lambda: record(("c/d", None), error="1"), CancelToken())
        again.get(("e/f", None), lambda: record(("e/f", None), error="2"), CancelToken())
        third = ProbeCache(journal)
        assert {k for k in [("a/b", fp), ("c/d", None), ("e/f", None)] if third.cached(k)} == {
            ("a/b", fp),
            ("c/d", None),
            ("e/f", None),
        }
    finally:
        journal.close()
