"""Child process of the fault-injection test: a scripted workload that SIGKILLs itself.

python -m tests.crash_workload JOURNAL RUN_DIR MODEL_A MODEL_B

Where it dies (environment, at most one used):
  CRASH_AFTER_EVENT=N    right after the N-th event this process journals (recovery included)
  CRASH_AFTER_KIND=K     right after the first event of type K this process journals
  CRASH_AT_SECONDS=S     S seconds after start, wherever it is
Without any, it runs to the end and closes with keep_server=True (exit code 0).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from engine.core import events as ev
from engine.core.request import LoadRequest
from engine.core.state import SlotState
from engine.orchestrator import Engine


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingEngine(Engine):
    """Dies right after an event is durable: the worst moment for the next open."""

    after_event = int(os.environ.get("CRASH_AFTER_EVENT", "0"))
    after_kind = os.environ.get("CRASH_AFTER_KIND")
    emitted = 0

    def emit(self, *events: ev.Event, durable: bool | None = None) -> SlotState:
        state = super().emit(*events, durable=durable)
        for event in events:
            CrashingEngine.emitted += 1
            if CrashingEngine.emitted == self.after_event or event.type == self.after_kind:
                _die()
        return state


def workload(engine: Engine, model_a: str, model_b: str, junk: str) -> None:
    def load(**fields: Any) -> None:
        engine.load(LoadRequest(**fields))

    load(model_path=model_a, llama_extra_args=["--seed", "42"])
    load(model_path=model_a)  # duplicate: short-circuits
    load(model_path=model_b, max_seq_length=512)  # kill A, spawn B
    engine.unload()
    load(model_path=model_a, llama_extra_args=["--top-k", "20"])
    load(model_path=junk)  # fails to resolve: A keeps serving
    load(model_path=model_a, llama_extra_args=["--numa", "bogus"])  # server refuses to start
    load(model_path=model_b)


def main(argv: list[str]) -> int:
    journal, run_dir, model_a, model_b = argv
    at = os.environ.get("CRASH_AT_SECONDS")
    if at is not None:
        timer = threading.Timer(float(at), _die)
        timer.daemon = True
        timer.start()
    junk = Path(run_dir) / "junk.gguf"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"not a gguf file")
    engine = CrashingEngine.open(journal, run_dir=run_dir, health_timeout=60.0)
    try:
        workload(engine, model_a, model_b, str(junk))
    finally:
        engine.close(keep_server=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
