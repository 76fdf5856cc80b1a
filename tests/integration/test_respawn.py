"""Respawn after a crash, the crash-loop guard, idle unload and closing at interpreter exit,
against the real llama-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from engine.cli.main import main
from engine.cli.tiny_model import write_tiny_model
from engine.core.errors import EngineError
from engine.orchestrator import Engine
from engine.replay import replay_state
from tests.integration.conftest import marked_servers


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny.gguf")


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[list[Engine]]:
    engines: list[Engine] = []
    yield engines
    for engine in engines:
        engine.close()
        assert replay_state(engine.journal.read_rows("default")) == engine.state
        assert not marked_servers(engine), "a llama-server was left running"


def _open(tmp_path: Path, engines: list[Engine], **options: object) -> Engine:
    engine = Engine.open(tmp_path / "journal.db", run_dir=tmp_path / "run", **options)
    engines.append(engine)
    return engine


def kill9(pid: int) -> None:
    """SIGKILL the server (as the kernel's OOM killer would) and wait until it is dead: a
    zombie whose threads are all gone (until then its parent cannot reap it)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            zombie = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            if zombie and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return
        except (psutil.NoSuchProcess, FileNotFoundError):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} survived SIGKILL")


def journal(engine: Engine) -> list[tuple[int, str, dict[str, object]]]:
    return [(r[1], r[3], json.loads(r[4])) for r in engine.journal.read_rows("default")]


REQUEST = {"max_seq_length": 1024, "llama_extra_args": ["--top-k", "20", "--seed", "42"]}


def test_ensure_ready_respawns_a_killed_server_with_the_same_settings(
    tmp_path: Path, model: Path, opened: list[Engine]
) -> None:
    engine = _open(tmp_path, opened, monitor=False)  # the death goes unnoticed until asked
    assert engine.load({"model_path": str(model), **REQUEST}).status == "loaded"
    before = engine.status()
    assert before.pid is not None
    kill9(before.pid)
    after = engine.ensure_ready(timeout=60)
    assert after.state == "ready" and after.pid not in (None, before.pid)
    assert after.extra_args == before.extra_args == ("--top-k", "20", "--seed", "42")
    assert after.settings == before.settings and after.model_file == before.model_file
    assert after.last_failure_kind is None
    events = journal(engine)
    (crash,) = [(v, e) for v, t, e in events if t == "crashed"]
    assert crash[1]["failure_kind"] == "oom_killed"
    types = [t for _, t, _ in events]
    i = types.index("respawn_requested")
    assert types[i - 1] == "crashed" and types[i + 1] == "load_requested"
    assert events[i][2]["after_crash_seq"] == crash[0] and events[i][2]["reason"] == "crash"
    assert events[i + 1][2]["reason"] == "respawn" and types[-1] == "load_succeeded"
    assert engine.ensure_ready().pid == after.pid  # ready: nothing to do


def test_crashes_in_a_row_end_in_crash_loop_until_a_load(
    tmp_path: Path, model: Path, opened: list[Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _open(tmp_path, opened, monitor=False)
    assert engine.load({"model_path": str(model)}).status == "loaded"
    for _ in range(2):  # two crashes, two respawns
        pid = engine.status().pid
        assert pid is not None
        kill9(pid)
        assert engine.ensure_ready(timeout=60).state == "ready"
    pid = engine.status().pid
    assert pid is not None
    kill9(pid)  # the third crash within 5 minutes
    with pytest.raises(EngineError, match="crash loop"):
        engine.ensure_ready(timeout=60)
    status = engine.status()
    assert status.state == "failed" and status.last_failure_kind == "crash_loop"
    with pytest.raises(EngineError, match="nothing to respawn"):
        engine.ensure_ready(timeout=60)  # no respawn until an explicit load
    types = [t for _, t, _ in journal(engine)]
    assert types.count("crashed") == 3 and types.count("respawn_requested") == 2
    assert types[-2:] == ["crashed", "load_failed"]
    assert engine.load({"model_path": str(model)}).status == "loaded"  # a load starts over
    assert engine.status().last_failure_kind is None
    text = _cli(capsys, "postmortem", str(tmp_path / "journal.db"))
    assert text.count(") [oom_killed]: llama-server pid") == 3
    assert "crash loop (load -) [crash_loop]: crash loop: llama-server crashed 3 times" in text
    assert "RESPAWNS AND IDLE UNLOADS (2)" in text and "respawn after crash" in text
    diagram = _cli(capsys, "diagram", "--journal", str(tmp_path / "journal.db"), "--stdout")
    assert "crashed --> crashed : respawn_requested x2" in diagram
    assert "crashed --> failed : load_failed x1" in diagram
    page = tmp_path / "report.html"
    _cli(capsys, "postmortem", str(tmp_path / "journal.db"), "--html", str(page))
    html = page.read_text()
    assert "crashed [oom_killed]" in html and "[crash_loop]" in html
    assert html.count("respawn after crash") == 2


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_respawn_immediate_brings_the_server_back_on_its_own(
    tmp_path: Path, model: Path, opened: list[Engine]
) -> None:
    engine = _open(tmp_path, opened, respawn="immediate")
    assert engine.load({"model_path": str(model)}).status == "loaded"
    pid = engine.status().pid
    assert pid is not None
    kill9(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = engine.status()
        if status.state == "ready" and status.pid != pid:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"not respawned: {engine.status()}")
    assert "respawn_requested" in [t for _, t, _ in journal(engine)]


def test_respawn_never_leaves_a_crashed_slot_crashed(
    tmp_path: Path, model: Path, opened: list[Engine]
) -> None:
    engine = _open(tmp_path, opened, respawn="never", monitor=False)
    assert engine.load({"model_path": str(model)}).status == "loaded"
    pid = engine.status().pid
    assert pid is not None
    kill9(pid)
    with pytest.raises(EngineError, match="nothing to respawn"):
        engine.ensure_ready()
    assert engine.status().state == "crashed"


def test_idle_unload_waits_for_in_use_then_reloads_on_demand(
    tmp_path: Path, model: Path, opened: list[Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _open(tmp_path, opened, idle_unload_after=0.5)
    assert engine.load({"model_path": str(model), **REQUEST}).status == "loaded"
    first = engine.status().pid
    with engine.in_use():
        time.sleep(1.2)  # well past the idle limit: held, so never unloaded
        assert engine.status().state == "ready" and engine.status().pid == first
    deadline = time.monotonic() + 10
    while engine.status().state != "idle" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.status().state == "idle"
    unloads = [e for _, t, e in journal(engine) if t == "unload_requested"]
    assert [e["reason"] for e in unloads] == ["idle"]
    status = engine.ensure_ready(timeout=60)  # the next request reloads the last target
    assert status.state == "ready" and status.pid != first
    assert status.extra_args == ("--top-k", "20", "--seed", "42")
    respawns = [e for _, t, e in journal(engine) if t == "respawn_requested"]
    assert [(e["reason"], e["after_crash_seq"]) for e in respawns] == [("idle", None)]
    text = _cli(capsys, "postmortem", str(tmp_path / "journal.db"))
    assert "idle unload:" in text and "respawn after idle unload" in text


def test_an_explicit_unload_is_not_brought_back(
    tmp_path: Path, model: Path, opened: list[Engine]
) -> None:
    engine = _open(tmp_path, opened, monitor=False)
    assert engine.load({"model_path": str(model)}).status == "loaded"
    engine.unload()
    with pytest.raises(EngineError, match="nothing to respawn"):
        engine.ensure_ready()


@pytest.mark.parametrize("keep_server", [False, True])
def test_interpreter_exit_closes_open_engines(
    tmp_path: Path, model: Path, keep_server: bool
) -> None:
    script = textwrap.dedent(
        f"""
        from engine.orchestrator import Engine
        engine = Engine.open({str(tmp_path / "journal.db")!r}, run_dir={str(tmp_path / "run")!r},
                             keep_server={keep_server})
        assert engine.load({{"model_path": {str(model)!r}}}).status == "loaded"
        print(engine.status().pid)
        """  # no close(): the interpreter's exit must do it
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    pid = int(done.stdout.split()[-1])
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert alive == keep_server, done.stderr
    with Engine.open(tmp_path / "journal.db", run_dir=tmp_path / "run") as engine:
        # kept: adopted by the next open; else the journal says it was unloaded
        assert engine.status().state == ("ready" if keep_server else "idle")
        assert engine.status().pid == (pid if keep_server else None)
