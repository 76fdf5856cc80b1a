"""The engine driving a real llama-server: load, health, unload, kill, crash, failures."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import psutil
import pytest

from engine.adapters.process import MARKER_ENV
from engine.cli.tiny_model import write_tiny_model
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from tests.integration.conftest import crash_server

pytestmark = pytest.mark.server


def _health(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0, trust_env=False).status_code


def _loaded(engine: Engine, model: Path, **fields: object) -> tuple[int, int]:
    result = engine.load(LoadRequest(model_path=str(model), **fields))  # type: ignore[arg-type]
    assert result.status == "loaded", result
    assert result.pid is not None and result.port is not None
    return result.pid, result.port


def test_load_reaches_ready_with_a_live_healthy_server(
    real_engine: Engine, tiny_model: Path
) -> None:
    pid, port = _loaded(real_engine, tiny_model)
    status = real_engine.status()
    assert (status.state, status.pid, status.port) == ("ready", pid, port)
    assert _health(port) == 200
    server = psutil.Process(pid)
    assert server.environ()[MARKER_ENV].endswith(real_engine.state.process.load_id)  # type: ignore[union-attr]
    assert os.getsid(pid) == pid, "the server runs in its own session"
    assert status.api_key is not None  # the server is reachable with its key only
    completion = httpx.post(
        f"http://127.0.0.1:{port}/completion",
        trust_env=False,
        json={"prompt": "hi", "n_predict": 4},
        headers={"Authorization": f"Bearer {status.api_key.get_secret_value()}"},
        timeout=10,
    ).json()
    assert completion["tokens_predicted"] == 4


def test_unload_leaves_no_process(real_engine: Engine, tiny_model: Path) -> None:
    pid, _ = _loaded(real_engine, tiny_model)
    status = real_engine.unload()
    assert status.state == "idle" and status.pid is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _previous_extras_kept(engine: Engine) -> None:
    assert engine.status().extra_args == ("--seed", "42")


def test_bad_model_file_fails_cleanly(
    real_engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    _loaded(real_engine, tiny_model, llama_extra_args=["--seed", "42"])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file")
    result = real_engine.load(LoadRequest(model_path=str(junk)))
    assert result.status == "failed"
    assert "not a readable GGUF file" in (result.error or "")
    # Resolution fails before the old server is touched: it keeps serving.
    assert real_engine.status().state == "ready" and _health(real_engine.status().port or 0) == 200
    _previous_extras_kept(real_engine)


def test_extra_arg_the_server_rejects_fails_with_its_own_text(
    real_engine: Engine, tiny_model: Path
) -> None:
    _loaded(real_engine, tiny_model, llama_extra_args=["--seed", "42"])
    result = real_engine.load(
        # A flag the binary knows, with a value only the server itself judges.
        LoadRequest(model_path=str(tiny_model), llama_extra_args=["--numa", "bogus"])
    )
    assert result.status == "failed" and result.state == "failed"
    assert result.failure_kind == "bad_value"
    assert "llama-server refused the value of --numa: invalid value" in (result.error or "")
    assert "--numa" in (result.log_tail or "")
    assert real_engine.status().pid is None
    _previous_extras_kept(real_engine)


def test_server_crashing_during_warm_up_fails_cleanly(
    real_engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    _loaded(real_engine, tiny_model, llama_extra_args=["--seed", "42"])
    broken = write_tiny_model(tmp_path / "broken.gguf", wrong_shape=True)
    result = real_engine.load(LoadRequest(model_path=str(broken)))
    assert result.status == "failed"
    assert "before it was healthy" in (result.error or "")
    assert "wrong shape" in (result.log_tail or "")
    assert real_engine.status().pid is None
    _previous_extras_kept(real_engine)


def test_sigkill_while_ready_is_journaled_as_crashed(real_engine: Engine, tiny_model: Path) -> None:
    pid, _ = _loaded(real_engine, tiny_model)
    assert crash_server(real_engine, within=1.0) == pid  # the monitor notices within a second
    status = real_engine.status()
    assert status.last_error == f"llama-server (pid {pid}) exited on its own with code -9"
    events = [e.type for e in (r.event for r in real_engine.journal.read("default"))]
    assert events[-1] == "crashed"


def test_reload_kills_before_it_spawns(real_engine: Engine, tiny_model: Path) -> None:
    first, _ = _loaded(real_engine, tiny_model)
    second, _ = _loaded(real_engine, tiny_model, max_seq_length=512)
    assert first != second and not psutil.pid_exists(first)
    types = [r.event.type for r in real_engine.journal.read("default")]
    assert types.index("process_exited") < len(types) - types[::-1].index("spawn_started") - 1
