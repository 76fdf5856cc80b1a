"""Failure classification against the real llama-server: each way it can fail on this host,
produced for real, then classified (engine.core.failure). These runs are the fixtures."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.adapters.binary import locate_server
from engine.cli.tiny_model import write_tiny_model
from engine.core.failure import classify
from engine.orchestrator import Engine


def _run(binary: Path, *args: str, port: int | None = None) -> tuple[int, str]:
    """Run llama-server to its exit (these all fail within a second): code and output."""
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    done = subprocess.run(
        [str(binary), *args, "--host", "127.0.0.1", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def binary() -> Path:
    return locate_server(None).path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("failures")
    tiny = write_tiny_model(folder / "tiny.gguf")
    data = tiny.read_bytes()
    (folder / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (folder / "garbage.gguf").write_bytes(b"this is no GGUF file\n" * 64)
    # "tokenizer" is a word libllama contains (the engine's pre-check lets it through), not
    # an architecture: llama-server itself must refuse it.
    write_tiny_model(folder / "arch.gguf", architecture="tokenizer")
    yield folder


@pytest.mark.parametrize(
    ("args", "kind", "flag"),
    [
        (("-m", "{tiny}", "--nope"), "unknown_argument", "--nope"),
        (("-m", "{tiny}", "--flash-attn", "maybe"), "bad_value", "--flash-attn"),
        (
            (
                "-m",
                "{garbage}",
            ),
            "invalid_model_file",
            None,
        ),
        (
            (
                "-m",
                "{truncated}",
            ),
            "invalid_model_file",
            None,
        ),
        (
            (
                "-m",
                "{arch}",
            ),
            "unknown_architecture",
            None,
        ),
    ],
)
def test_real_start_failures_are_classified(
    binary: Path, models: Path, args: tuple[str, ...], kind: str, flag: str | None
) -> None:
    files = {
        name: str(models / f"{name}.gguf") for name in ("tiny", "garbage", "truncated", "arch")
    }
    code, output = _run(binary, *(a.format(**files) for a in args))
    failure = classify(code, output)
    assert code != 0 and (failure.kind, failure.flag) == (kind, flag), output[-2000:]
    assert "\n" not in failure.message


def test_a_taken_port_is_port_in_use(binary: Path, models: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, output = _run(binary, "-m", str(models / "tiny.gguf"), port=taken.getsockname()[1])
    assert classify(code, output).kind == "port_in_use", output[-2000:]


def test_a_missing_library_is_named(binary: Path, tmp_path: Path) -> None:
    alone = tmp_path / "llama-server"  # the binary without the libraries beside it
    shutil.copy2(binary, alone)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    done = subprocess.run([str(alone), "--version"], capture_output=True, text=True, env=env)
    failure = classify(done.returncode, done.stdout + done.stderr)
    assert failure.kind == "missing_library" and ".so" in failure.message, done.stderr


@pytest.mark.parametrize(
    ("name", "kind"), [("truncated", "invalid_model_file"), ("arch", "unknown_architecture")]
)
def test_a_failed_load_carries_its_kind(
    real_engine: Engine, models: Path, name: str, kind: str
) -> None:
    # truncated: the engine's own header read refuses it; arch: llama-server does.
    result = real_engine.load({"model_path": str(models / f"{name}.gguf")})
    assert result.status == "failed" and result.failure_kind == kind, result.error
    assert real_engine.status().last_failure_kind == kind
    failed = [r for r in real_engine.journal.read_rows("default") if r[3] == "load_failed"]
    assert f'"failure_kind":"{kind}"' in failed[-1][4]
