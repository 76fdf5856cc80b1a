"""Hub models end to end: a fake hub on 127.0.0.1, the real huggingface_hub client, the real
llama-server. Resolving happens before the old server is touched, so every failure or cancel
here must leave the previous server serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from engine.adapters.journal import Journal
from engine.cli.tiny_model import write_tiny_model
from engine.core import events as ev
from engine.core.request import LoadRequest, LoadResult
from engine.orchestrator import Engine
from tests.hubserver import FakeHub, Throttle

pytestmark = pytest.mark.server

TOKEN = "hf_" + "Zq7" * 12  # shaped like a real token, so the journal's own guard would see it
REPO = "Unsloth/Tiny-GGUF"


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("blobs")
    first = write_tiny_model(folder / "a.gguf", seed=1)
    second = write_tiny_model(folder / "b.gguf", seed=2)
    shard = write_tiny_model(folder / "split" / "Tiny-Q4_K_M.gguf", seed=3, split_max_tensors=12)
    return {
        "q4": first.read_bytes(),
        "q8": second.read_bytes(),
        "shard1": shard.read_bytes(),
        "shard2": shard.with_name("Tiny-Q4_K_M-00002-of-00002.gguf").read_bytes(),
    }


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tiny_repo(hub: FakeHub, blobs: dict[str, bytes]) -> None:
    hub.add(
        "unsloth/Tiny-GGUF",
        {
            "Tiny-Q8_0.gguf": blobs["q8"],
            "Tiny-Q4_K_M.gguf": blobs["q4"],
            "README.md": b"# tiny\n",
        },
    )


def _health(port: int | None) -> int:
    url = f"http://127.0.0.1:{port}/health"
    return httpx.get(url, timeout=2.0, trust_env=False).status_code


def _types(engine: Engine) -> list[str]:
    return [r.event.type for r in engine.journal.read(engine.slot)]


def _last(engine: Engine, kind: type[ev.BaseEvent]) -> ev.BaseEvent:
    return [r.event for r in engine.journal.read(engine.slot) if isinstance(r.event, kind)][-1]


def _ok(result: LoadResult) -> LoadResult:
    assert result.status == "loaded", result
    return result


def _serving_local(engine: Engine, tiny_model: Path) -> tuple[int, int]:
    result = _ok(engine.load(LoadRequest(model_path=str(tiny_model))))
    assert result.pid is not None and result.port is not None
    return result.pid, result.port


def _still_serving(engine: Engine, pid: int, port: int) -> None:
    status = engine.status()
    assert (status.state, status.pid, status.port) == ("ready", pid, port)
    assert _health(port) == 200


def test_load_by_repo_id_downloads_auto_picks_and_serves(
    real_engine: Engine, hub: FakeHub, tiny_repo: None, tmp_path: Path
) -> None:
    result = _ok(real_engine.load(LoadRequest(model_path="unsloth/tiny-gguf")))
    status = real_engine.status()
    assert status.variant == "Q4_K_M"  # the documented preference order
    model_file = Path(status.model_file or "")
    assert (
        model_file.is_relative_to(tmp_path / "hf" / "hub") and model_file.name == "Tiny-Q4_K_M.gguf"
    )
    assert _health(result.port) == 200
    assert psutil.Process(result.pid).cmdline()[2] == str(model_file)
    resolved = _last(real_engine, ev.ModelResolved)
    assert isinstance(resolved, ev.ModelResolved)
    assert resolved.model.source == "hf:unsloth/Tiny-GGUF"  # the hub's canonical casing
    assert (resolved.model.architecture, resolved.model.native_ctx) == ("llama", 2048)
    started = _last(real_engine, ev.DownloadStarted)
    assert isinstance(started, ev.DownloadStarted)
    assert [f.path for f in started.files] == ["Tiny-Q4_K_M.gguf"]
    assert started.total_bytes == model_file.stat().st_size
    types = _types(real_engine)
    # Coarse grain: one start, one event per file, however many chunks went by.
    assert types.count("download_started") == 1 and types.count("file_downloaded") == 1
    assert types.index("download_started") < types.index("model_resolved")
    done = real_engine.progress()  # nothing in flight any more: the served load, complete
    assert done is not None and (done.phase, done.fraction) == ("ready", 1.0)
    assert done.download is not None and done.download.done == done.download.total


def test_explicit_variant_is_case_insensitive_and_two_spellings_are_one_model(
    real_engine: Engine, hub: FakeHub, tiny_repo: None
) -> None:
    first = _ok(real_engine.load(LoadRequest(model_path=REPO, gguf_variant="q8_0")))
    assert real_engine.status().variant == "Q8_0"
    assert (real_engine.status().model_file or "").endswith("Tiny-Q8_0.gguf")
    with hub.counting() as seen:
        again = real_engine.load(LoadRequest(model_path="unsloth/tiny-gguf", gguf_variant="Q8_0"))
    assert again.status == "already_loaded" and again.pid == first.pid
    assert seen == []  # decided from the replayed state: no probe, no download


def test_repeat_load_of_a_cached_model_makes_no_request_even_after_a_restart(
    tmp_path: Path, hub: FakeHub, tiny_repo: None, tiny_model: Path
) -> None:
    journal = tmp_path / "journal.db"
    with Engine.open(journal, run_dir=tmp_path / "run") as engine:
        _ok(engine.load(LoadRequest(model_path=REPO)))
        _serving_local(engine, tiny_model)
        with hub.counting() as seen:
            _ok(engine.load(LoadRequest(model_path=REPO)))
        assert seen == []
    with Engine.open(journal, run_dir=tmp_path / "run") as engine, hub.counting() as seen:
        _ok(engine.load(LoadRequest(model_path="UNSLOTH/tiny-gguf")))
    assert seen == []  # the probe cache came back from the journal


def test_split_gguf_downloads_every_shard_and_runs_the_first(
    real_engine: Engine, hub: FakeHub, blobs: dict[str, bytes]
) -> None:
    hub.add(
        "owner/Split-GGUF",
        {
            "Q4_K_M/Tiny-Q4_K_M-00002-of-00002.gguf": blobs["shard2"],
            "Q4_K_M/Tiny-Q4_K_M-00001-of-00002.gguf": blobs["shard1"],
            "Tiny-Q8_0.gguf": blobs["q8"],
        },
    )
    result = _ok(
        real_engine.load(LoadRequest(model_path="owner/split-gguf", gguf_variant="Q4_K_M"))
    )
    argv = psutil.Process(result.pid).cmdline()
    first = Path(argv[argv.index("-m") + 1])
    assert first.name == "Tiny-Q4_K_M-00001-of-00002.gguf"
    assert first.with_name("Tiny-Q4_K_M-00002-of-00002.gguf").is_file()
    assert _types(real_engine).count("file_downloaded") == 2
    resolved = _last(real_engine, ev.ModelResolved)
    assert isinstance(resolved, ev.ModelResolved)
    assert resolved.model.size_bytes == len(blobs["shard1"]) + len(blobs["shard2"])
    assert _health(result.port) == 200


def test_a_repo_with_a_projector_is_a_vision_model_run_with_mmproj(
    real_engine: Engine, hub: FakeHub, blobs: dict[str, bytes]
) -> None:
    hub.add(
        "owner/Vision-GGUF",
        {"Tiny-Q4_K_M.gguf": blobs["q4"], "mmproj-F16.gguf": blobs["q8"]},
    )
    result = real_engine.load(LoadRequest(model_path="owner/Vision-GGUF"))
    resolved = _last(real_engine, ev.ModelResolved)
    assert isinstance(resolved, ev.ModelResolved)
    assert resolved.model.is_vision and (resolved.model.mmproj_file or "").endswith(
        "mmproj-F16.gguf"
    )
    assert Path(resolved.model.mmproj_file or "").is_file()
    spawns = [r.event for r in real_engine.journal.read(real_engine.slot)]
    first = next(e for e in spawns if isinstance(e, ev.SpawnStarted))
    assert first.argv[first.argv.index("--mmproj") + 1] == resolved.model.mmproj_file
    assert "--spec-default" not in first.argv  # speculative decoding is off for vision
    # Our projector is a llama GGUF, not a CLIP one: the real llama-server refuses it at
    # start-up (its own projector failure), and the ladder goes down to text-only.
    retried = [e for e in spawns if isinstance(e, ev.SpawnRetried)]
    assert [e.change for e in retried] == ["mmproj_cpu", "text_only"]
    assert result.status == "loaded", result
    last = _last(real_engine, ev.SpawnStarted)
    assert isinstance(last, ev.SpawnStarted)
    assert "--mmproj" not in last.argv and last.argv[-1] == "--no-mmproj"
    assert "text only" in (result.fallback_reason or "")


@pytest.mark.parametrize(
    ("repo", "files", "token", "message"),
    [
        ("ghost/Nothing-GGUF", None, None, "not found"),
        ("meta/Gated-GGUF", {"Tiny-Q4_K_M.gguf": b"x"}, None, "is gated"),
        ("meta/Gated-GGUF", {"Tiny-Q4_K_M.gguf": b"x"}, "hf_" + "w" * 34, "is gated"),
        ("owner/Safetensors", {"model.safetensors": b"x", "config.json": b"{}"}, None, "no GGUF"),
    ],
)
def test_permanent_hub_errors_are_clear_cached_and_leave_the_old_server(
    real_engine: Engine,
    hub: FakeHub,
    tiny_model: Path,
    repo: str,
    files: dict[str, bytes] | None,
    token: str | None,
    message: str,
) -> None:
    if files is not None:
        hub.add(repo, files, gated_token=TOKEN if "Gated" in repo else None)
    pid, port = _serving_local(real_engine, tiny_model)
    request = LoadRequest(model_path=repo, hf_token=token)  # type: ignore[arg-type]
    result = real_engine.load(request)
    assert result.status == "failed" and message in (result.error or ""), result
    assert repo in (result.error or "")
    _still_serving(real_engine, pid, port)
    assert _types(real_engine)[-1] == "load_abandoned"
    with hub.counting() as seen:  # definitive: cached, the hub is not asked again
        again = real_engine.load(request)
    assert again.error == result.error and seen == []
    _still_serving(real_engine, pid, port)


def test_a_server_error_is_retried_next_time_never_cached(
    real_engine: Engine, hub: FakeHub, tiny_repo: None, tiny_model: Path
) -> None:
    pid, port = _serving_local(real_engine, tiny_model)
    hub.fail_next(1)
    failed = real_engine.load(LoadRequest(model_path=REPO))
    assert failed.status == "failed" and "HTTP 500" in (failed.error or ""), failed
    assert "not cached" in (failed.error or "")
    _still_serving(real_engine, pid, port)
    _ok(real_engine.load(LoadRequest(model_path=REPO)))
    records = list(real_engine.journal.read_rows(ev.HUB_PROBE_STREAM))
    assert len(records) == 1 and '"error":null' in records[0][4]


def test_cancel_mid_download_leaves_the_old_server_serving(
    real_engine: Engine, hub: FakeHub, tiny_model: Path, blobs: dict[str, bytes], tmp_path: Path
) -> None:
    big = blobs["q4"] + bytes(24 << 20)  # > 2 of huggingface_hub's 10 MiB chunks
    hub.add("owner/Slow-GGUF", {"Slow-Q4_K_M.gguf": big})
    hub.throttles["Slow-Q4_K_M.gguf"] = Throttle(chunk=1 << 20, delay_s=0.02)
    pid, port = _serving_local(real_engine, tiny_model)
    results: list[LoadResult] = []
    loader = threading.Thread(
        target=lambda: results.append(real_engine.load(LoadRequest(model_path="owner/Slow-GGUF")))
    )
    loader.start()
    deadline = time.monotonic() + 10
    seen = None
    while time.monotonic() < deadline:
        progress = real_engine.progress()
        seen = progress.download if progress is not None else None
        if seen is not None and seen.done > 0:
            break
        time.sleep(0.005)
    assert progress is not None and progress.phase == "downloading", progress
    assert seen is not None and 0 < seen.done < seen.total == len(big), seen
    assert (progress.bytes_done, progress.bytes_total) == (seen.done, seen.total)
    assert 0 < progress.fraction < 0.5  # the download is the first half of the load
    assert seen.files[0].path == "Slow-Q4_K_M.gguf"
    real_engine.cancel("user pressed stop")
    loader.join(10)
    (result,) = results
    assert result.status == "cancelled" and result.error == "user pressed stop"
    _still_serving(real_engine, pid, port)
    abandoned = _last(real_engine, ev.LoadAbandoned)
    assert isinstance(abandoned, ev.LoadAbandoned) and abandoned.outcome == "cancelled"
    assert "file_downloaded" not in _types(real_engine)
    blobs_dir = tmp_path / "hf" / "hub" / "models--owner--Slow-GGUF" / "blobs"
    assert not [p for p in blobs_dir.glob("*") if p.stat().st_size == len(big)]


def test_offline_load_from_the_hub_cache_needs_no_network(
    tmp_path: Path, hub: FakeHub, tiny_repo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Engine.open(tmp_path / "online.db", run_dir=tmp_path / "run") as engine:
        _ok(engine.load(LoadRequest(model_path=REPO, gguf_variant="Q8_0")))
    hub.stop()  # no hub at all, and a fresh journal: no probe cache to lean on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Engine.open(tmp_path / "offline.db", run_dir=tmp_path / "run") as engine:
        result = _ok(engine.load(LoadRequest(model_path="unsloth/tiny-gguf", gguf_variant="q8_0")))
        assert engine.status().variant == "Q8_0" and _health(result.port) == 200
        missing = engine.load(LoadRequest(model_path=REPO, gguf_variant="Q4_K_M"))
        assert missing.status == "failed" and "HF_HUB_OFFLINE" in (missing.error or "")
        assert engine.status().pid == result.pid  # still serving the cached one


def test_tokens_reach_the_hub_but_never_the_journal(
    tmp_path: Path, hub: FakeHub, blobs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add("meta/Gated-GGUF", {"Tiny-Q4_K_M.gguf": blobs["q4"]}, gated_token=TOKEN)
    journal = tmp_path / "journal.db"
    with Engine.open(journal, run_dir=tmp_path / "run") as engine:
        _ok(engine.load(LoadRequest(model_path="meta/gated-gguf", hf_token=TOKEN)))  # type: ignore[arg-type]
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # the environment's token, the way hf does it
        _ok(engine.load(LoadRequest(model_path="meta/Gated-GGUF", max_seq_length=512)))
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("journal.db*") if p.is_file())
    assert TOKEN.encode() not in raw and TOKEN[3:].encode() not in raw
    reader = Journal.open(journal, create=False)
    try:
        probes = [
            ev.HUB_PROBED_ADAPTER.validate_json(r[4]) for r in reader.read_rows(ev.HUB_PROBE_STREAM)
        ]
    finally:
        reader.close()
    assert {p.token_fingerprint for p in probes} == {_fingerprint(TOKEN)}
    assert all(p.repo_id == "meta/Gated-GGUF" and p.error is None for p in probes)


def _fingerprint(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def test_the_demo_draws_a_progress_bar_for_a_hub_download(
    hub: FakeHub, tiny_repo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli.demo import run_hub_demo

    # Slow enough (~0.5 s) for the 0.1 s poll to draw frames before the final one.
    hub.throttles["Tiny-Q4_K_M.gguf"] = Throttle(chunk=64 * 1024, delay_s=0.08)
    assert run_hub_demo(tmp_path / "demo", "unsloth/tiny-gguf", None) == 0
    out = capsys.readouterr().out
    frames = [line for line in out.replace("\r", "\n").splitlines() if "MiB" in line]
    assert len(frames) >= 2, out
    assert frames[-1].lstrip().startswith("[" + "#" * 30 + "] 100%")
    assert "unsloth/Tiny-GGUF" in frames[-1]
    assert "already_loaded" in out and "Tiny-Q4_K_M.gguf" in out
