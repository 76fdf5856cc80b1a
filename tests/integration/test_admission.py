"""Admission with the real llama-server: a load that cannot fit is refused before anything is
killed, and the old server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from engine.adapters.gpu import NvmlProbe
from engine.adapters.memory import memory_budget
from engine.core.admission import MIB
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from engine.replay import replay_state
from tests.conftest import rows
from tests.integration.conftest import marked_servers

pytestmark = pytest.mark.server


@pytest.fixture
def capped_engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine whose slot may use at most 1 GiB."""
    journal = tmp_path / "journal.db"
    engine = Engine.open(journal, run_dir=tmp_path / "run", memory_limit=1024 * MIB)
    try:
        yield engine
    finally:
        engine.close()
        assert replay_state(rows(journal)) == engine.state
        assert not marked_servers(engine)


def test_a_load_that_cannot_fit_is_refused_and_the_old_server_keeps_serving(
    capped_engine: Engine, tiny_model: Path
) -> None:
    first = capped_engine.load(LoadRequest(model_path=str(tiny_model)))
    assert first.status == "loaded" and first.pid is not None
    # 16M tokens of f32 KV cache is several GiB: far over the 1 GiB budget.
    huge = LoadRequest(model_path=str(tiny_model), max_seq_length=1 << 24, cache_type_kv="f32")
    refused = capped_engine.load(huge)
    assert refused.status == "failed"
    assert "not enough memory for this load" in (refused.error or "")
    status = capped_engine.status()
    assert (status.state, status.pid) == ("ready", first.pid)
    assert psutil.pid_exists(first.pid)
    health = httpx.get(f"http://127.0.0.1:{status.port}/health", trust_env=False, timeout=5)
    assert health.status_code == 200
    kinds = [r.event.type for r in capped_engine.journal.read(capped_engine.slot)]
    assert kinds[-2:] == ["admission_checked", "load_abandoned"]
    assert "kill_started" not in kinds


def test_the_running_server_memory_counts_as_releasable(
    real_engine: Engine, tiny_model: Path
) -> None:
    real_engine.load(LoadRequest(model_path=str(tiny_model)))
    probe = NvmlProbe()
    try:
        idle = memory_budget(probe, None)
        with_server = memory_budget(probe, real_engine.state.process)
    finally:
        probe.close()
    assert idle.releasable_bytes == 0
    assert with_server.releasable_bytes > 0
    assert with_server.available_ram_bytes > 0
