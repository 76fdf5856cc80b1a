"""The retry ladder, one rung per test, with the journal sequence and `fallback_reason`.

The real binary cannot fail these ways on a CPU host, so each test runs a stand-in: a
script that prints llama.cpp's own message (quoted in tests/unit/test_failure.py with its
source file) and exits, or dies of a signal, unless the rung's change is on its command
line; then it execs the real llama-server with the same arguments. The engine, the journal
and the served model are real.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.adapters.binary import locate_server
from engine.cli.main import main
from engine.cli.tiny_model import write_tiny_model
from engine.orchestrator import Engine
from engine.replay import replay_state
from tests.integration.conftest import marked_servers
from tests.unit.test_failure import CUDA_OOM, PROJECTOR, SPECULATIVE

REAL = locate_server(None).path


def stand_in(folder: Path, cured_by: str, failure: str) -> Path:
    """A llama-server that fails (`failure`: shell) unless its argv contains `cured_by`."""
    script = folder / "llama-server"
    script.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" {cured_by} "*|*" --help "*|*" --version "*) '
        f'exec {shlex.quote(str(REAL))} "$@";; esac\n'
        f"{failure}\n"
    )
    script.chmod(0o755)
    return script


def prints(message: str) -> str:
    return f"printf '%s' {shlex.quote(message)} >&2; exit 1"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "models" / "tiny.gguf")


@pytest.fixture
def open_engine(tmp_path: Path) -> Iterator[list[Engine]]:
    opened: list[Engine] = []
    yield opened
    for engine in opened:
        engine.close()
        assert replay_state(engine.journal.read_rows("default")) == engine.state
        assert not marked_servers(engine)


def _engine(tmp_path: Path, binary: Path, opened: list[Engine]) -> Engine:
    engine = Engine.open(tmp_path / "journal.db", llama_server=binary, run_dir=tmp_path / "run")
    opened.append(engine)
    return engine


def _ladder(engine: Engine) -> list[tuple[str, str | None, str | None]]:
    """(event type, failure_kind, change) of the spawn / retry / outcome events."""
    seen = []
    for row in engine.journal.read_rows("default"):
        if row[3] in ("spawned", "spawn_retried", "load_succeeded", "load_failed"):
            payload = json.loads(row[4])
            seen.append((row[3], payload.get("failure_kind"), payload.get("change")))
    return seen


@pytest.mark.parametrize(
    ("cured_by", "failure", "request_extra", "kind", "change", "reason"),
    [
        (
            "--fit on",
            prints(CUDA_OOM),
            {"llama_extra_args": ["--fit", "off"]},
            "gpu_out_of_memory",
            "fit_on",
            "the GPU ran out of memory with --fit off",
        ),
        (
            "--flash-attn off",
            "kill -SEGV $$",
            {},
            "crashed",
            "flash_attn_off",
            "flash attention is off",
        ),
        (
            "--spec-type none",
            prints(SPECULATIVE),
            {"speculative_type": "default"},
            "exited",
            "spec_off",
            "speculative decoding is off",
        ),
    ],
)
def test_a_rung_then_ready(
    tmp_path: Path,
    model: Path,
    open_engine: list[Engine],
    cured_by: str,
    failure: str,
    request_extra: dict[str, object],
    kind: str,
    change: str,
    reason: str,
) -> None:
    engine = _engine(tmp_path, stand_in(tmp_path, cured_by, failure), open_engine)
    result = engine.load({"model_path": str(model), **request_extra})
    assert result.status == "loaded", result.error
    assert _ladder(engine) == [
        ("spawned", None, None),
        ("spawn_retried", kind, change),
        ("spawned", None, None),
        ("load_succeeded", None, None),
    ]
    assert reason in (engine.status().fallback_reason or "")
    assert reason in (result.fallback_reason or "")


def test_projector_on_cpu_then_text_only(
    tmp_path: Path, model: Path, open_engine: list[Engine]
) -> None:
    write_tiny_model(model.parent / "mmproj-tiny.gguf")  # beside it: a vision model
    engine = _engine(tmp_path, stand_in(tmp_path, "--no-mmproj", prints(PROJECTOR)), open_engine)
    result = engine.load({"model_path": str(model)})
    assert result.status == "loaded", result.error
    assert _ladder(engine) == [
        ("spawned", None, None),
        ("spawn_retried", "exited", "mmproj_cpu"),
        ("spawned", None, None),
        ("spawn_retried", "exited", "text_only"),
        ("spawned", None, None),
        ("load_succeeded", None, None),
    ]
    reason = engine.status().fallback_reason or ""
    assert "projector runs on the CPU" in reason and "text only" in reason


def test_the_ladder_ends_after_its_rungs(
    tmp_path: Path, model: Path, open_engine: list[Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    # Never cured: one flash-attention retry, then the load fails with the crash's kind.
    engine = _engine(tmp_path, stand_in(tmp_path, "--never", "kill -SEGV $$"), open_engine)
    result = engine.load({"model_path": str(model)})
    assert result.status == "failed" and result.failure_kind == "crashed"
    assert "SIGSEGV" in (result.error or "")
    assert _ladder(engine) == [
        ("spawned", None, None),
        ("spawn_retried", "crashed", "flash_attn_off"),
        ("spawned", None, None),
        ("load_failed", "crashed", None),
    ]
    assert main(["postmortem", str(tmp_path / "journal.db")]) == 0
    text = capsys.readouterr().out
    assert "ladder rung 1: crashed -> flash_attn_off" in text
    assert "gave up: it crashed with flash attention" in text
    assert "error [crashed]: llama-server died of SIGSEGV before it was healthy" in text


def test_cancel_is_checked_between_rungs(
    tmp_path: Path, model: Path, open_engine: list[Engine]
) -> None:
    engine = _engine(tmp_path, stand_in(tmp_path, "--never", "kill -SEGV $$"), open_engine)
    engine.observe(
        lambda event, _: (
            engine.cancel("user pressed stop") if event.type == "spawn_retried" else None
        )
    )
    result = engine.load({"model_path": str(model)})
    assert result.status == "cancelled" and result.error == "user pressed stop"
    types = [row[3] for row in engine.journal.read_rows("default")]
    assert types.count("spawned") == 1  # the next rung never spawned
    assert types[types.index("spawn_retried") + 1] == "load_cancelled"
