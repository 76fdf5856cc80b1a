"""Launch planning against the real llama-server (CPU build) and real GGUF headers.

GPUs: there are none here, so pynvml is faked at its function boundary (as in
tests/unit/test_nvml_probe.py); the server itself runs on the CPU either way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import psutil
import pytest

from engine.adapters.binary import locate_server
from engine.adapters.gguf_header import read_header
from engine.cli.tiny_model import NATIVE_CTX, write_tiny_model
from engine.core import events as ev
from engine.orchestrator import Engine
from engine.replay import replay_state
from tests.conftest import rows
from tests.integration.conftest import marked_servers
from tests.unit.test_nvml_probe import MIB, FakeNvml

pytestmark = pytest.mark.server


def _props(engine: Engine) -> dict[str, object]:
    status = engine.status()
    assert status.api_key is not None  # /props is the owner's only: it needs the server's key
    answer = httpx.get(
        f"{status.base_url}/props",
        headers={"Authorization": f"Bearer {status.api_key.get_secret_value()}"},
        timeout=2.0,
        trust_env=False,
    )
    return dict(answer.json())


def _events(engine: Engine, kind: type[ev.BaseEvent]) -> list[ev.BaseEvent]:
    database = engine.journal.engine.url.database
    assert database is not None
    return [e for row in rows(Path(database)) if isinstance(e := ev.parse_event(row[4]), kind)]


def _write_header_only(path: Path, arch: str, **keys: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))  # type: ignore[call-overload]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_auto_context_is_the_tiny_models_native_context_read_back_from_props(
    real_engine: Engine, tiny_model: Path
) -> None:
    result = real_engine.load({"model_path": str(tiny_model), "max_seq_length": None})
    assert result.status == "loaded", result
    assert result.port is not None
    served = real_engine.state.serving
    assert served is not None
    argv = served.argv
    assert argv[argv.index("-c") + 1] == str(NATIVE_CTX) == "2048"
    assert all(argv[i + 1] != "0" for i, token in enumerate(argv[:-1]) if token == "-c")
    props = _props(real_engine)
    n_ctx = props["default_generation_settings"]["n_ctx"]  # type: ignore[index]
    status = real_engine.status()
    assert status.context_length == n_ctx == NATIVE_CTX
    assert status.native_context_length == NATIVE_CTX == status.max_context_length
    assert status.parallel_slots == props["total_slots"] == 4  # this build has --kv-unified
    assert "--kv-unified" in argv
    assert (status.offload, status.kind) == ("cpu", "chat")
    (read,) = _events(real_engine, ev.ServerPropsRead)
    assert isinstance(read, ev.ServerPropsRead) and read.props.n_ctx == NATIVE_CTX


def test_a_projector_is_refused_while_the_old_server_keeps_serving(
    real_engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    first = real_engine.load({"model_path": str(tiny_model)})
    assert first.status == "loaded" and first.port is not None
    projector = _write_header_only(
        tmp_path / "vision" / "mmproj-tiny-f16.gguf", "clip", **{"general.type": "mmproj"}
    )
    refused = real_engine.load({"model_path": str(projector)})
    assert refused.status == "failed"
    assert "multimodal projector (mmproj), not a model" in (refused.error or "")
    status = real_engine.status()
    assert (status.state, status.pid) == ("ready", first.pid)
    assert httpx.get(f"http://127.0.0.1:{first.port}/health", trust_env=False).status_code == 200
    assert _events(real_engine, ev.KillStarted) == []


def test_an_unknown_architecture_is_refused_before_teardown(
    real_engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    first = real_engine.load({"model_path": str(tiny_model)})
    novel = _write_header_only(tmp_path / "novel.gguf", "llama-from-the-future")
    refused = real_engine.load({"model_path": str(novel)})
    assert refused.status == "failed"
    assert "'llama-from-the-future' is not supported by this llama-server build" in (
        refused.error or ""
    )
    assert real_engine.status().pid == first.pid


def test_an_embedding_model_is_served_with_embedding(real_engine: Engine, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny-embed.gguf", pooling_type=1)  # mean pooling
    result = real_engine.load({"model_path": str(model)})
    assert result.status == "loaded", result
    argv = real_engine.state.serving.argv  # type: ignore[union-attr]
    assert "--embedding" in argv and "--jinja" not in argv
    assert real_engine.status().kind == "embedding"
    status = real_engine.status()
    assert status.api_key is not None
    answer = httpx.post(
        f"{status.base_url}/embedding",
        json={"content": "hello"},
        headers={"Authorization": f"Bearer {status.api_key.get_secret_value()}"},
        trust_env=False,
        timeout=10,
    )
    assert answer.status_code == 200 and len(answer.json()[0]["embedding"][0]) == 64


def test_header_facts_for_sliding_window_recurrent_and_embedding_models(tmp_path: Path) -> None:
    gemma = _write_header_only(
        tmp_path / "gemma.gguf",
        "gemma3",
        **{
            "gemma3.block_count": 12,
            "gemma3.attention.sliding_window": 512,
            "gemma3.context_length": 32768,
        },
    )
    header = read_header(gemma)
    assert (header.sliding_window, header.swa_layers) == (512, 10)  # 5 of every 6 layers
    hybrid = _write_header_only(
        tmp_path / "hybrid.gguf",
        "granitehybrid",
        **{
            "granitehybrid.block_count": 4,
            "granitehybrid.attention.head_count_kv": [0, 8, 0, 0],
            "granitehybrid.ssm.conv_kernel": 4,
            "granitehybrid.ssm.inner_size": 64,
            "granitehybrid.ssm.state_size": 16,
            "granitehybrid.ssm.group_count": 1,
        },
    )
    header = read_header(hybrid)
    assert (header.recurrent_layers, header.head_count_kv) == (3, 8)
    assert header.recurrent_state_bytes == ((4 - 1) * (64 + 2 * 16) + 16 * 64) * 4
    embedder = _write_header_only(
        tmp_path / "embed.gguf", "bert", **{"bert.pooling_type": 1, "general.type": "model"}
    )
    header = read_header(embedder)
    assert (header.pooling_type, header.architecture_type) == (1, "model")


# --- fake NVML: the GPU placement reaches the real server's environment -----------------------


@pytest.fixture
def gpu_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[Engine, FakeNvml]]:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml(free_mib=list(request.param))  # 80,000 MiB GPUs: 2,400 MiB reserve each
    nvml.install(monkeypatch)
    journal = tmp_path / "journal.db"
    engine = Engine.open(journal, run_dir=tmp_path / "run")
    try:
        yield engine, nvml
    finally:
        engine.close()
        assert replay_state(rows(journal)) == engine.state
        assert not marked_servers(engine)


@pytest.mark.parametrize("gpu_engine", [(1_000, 4_000)], indirect=True)
def test_two_gpus_model_fits_only_on_the_larger_one(
    gpu_engine: tuple[Engine, FakeNvml], tiny_model: Path
) -> None:
    engine, _ = gpu_engine
    result = engine.load({"model_path": str(tiny_model)})
    assert result.status == "loaded", result
    assert result.pid is not None
    assert psutil.Process(result.pid).environ()["CUDA_VISIBLE_DEVICES"] == "1"
    argv = engine.state.serving.argv  # type: ignore[union-attr]
    at = argv.index("-ngl")
    assert argv[at : at + 4] == ("-ngl", "-1", "--fit", "off")
    status = engine.status()
    assert (status.gpus, status.offload) == ((1,), "full")
    (planned,) = _events(engine, ev.LaunchPlanned)
    assert isinstance(planned, ev.LaunchPlanned)
    budgets = {d.index: d for d in planned.plan.devices}
    assert budgets[0].budget_bytes == 0 and budgets[0].planned_bytes == 0
    assert 0 < budgets[1].planned_bytes <= budgets[1].budget_bytes
    assert [g.free_bytes for g in planned.inventory.gpus] == [1_000 * MIB, 4_000 * MIB]


@pytest.mark.parametrize("gpu_engine", [(1_000, 2_000)], indirect=True)
def test_two_gpus_model_fits_nowhere_gets_fit_on(
    gpu_engine: tuple[Engine, FakeNvml], tiny_model: Path
) -> None:
    engine, _ = gpu_engine
    result = engine.load({"model_path": str(tiny_model)})
    assert result.status == "loaded", result
    argv = engine.state.serving.argv  # type: ignore[union-attr]
    at = argv.index("--fit")
    assert argv[at : at + 4] == ("--fit", "on", "--fit-target", "1024")
    assert "-ngl" not in argv
    assert engine.status().offload == "partial"


# --- binary identity --------------------------------------------------------------------------


def test_an_identical_load_after_the_binary_changed_reloads(
    tmp_path: Path, tiny_model: Path
) -> None:
    original = locate_server().path.parent
    copy = tmp_path / "bin"
    copy.mkdir()
    for item in original.iterdir():
        if item.name == "llama-server" or item.name.startswith("lib") or item.suffix == ".json":
            shutil.copy2(item, copy / item.name, follow_symlinks=False)
    journal = tmp_path / "journal.db"
    engine = Engine.open(journal, run_dir=tmp_path / "run", llama_server=copy / "llama-server")
    try:
        first = engine.load({"model_path": str(tiny_model)})
        assert first.status == "loaded", first
        assert engine.load({"model_path": str(tiny_model)}).status == "already_loaded"
        stat = (copy / "llama-server").stat()
        os.utime(copy / "llama-server", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        again = engine.load({"model_path": str(tiny_model)})
        assert again.status == "loaded" and again.pid != first.pid
        requested = _events(engine, ev.LoadRequested)
        assert [e.reason for e in requested] == [None, "binary_changed"]  # type: ignore[attr-defined]
        spawns = _events(engine, ev.SpawnStarted)
        identities = [e.binary for e in spawns]  # type: ignore[attr-defined]
        assert identities[0].mtime_ns + 10**9 == identities[1].mtime_ns
        assert identities[1].version.startswith("version")
    finally:
        engine.close()
    assert not marked_servers(engine)
