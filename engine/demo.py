"""`studio-engine demo`: a real session against a real llama-server, then its replayed timeline."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from engine.cli import print_timeline
from engine.diagram import write_diagrams
from engine.orchestrator import Engine
from engine.request import LoadRequest
from engine.tiny_model import write_tiny_model


def _say(step: str, detail: str = "") -> None:
    print(f"\n▶ {step}" + (f"\n  {detail}" if detail else ""))


def run_demo(workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    journal = workdir / "journal.db"
    for stale in workdir.glob("journal.db*"):
        if stale.is_file():
            stale.unlink()
    model = write_tiny_model(workdir / "tiny-llama.gguf")
    print(f"studio-engine demo — journal {journal}\nmodel: {model} ({model.stat().st_size} bytes)")

    engine = Engine.open(journal, run_dir=workdir / "run")
    try:
        t = time.perf_counter()
        result = engine.load(
            LoadRequest(model_path=str(model), llama_extra_args=["--top-k", "20", "--seed", "42"])
        )
        _say(
            "load with extra args --top-k 20 --seed 42",
            f"{result.status} in {(time.perf_counter() - t) * 1000:.0f} ms: pid {result.pid}, "
            f"port {result.port}",
        )

        t = time.perf_counter()
        result = engine.load(LoadRequest(model_path=str(model)))
        _say(
            "the same load again (extra args omitted = inherit)",
            f"{result.status} in {(time.perf_counter() - t) * 1000:.2f} ms — no kill, no spawn",
        )

        result = engine.load(LoadRequest(model_path=str(model), max_seq_length=1024))
        _say(
            "load with a new context length (1024)",
            f"{result.status}: the old server was killed first, new pid {result.pid}",
        )

        status = engine.unload()
        _say(
            "unload (the Apply path is unload + load)",
            f"state {status.state}; stored extra args survive: {' '.join(status.extra_args)}",
        )

        result = engine.load(LoadRequest(model_path=str(model)))
        _say(
            "load again without extra args",
            f"{result.status}, pid {result.pid}; the server got "
            f"{' '.join(engine.state.serving.argv[-4:]) if engine.state.serving else '?'}",
        )

        assert result.pid is not None
        os.kill(result.pid, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while engine.status().state != "crashed" and time.monotonic() < deadline:
            time.sleep(0.02)
        _say(
            "the server is killed from outside (kill -9)",
            f"crash detected: state {engine.status().state} — {engine.status().last_error}",
        )

        status = engine.unload()
        _say("unload", f"state {status.state}")
    finally:
        engine.close()

    print(f"\nReplayed from the journal (`studio-engine replay {journal}`):\n")
    print_timeline(str(journal), "default", None)
    diagrams = write_diagrams(workdir / "diagrams")
    print(
        f"\njournal:  {journal}\nlogs:     {workdir / 'run' / 'logs'}\n"
        f"diagram:  {diagrams[1]} (Mermaid; the committed one is diagrams/lifecycle.md)"
    )
    return 0
