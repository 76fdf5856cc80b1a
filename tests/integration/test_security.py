"""Issue 12 against the real llama-server: every attack of the issue is refused, naming the flag;
the port race ends on our own pid after a journaled retry; the server has a key, a minimal
environment and private files."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from engine import InvalidRequest
from engine.adapters.runtime import RealEffects
from engine.core import events as ev
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from tests.unit.test_policy import ATTACKS

pytestmark = pytest.mark.server


def test_every_attack_of_the_issue_is_refused_naming_the_flag(
    real_engine: Engine, tiny_model: Path
) -> None:
    version = real_engine.status().journal_version
    for args, flag in ATTACKS:
        with pytest.raises(InvalidRequest) as caught:
            real_engine.load({"model_path": str(tiny_model), "llama_extra_args": args})
        assert flag in str(caught.value), (args, str(caught.value))
    for fields, message in [
        ({"max_seq_length": True}, "max_seq_length"),
        ({"llama_extra_args": ["-c", "٥١٢"]}, "-c needs a context length"),
        ({"llama_extra_args": ["--no-such-flag"]}, "'--no-such-flag' is not a flag"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            real_engine.load({"model_path": str(tiny_model), **fields})
    assert real_engine.status().journal_version == version, "a refused load journals nothing"
    # `--top-k=20` reaches the server in the form it accepts.
    result = real_engine.load(
        LoadRequest(model_path=str(tiny_model), llama_extra_args=["--top-k=20", "-c", "512"])
    )
    assert result.status == "loaded", result
    argv = psutil.Process(result.pid).cmdline()  # type: ignore[arg-type]
    assert argv[-4:] == ["--top-k", "20", "--ctx-size", "512"]


class _Impostor(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def impostor() -> Iterator[int]:
    """Another local user's listener that answers 200 on /health, on a port we will be given."""
    server = HTTPServer(("127.0.0.1", 0), _Impostor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_the_port_race_ends_on_our_own_pid_after_a_journaled_retry(
    real_engine: Engine, tiny_model: Path, impostor: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [impostor]
    real_free_port = RealEffects.free_port

    def taken_first(self: RealEffects) -> int:
        return ports.pop() if ports else real_free_port(self)

    monkeypatch.setattr(RealEffects, "free_port", taken_first)
    result = real_engine.load(LoadRequest(model_path=str(tiny_model)))
    assert result.status == "loaded", result
    assert result.port != impostor and result.pid is not None
    listeners = [
        c
        for c in psutil.Process(result.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert [c.laddr.port for c in listeners] == [result.port], "loaded on our own listener"
    retried = [
        r.event
        for r in real_engine.journal.read(real_engine.slot)
        if r.event.type == "spawn_retried"
    ]
    assert len(retried) == 1
    assert isinstance(retried[0], ev.SpawnRetried) and retried[0].port == impostor
    # The ladder's first rung: a new port gives nothing up.
    assert (retried[0].failure_kind, retried[0].change) == ("port_in_use", "new_port")
    assert result.fallback_reason is None and real_engine.status().fallback_reason is None


def test_only_the_owner_reaches_the_server_and_it_inherits_no_secret(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "canary-" + os.urandom(8).hex()
    monkeypatch.setenv("STUDIO_TEST_CANARY", canary)
    monkeypatch.setenv("HF_TOKEN", canary)
    run = tmp_path / "run"
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with Engine.open(
        tmp_path / "journal.db", run_dir=run, monitor=False, child_env={"STUDIO_EXTRA": "1"}
    ) as engine:
        result = engine.load(
            LoadRequest(model_path=str(tiny_model), chat_template_override=template)
        )
        assert result.status == "loaded", result
        environ = Path(f"/proc/{result.pid}/environ").read_bytes().split(b"\0")
        assert not any(canary.encode() in entry for entry in environ)
        assert b"STUDIO_EXTRA=1" in environ and any(e.startswith(b"PATH=") for e in environ)
        status = engine.status()
        assert status.api_key is not None and status.base_url == f"http://127.0.0.1:{result.port}"
        key = status.api_key.get_secret_value()
        assert key not in " ".join(psutil.Process(result.pid).cmdline())
        with httpx.Client(base_url=status.base_url, trust_env=False) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").status_code == 401
            authorised = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert authorised.status_code == 200
        for file in tmp_path.glob("journal.db*"):  # the WAL too
            assert key.encode() not in file.read_bytes(), file
        folders = [run, run / "logs", run / "logs" / "default", run / "keys", run / "templates"]
        for folder in [*folders, run / "keys" / "default"]:
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        for file in [*(run / "keys" / "default").iterdir(), *(run / "templates").iterdir()]:
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_server_api_key_none_runs_a_server_without_a_key(tmp_path: Path, tiny_model: Path) -> None:
    with Engine.open(
        tmp_path / "journal.db", run_dir=tmp_path / "run", monitor=False, server_api_key=None
    ) as engine:
        result = engine.load(LoadRequest(model_path=str(tiny_model)))
        assert result.status == "loaded" and result.api_key is None
        assert "--api-key-file" not in psutil.Process(result.pid).cmdline()  # type: ignore[arg-type]
        response = httpx.get(f"http://127.0.0.1:{result.port}/v1/models", trust_env=False)
        assert response.status_code == 200


def test_listen_unix_serves_on_a_private_socket_and_is_adopted_after_restart(
    tmp_path: Path, tiny_model: Path
) -> None:
    run = tmp_path / "run"
    journal = tmp_path / "journal.db"
    engine = Engine.open(journal, run_dir=run, monitor=False, listen="unix")
    try:
        result = engine.load(LoadRequest(model_path=str(tiny_model)))
        assert result.status == "loaded", result
        status = engine.status()
        assert status.socket_path is not None and status.socket_path.endswith(".sock")
        assert status.port is None and result.port is None
        assert Path(status.socket_path).parent == run / "sockets"
        assert stat.S_IMODE((run / "sockets").stat().st_mode) == 0o700
        server = psutil.Process(result.pid)  # type: ignore[arg-type]
        assert not [c for c in server.net_connections(kind="tcp") if c.status == "LISTEN"]
        assert status.api_key is not None
        key = status.api_key.get_secret_value()
        with httpx.Client(
            base_url=status.base_url or "", transport=status.http_transport(), trust_env=False
        ) as client:
            assert client.get("/v1/models").status_code == 401
            headers = {"Authorization": f"Bearer {key}"}
            assert client.get("/v1/models", headers=headers).status_code == 200
    except BaseException:
        engine.close()  # a failed check must not leave a server running
        raise
    engine.close(keep_server=True)  # leave the server for the next open to adopt
    pid = result.pid
    with Engine.open(journal, run_dir=run, monitor=False, listen="unix") as again:
        status = again.status()
        assert status.state == "ready" and status.pid == pid, "adopted over its Unix socket"
        assert status.api_key is not None and status.api_key.get_secret_value() == key


def test_logs_are_kept_for_the_last_50_loads_and_failed_ones_for_7_days(
    real_engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "run" / "logs" / "default"
    logs.mkdir(parents=True, exist_ok=True)
    day, now = 24 * 3600.0, time.time()
    for i in range(60):  # 60 earlier loads of the last day, old059 the newest
        path = logs / f"old{i:03}.log"
        path.write_text("log\n")
        os.utime(path, (now - day + i, now - day + i))
    os.utime(logs / "old000.log", (now - 3 * day, now - 3 * day))  # failed 3 days ago: kept
    (logs / "old000.failed").touch()
    os.utime(logs / "old001.log", (now - 8 * day, now - 8 * day))  # failed 8 days ago: goes
    (logs / "old001.failed").touch()
    result = real_engine.load(LoadRequest(model_path=str(tiny_model)))
    assert result.status == "loaded", result
    kept = sorted(p.stem for p in logs.glob("*.log"))
    assert len(kept) == 51 and "old000" in kept and result.load_id in kept
    assert "old001" not in kept and not (logs / "old001.failed").exists()
    pruned = [
        ev.LogsPruned.model_validate_json(payload)
        for *_, payload in real_engine.journal.read_rows(ev.RUN_FILES_STREAM)
    ]
    assert [sorted(p.load_ids) for p in pruned] == [[f"old{i:03}" for i in range(1, 11)]]


class _BadGateway(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(502)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_hub_endpoint_credentials_never_reach_the_result_or_the_journal(
    real_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = HTTPServer(("127.0.0.1", 0), _BadGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://alice:s3cretpw@127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        result = real_engine.load(LoadRequest(model_path="owner/repo"))
    finally:
        server.shutdown()
        server.server_close()
    assert result.status == "failed" and "502" in (result.error or "")
    assert "s3cretpw" not in (result.error or "") and "alice" not in (result.error or "")
    assert "http://***@127.0.0.1" in (result.error or "")
    for file in tmp_path.glob("journal.db*"):  # the WAL too
        assert b"s3cretpw" not in file.read_bytes(), file
