"""`studio-engine serve` as a user runs it (a subprocess on 127.0.0.1), driven by the official
`openai` client and by httpx for the llama.cpp router-compatible control API and the SSE."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from engine.adapters.journal import Journal
from engine.cli.tiny_model import write_tiny_model
from engine.core import events as ev

pytestmark = pytest.mark.server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    def __init__(self, base: str, journal: Path, process: subprocess.Popen[str]) -> None:
        self.base, self.journal, self.process = base, journal, process

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.base + path, trust_env=False, timeout=30, **kw)  # type: ignore[arg-type]

    def post(self, path: str, body: object, **kw: object) -> httpx.Response:
        return httpx.post(self.base + path, json=body, trust_env=False, timeout=60, **kw)  # type: ignore[arg-type]

    def status_of(self, model: str) -> str:
        entries = self.get("/models").json()["data"]
        return str(next(e for e in entries if e["id"] == model)["status"]["value"])


def _start(tmp_path: Path, *extra: str) -> Service:
    port = _free_port()
    journal = tmp_path / "journal.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", str(journal), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    service = Service(f"http://127.0.0.1:{port}", journal, process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if service.get("/health").status_code == 200:
                return service
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"serve did not start: {process.communicate()[0]}")


def _stop(service: Service) -> str:
    service.process.terminate()  # uvicorn shuts down, then the engine stops its server
    output = service.process.communicate(timeout=30)[0]
    assert service.process.returncode == 0, output
    return output


@pytest.fixture
def service(tmp_path: Path, tiny_model: Path) -> Iterator[Service]:
    embedder = write_tiny_model(tmp_path / "tiny-embed.gguf", pooling_type=1)  # mean pooling
    presets = tmp_path / "presets.toml"
    presets.write_text(
        f'[models.chat]\nmodel = "{tiny_model}"\nextra_args = ["--seed", "7"]\n\n'
        f'[models.embed]\nmodel = "{embedder}"\n'
    )
    running = _start(tmp_path, "--preset", str(presets))
    try:
        yield running
    finally:
        if running.process.poll() is None:
            _stop(running)
        assert not _our_servers(running.journal), "serve left a llama-server running"


def _our_servers(journal: Path) -> list[int]:
    """Pids of the servers this journal spawned that still run."""
    if not journal.exists():
        return []
    opened = Journal.open(journal, create=False)
    try:
        pids = [
            r.event.pid
            for stream in opened.streams()
            if ev.is_slot_stream(stream)
            for r in opened.read(stream)
            if isinstance(r.event, ev.Spawned)
        ]
    finally:
        opened.close()
    return [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_openai_client_chats_through_the_service_loading_on_demand(service: Service) -> None:
    client = openai.OpenAI(base_url=service.base + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["chat", "embed"]
    assert service.status_of("chat") == "unloaded"

    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert service.status_of("chat") == "loaded"
    entry = service.get("/models").json()["data"][0]
    assert entry["status"]["args"] == ["--seed", "7"]

    chunks = list(
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
    )
    assert len(chunks) >= 4 and chunks[-1].choices[0].finish_reason == "length"

    vectors = client.embeddings.create(model="embed", input="hello")
    assert len(vectors.data[0].embedding) == 64
    assert service.status_of("embed") == "loaded" and service.status_of("chat") == "loaded"

    with pytest.raises(openai.NotFoundError, match="not offered here"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])

    assert service.post("/models/unload", {"model": "chat"}).json() == {"success": True}
    assert service.status_of("chat") == "unloaded"
    metrics = service.get("/metrics").text
    assert 'studio_engine_loads_total{outcome="loaded",slot="chat"} 1.0' in metrics
    assert 'studio_engine_evictions_total{cause="manual"} 1.0' in metrics


def test_sse_streams_the_lifecycle_in_journal_order(service: Service) -> None:
    events: list[dict[str, object]] = []
    models: list[str] = []

    def read(path: str, sink: list, done: Callable[[list], bool]) -> None:  # type: ignore[type-arg]
        with httpx.stream("GET", service.base + path, trust_env=False, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    sink.append(json.loads(line[6:]))
                    if done(sink):
                        return

    def unloaded_again(sink: list) -> bool:  # type: ignore[type-arg]
        values = [m["status"]["value"] for m in sink]
        return "loaded" in values and values[-1] == "unloaded"

    readers = [
        threading.Thread(
            target=read, args=("/events", events, lambda s: s[-1]["event"]["type"] == "unloaded")
        ),
        threading.Thread(target=read, args=("/models/sse", models, unloaded_again)),
    ]
    for reader in readers:
        reader.start()
    time.sleep(0.5)  # both streams are open before the load
    assert service.post("/models/load", {"model": "chat"}).json() == {"success": True}
    deadline = time.monotonic() + 30
    while service.status_of("chat") != "loaded" and time.monotonic() < deadline:
        time.sleep(0.05)
    service.post("/models/unload", {"model": "chat"})
    for reader in readers:
        reader.join(30)

    journal = Journal.open(service.journal, create=False)
    try:
        journaled = [r.event.type for r in journal.read("chat")]
    finally:
        journal.close()
    streamed = [e["event"]["type"] for e in events if e["stream"] == "chat"]  # type: ignore[index]
    assert streamed == journaled
    assert streamed[0] == "load_requested" and "load_succeeded" in streamed
    values = [m["status"]["value"] for m in models]  # type: ignore[index]
    assert values[0] == "unloaded" and "loaded" in values and values[-1] == "unloaded"


def test_a_control_key_guards_everything_but_health(tmp_path: Path, tiny_model: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_model.read_bytes())
    running = _start(tmp_path, "--models-dir", str(models), "--control-key-file", str(key))
    try:
        assert running.get("/health").status_code == 200
        assert running.get("/models").status_code == 401
        assert (
            running.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        listed = running.get("/models", headers={"Authorization": "Bearer s3cret"}).json()
        assert [m["id"] for m in listed["data"]] == ["tiny"]
    finally:
        _stop(running)


def test_binding_beyond_loopback_needs_a_control_key(tmp_path: Path, tiny_model: Path) -> None:
    presets = tmp_path / "p.toml"
    presets.write_text(f'[models.chat]\nmodel = "{tiny_model}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "engine", "serve", str(tmp_path / "j.db"), "--host", "0.0.0.0",
         "--preset", str(presets)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "reachable from other machines: set a control key" in done.stderr
    assert not (tmp_path / "j.db").exists()


def test_a_bad_presets_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    presets = tmp_path / "p.toml"
    presets.write_text('[models.chat]\nmodel = "/x.gguf"\nctx = 5\n')
    done = subprocess.run(
        [sys.executable, "-m", "engine", "serve", str(tmp_path / "j.db"), "--preset", str(presets)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().endswith("model 'chat': unknown key(s) ctx")


def test_a_crashed_model_is_respawned_for_the_next_request(service: Service) -> None:
    client = openai.OpenAI(base_url=service.base + "/v1", api_key="unused")
    ask = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    client.chat.completions.create(**ask)  # type: ignore[call-overload]
    journal = Journal.open(service.journal, create=False, read_only=True)
    try:
        (first,) = [r.event.pid for r in journal.read("chat") if isinstance(r.event, ev.Spawned)]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while service.status_of("chat") != "failed" and time.monotonic() < deadline:
            time.sleep(0.02)  # the monitor journals the crash (router status: failed)
        reply = client.chat.completions.create(**ask)  # type: ignore[call-overload]
        assert reply.usage is not None and reply.usage.completion_tokens == 2
        kinds = [r.event.kind for r in journal.read("chat")]
    finally:
        journal.close()
    assert kinds.count("crashed") == 1 and "respawn_requested" in kinds
    assert kinds[kinds.index("respawn_requested") + 1] == "load_requested"


def test_bad_control_requests_are_named_and_change_nothing(service: Service) -> None:
    def post_raw(path: str, body: bytes) -> httpx.Response:
        return httpx.post(service.base + path, content=body, trust_env=False, timeout=10)

    for path in ("/models/load", "/models/unload", "/v1/chat/completions"):
        answer = post_raw(path, b"{not json")
        assert answer.status_code == 400 and "JSON" in answer.json()["error"]["message"]
    assert "'model'" in service.post("/models/load", {"name": "chat"}).json()["error"]["message"]
    unknown = service.post("/models/load", {"model": "../../etc/passwd"})
    assert unknown.status_code == 404 and "not offered here" in unknown.json()["error"]["message"]
    assert service.get("/events?since=-1").status_code == 400
    assert service.get("/events?since=%D9%A5").status_code == 400  # Arabic-Indic digit five
    assert service.status_of("chat") == "unloaded"
    assert not _our_servers(service.journal)  # nothing was started
