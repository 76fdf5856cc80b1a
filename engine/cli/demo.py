"""`studio-engine demo`: a real session against a real llama-server, then its replayed timeline."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from engine.cli.diagram import write_diagrams
from engine.cli.timeline import print_timeline
from engine.cli.tiny_model import write_tiny_model
from engine.core.request import LoadRequest, LoadResult
from engine.effects import LoadProgress
from engine.orchestrator import Engine


def _say(step: str, detail: str = "") -> None:
    print(f"\n▶ {step}" + (f"\n  {detail}" if detail else ""))


BAR_WIDTH = 30
MIB = 1024 * 1024


def progress_line(progress: LoadProgress) -> str:
    """`[#######.......]  45%  downloading  12.3 / 27.0 MiB  owner/repo` (the whole load:
    the download, then the weights the server maps, then ready)."""
    filled = int(BAR_WIDTH * progress.fraction)
    repo = f"  {progress.download.repo_id}" if progress.download is not None else ""
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {int(100 * progress.fraction):3d}%  "
        f"{progress.phase:<11}  {progress.bytes_done / MIB:6.1f} / "
        f"{progress.bytes_total / MIB:.1f} MiB{repo}"
    )


def load_with_progress(
    engine: Engine, request: LoadRequest, out: TextIO = sys.stdout, every: float = 0.1
) -> LoadResult:
    """`engine.load`, drawing a progress bar from `engine.progress()` until it ends."""
    results: list[LoadResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(engine.load(request))
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=run, name="demo-load")
    worker.start()
    last: LoadProgress | None = None
    while worker.is_alive():
        worker.join(every)
        progress = engine.progress()
        if progress is not None and progress != last:
            out.write("\r  " + progress_line(progress))
            out.flush()
            last = progress
    if errors:
        if last is not None:
            out.write("\n")
        raise errors[0]
    result = results[0]
    final = (engine.progress() if result.ok else None) or last  # ready: 1.0
    if final is not None:
        out.write("\r  " + progress_line(final) + "\n")
    return result


def run_hub_demo(workdir: Path, repo_id: str, variant: str | None) -> int:
    """Download and load a hub model with a progress bar, load it again (cached), unload."""
    journal = _fresh_journal(workdir)
    print(f"studio-engine demo — journal {journal}\nhub model: {repo_id} ({variant or 'auto'})")
    engine = Engine.open(journal, run_dir=workdir / "run")
    try:
        request = LoadRequest(model_path=repo_id, gguf_variant=variant)
        t = time.perf_counter()
        result = load_with_progress(engine, request)
        _say(
            f"load {repo_id}",
            f"{result.status} in {time.perf_counter() - t:.1f} s: {result.model_file}"
            + (f" — {result.error}" if result.error else ""),
        )
        if result.ok:
            t = time.perf_counter()
            again = engine.load(request)
            _say(
                "the same load again",
                f"{again.status} in {(time.perf_counter() - t) * 1000:.2f} ms",
            )
            _say("unload", f"state {engine.unload().state}")
    finally:
        engine.close()
    print(f"\nReplayed from the journal (`studio-engine replay {journal}`):\n")
    print_timeline(str(journal), "default", None)
    return 0 if result.ok else 1


def _fresh_journal(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("journal.db*"):
        if stale.is_file():
            stale.unlink()
    return workdir / "journal.db"


def run_demo(workdir: Path) -> int:
    journal = _fresh_journal(workdir)
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
