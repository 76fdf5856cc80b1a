"""Reload rules proven on the live process: what the real llama-server's command line got,
and how concurrent loads on one slot resolve (latest wins, identical joins, status never waits).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from engine.cli.tiny_model import write_tiny_model
from engine.core import events as ev
from engine.core.request import LoadRequest, LoadResult
from engine.core.state import SlotState
from engine.orchestrator import Engine

pytestmark = pytest.mark.server


def cmdline(engine: Engine) -> list[str]:
    pid = engine.status().pid
    assert pid is not None
    return psutil.Process(pid).cmdline()


def load(engine: Engine, model: Path, **fields: object) -> LoadResult:
    return engine.load(LoadRequest(model_path=str(model), **fields))  # type: ignore[arg-type]


def loaded(engine: Engine, model: Path, **fields: object) -> LoadResult:
    result = load(engine, model, **fields)
    assert result.status == "loaded", result
    return result


def contains(argv: list[str], *run: str) -> bool:
    return any(argv[i : i + len(run)] == list(run) for i in range(len(argv)))


def spawn_count(engine: Engine) -> int:
    return sum(r.event.type == "spawn_started" for r in engine.journal.read(engine.slot))


@pytest.fixture
def other_model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "other" / "other.gguf", seed=1)


def test_inherited_extras_survive_unload_and_load(real_engine: Engine, tiny_model: Path) -> None:
    loaded(real_engine, tiny_model, llama_extra_args=["--top-k", "20", "--seed", "42"])
    real_engine.unload()  # the Apply path: unload, then load without args
    loaded(real_engine, tiny_model, max_seq_length=512)
    argv = cmdline(real_engine)
    assert contains(argv, "--top-k", "20") and contains(argv, "--seed", "42")
    assert real_engine.status().extra_args == ("--top-k", "20", "--seed", "42")


def test_inherited_context_is_stripped_when_the_request_sets_it(
    real_engine: Engine, tiny_model: Path
) -> None:
    # Any spelling llama.cpp accepts is the same flag: `--ctx_size` is stripped too (issue 12).
    loaded(real_engine, tiny_model, llama_extra_args=["--ctx_size", "4096", "--seed", "42"])
    assert contains(cmdline(real_engine), "--ctx-size", "4096")
    loaded(real_engine, tiny_model, max_seq_length=8192)
    argv = cmdline(real_engine)
    assert contains(argv, "-c", "8192") and not contains(argv, "--ctx-size", "4096")
    assert contains(argv, "--seed", "42")


def test_explicit_empty_list_clears(real_engine: Engine, tiny_model: Path) -> None:
    loaded(real_engine, tiny_model, llama_extra_args=["--top-k", "20"])
    loaded(real_engine, tiny_model, llama_extra_args=[])
    assert "--top-k" not in cmdline(real_engine)
    real_engine.unload()
    loaded(real_engine, tiny_model)
    assert "--top-k" not in cmdline(real_engine), "the cleared extras stay cleared"


def test_a_different_model_inherits_nothing(
    real_engine: Engine, tiny_model: Path, other_model: Path
) -> None:
    loaded(real_engine, tiny_model, llama_extra_args=["--top-k", "20", "--seed", "42"])
    loaded(real_engine, other_model)
    argv = cmdline(real_engine)
    assert "--top-k" not in argv and "--seed" not in argv
    assert argv[argv.index("-m") + 1] == str(other_model)


def test_reloading_the_loaded_target_short_circuits(real_engine: Engine, tiny_model: Path) -> None:
    first = loaded(real_engine, tiny_model, max_seq_length=0, llama_extra_args=["--seed", "42"])
    again = load(real_engine, tiny_model)  # extras inherited, auto context == not set
    assert (again.status, again.pid) == ("already_loaded", first.pid)
    assert spawn_count(real_engine) == 1


# --- races --------------------------------------------------------------------------------


def when(engine: Engine, event_type: str, action: Callable[[], None]) -> None:
    """Run `action` once, in the load's own thread, right after `event_type` is journaled."""
    fired = threading.Event()

    def observer(event: ev.Event, state: SlotState) -> None:
        if event.type == event_type and not fired.is_set():
            fired.set()
            action()

    engine.observe(observer)


class Runner:
    """A load on its own thread."""

    def __init__(self, fn: Callable[[], LoadResult]) -> None:
        self.results: list[LoadResult] = []
        self.thread = threading.Thread(target=lambda: self.results.append(fn()))
        self.thread.start()

    def result(self) -> LoadResult:
        self.thread.join(30)
        assert self.results, "the concurrent load did not return"
        return self.results[0]


def load_when_spawned(engine: Engine, model: Path, accepted: Callable[[], bool]) -> list[Runner]:
    """When the first load's server is spawned (mid-load), start a second load of `model` and
    hold the first until `accepted()` says the engine has taken the second one."""
    runners: list[Runner] = []

    def start() -> None:
        runners.append(Runner(lambda: load(engine, model)))
        for _ in range(500):
            if accepted():
                return
            threading.Event().wait(0.01)
        raise AssertionError("the concurrent load was never accepted")

    when(engine, "spawned", start)
    return runners


def two_loads_queued(engine: Engine) -> Callable[[], bool]:
    return lambda: engine.status().queued_loads == 2


def test_latest_load_wins_and_the_first_is_cancelled(
    real_engine: Engine, tiny_model: Path, other_model: Path
) -> None:
    runners = load_when_spawned(real_engine, other_model, two_loads_queued(real_engine))
    first = load(real_engine, tiny_model)
    second = runners[0].result()
    assert first.status == "cancelled" and "superseded" in (first.error or "")
    assert second.status == "loaded"
    argv = cmdline(real_engine)
    assert argv[argv.index("-m") + 1] == str(other_model)
    kinds = [r.event.type for r in real_engine.journal.read(real_engine.slot)]
    assert kinds.count("spawned") == 2 and "load_cancelled" in kinds


def test_identical_loads_join_one_spawn(real_engine: Engine, tiny_model: Path) -> None:
    joined = threading.Event()
    real_engine.observe(lambda e, s: joined.set() if e.type == "load_joined" else None)
    runners = load_when_spawned(real_engine, tiny_model, joined.is_set)
    first = load(real_engine, tiny_model)
    second = runners[0].result()
    assert first.status == "loaded" and second.status == "loaded" and second.joined
    assert second.pid == first.pid
    assert spawn_count(real_engine) == 1


def test_an_equivalent_load_queued_behind_returns_already_loaded(
    real_engine: Engine, tiny_model: Path
) -> None:
    # Not an identical request (None vs 0 context) but the same target: it must not cancel.
    runners = load_when_spawned(real_engine, tiny_model, two_loads_queued(real_engine))
    first = load(real_engine, tiny_model, max_seq_length=0)
    second = runners[0].result()
    assert first.status == "loaded"
    assert (second.status, second.pid) == ("already_loaded", first.pid)
    assert spawn_count(real_engine) == 1


def test_status_never_waits_for_a_load_in_progress(real_engine: Engine, tiny_model: Path) -> None:
    seen: list[str] = []

    def probe_status() -> None:
        checker = threading.Thread(target=lambda: seen.append(real_engine.status().state))
        checker.start()
        checker.join(5)  # the load thread is parked right here; status() must still answer

    when(real_engine, "spawned", probe_status)
    assert load(real_engine, tiny_model).status == "loaded"
    assert seen == ["warming"]
