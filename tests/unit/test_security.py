"""Issue 12 at the Effects boundary: port ownership retries, API keys, scrubbing, child env."""

from __future__ import annotations

from pathlib import Path

from engine.adapters.hub import scrub as hub_scrub
from engine.adapters.process import child_environment
from engine.core import events as ev
from engine.core.scrub import looks_secret, scrub
from engine.orchestrator import Engine
from tests.conftest import rows
from tests.fakes import FakeEffects

TOKEN = "hf_" + "a1B2c3D4e5" * 3


def types(journal: Path) -> list[str]:
    return [row[3] for row in rows(journal)]


def test_a_foreign_listener_is_never_loaded_a_new_port_is_tried(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, journal_path: Path
) -> None:
    engine, effects = fake_engine
    effects.foreign_ports = {effects.next_port + 1, effects.next_port + 2}  # the next two ports
    result = engine.load({"model_path": str(tiny_model)})
    assert result.status == "loaded" and result.port == effects.next_port
    assert result.port not in effects.foreign_ports
    kinds = types(journal_path)
    assert kinds.count("spawn_retried") == 2 and kinds.count("spawn_started") == 3
    assert sum(effects.alive.values()) == 1, "the servers on taken ports are dead"
    retried = [row for row in rows(journal_path) if row[3] == "spawn_retried"]
    assert [ev.parse_event(row[4]).attempt for row in retried] == [1, 2]  # type: ignore[union-attr]


def test_port_retries_stop_after_three_and_the_load_fails_cleanly(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, journal_path: Path
) -> None:
    engine, effects = fake_engine
    effects.foreign_ports = set(range(effects.next_port + 1, effects.next_port + 10))
    result = engine.load({"model_path": str(tiny_model)})
    assert result.status == "failed" and "gave up after 3 retries" in (result.error or "")
    assert types(journal_path).count("spawn_retried") == 3
    assert not any(effects.alive.values()), "no server left running"


def test_status_and_result_carry_the_key_the_journal_does_not(
    fake_engine: tuple[Engine, FakeEffects], tiny_model: Path, journal_path: Path
) -> None:
    engine, effects = fake_engine
    result = engine.load({"model_path": str(tiny_model)})
    key = effects.keys[result.load_id]
    assert result.api_key is not None and result.api_key.get_secret_value() == key
    status = engine.status()
    assert status.api_key is not None and status.api_key.get_secret_value() == key
    assert key not in repr(status) and key not in repr(result)
    argv = effects.spawned[-1]
    assert argv[argv.index("--api-key-file") + 1].endswith(".key") and key not in argv
    assert not any(key in row[4] for row in rows(journal_path))


def test_the_scrubber_hides_every_kind_of_secret() -> None:
    text = (
        "GET https://alice:s3cret@hub.example/api failed; Authorization: Bearer abc.def "
        f"token {TOKEN} key=SERVERKEY proxy-authorization=Basic Zm9vOmJhcg=="
    )
    clean = scrub(text, ["SERVERKEY"])
    for secret in ("alice", "s3cret", "abc.def", TOKEN, "SERVERKEY", "Zm9vOmJhcg=="):
        assert secret not in clean
    assert "https://***@hub.example/api" in clean and "Authorization: ***" in clean
    assert scrub("nothing to hide: http://host/x") == "nothing to hide: http://host/x"
    assert looks_secret(TOKEN) and not looks_secret("hf_short")


def test_a_hub_error_with_endpoint_credentials_is_scrubbed() -> None:
    error = "ConnectError: https://user:password@127.0.0.1:9/api/models/a/b refused"
    assert "password" not in hub_scrub(error) and "user:" not in hub_scrub(error)


def test_the_child_environment_is_an_allow_list() -> None:
    environ = {
        "PATH": "/bin",
        "HOME": "/home/u",
        "LC_ALL": "C",
        "CUDA_VISIBLE_DEVICES": "0",
        "GGML_CUDA_NO_PINNED": "1",
        "HF_TOKEN": TOKEN,
        "AWS_SECRET_ACCESS_KEY": "x",
        "DATABASE_URL": "postgresql://u:p@h/d",
    }
    env = child_environment(environ, {"LD_LIBRARY_PATH": "/lib/x", "EXTRA": "1"})
    assert env == {
        "PATH": "/bin",
        "HOME": "/home/u",
        "LC_ALL": "C",
        "CUDA_VISIBLE_DEVICES": "0",
        "GGML_CUDA_NO_PINNED": "1",
        "LD_LIBRARY_PATH": "/lib/x",
        "EXTRA": "1",
    }
