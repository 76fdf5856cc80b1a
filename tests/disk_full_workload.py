"""Child process of the disk-full test: the journal's file may not grow once the load's
spawn intent is journaled (RLIMIT_FSIZE, as a full disk would refuse it).

python -m tests.disk_full_workload JOURNAL RUN_DIR MODEL  -> one JSON line on stdout
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from typing import Any

from engine import Engine, JournalUnavailable, LoadRequest
from engine.adapters.process import ProcessManager
from engine.core import events as ev
from engine.core.state import SlotState


def main(journal: str, run_dir: str, model: str) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    engine = Engine.open(journal, run_dir=run_dir)

    filled: list[bool] = []

    def disk_fills(event: ev.Event, _state: SlotState) -> None:
        if event.type == "spawn_started" and not filled:
            filled.append(True)
            full = max(os.path.getsize(journal), os.path.getsize(journal + "-wal"))
            resource.setrlimit(resource.RLIMIT_FSIZE, (full, hard))

    def live() -> int:
        return len(ProcessManager().marked_processes(engine.journal_id + "/"))

    engine.observe(disk_fills)
    out: dict[str, Any] = {}
    request = LoadRequest(model_path=model)
    try:
        out["first"] = engine.load(request).status
    except JournalUnavailable as exc:
        out["first"] = f"JournalUnavailable: {exc}"
    out["live_after_first"] = live()
    try:
        engine.unload()
        out["unload"] = "ok"
    except JournalUnavailable as exc:
        out["unload"] = f"JournalUnavailable: {exc}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
    out["second"] = engine.load(request).status
    out["live_after_second"] = live()
    out["journal_id"] = engine.journal_id
    engine.close()
    out["live_after_close"] = live()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
