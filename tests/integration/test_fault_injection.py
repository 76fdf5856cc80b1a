"""SIGKILL the engine at 50+ points of a real workload; every reopen must leave reality and the
journal in agreement, with no unowned server and a journal that verifies.

The kill points run in sequence on one journal, so each child also recovers from the previous
crash (repeated recovery), and half of the reopens leave their server for the next child to
adopt. Foreign processes (no marker, another journal's slot) must survive all of it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from engine.adapters.journal import Journal
from engine.adapters.process import MARKER_ENV, ProcessManager
from engine.cli.main import main as cli_main
from engine.orchestrator import Engine, journal_id
from tests.conftest import rows

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
RANDOM_KILLS = 8


def _child(journal: Path, run_dir: Path, a: Path, b: Path, **crash: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRASH_")}
    env.update(crash)
    done = subprocess.run(
        [sys.executable, "-m", "tests.crash_workload", str(journal), str(run_dir), str(a), str(b)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr.decode()[-3000:]
    return done.returncode


def _sleeper(marker: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    if marker is not None:
        env[MARKER_ENV] = marker
    return subprocess.Popen(["sleep", "600"], env=env, start_new_session=True)


@pytest.fixture
def bystanders(tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    jid = journal_id(_journal(tmp_path / "journal.db"))
    procs = {
        "unmarked": _sleeper(None),
        "other journal": _sleeper("0123456789ab/default/x"),
        "other slot": _sleeper(f"{jid}/default-2/x"),
    }
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


@pytest.fixture
def no_server_left(tmp_path: Path) -> Iterator[None]:
    """Even when an assertion fails midway, no server of this test's journals outlives it."""
    yield
    for name in ("clean.db", "journal.db"):
        if (tmp_path / name).exists():
            prefix = journal_id(_journal(tmp_path / name)) + "/"
            for pid, _create_time, _marker in ProcessManager().marked_processes(prefix):
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()


def _journal(path: Path) -> Journal:
    journal = Journal.open(path)
    journal.close()
    return journal


def _reality_matches(engine: Engine) -> None:
    state = engine.state
    marked = ProcessManager().marked_processes(engine.journal_id + "/")
    ours = [m for m in marked if m[2].startswith(f"{engine.journal_id}/{engine.slot}/")]
    assert state.state in ("ready", "idle", "failed", "crashed"), state
    if state.state == "ready":
        assert state.process is not None
        assert [pid for pid, _, _ in ours] == [state.process.pid], (ours, state)
        response = httpx.get(
            f"http://127.0.0.1:{state.process.port}/health", timeout=2.0, trust_env=False
        )
        assert response.status_code == 200
    else:
        assert ours == [], f"unowned server(s) {ours} while the slot is {state.state}"
        assert state.process is None


def _verify(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["verify", str(journal)])
    out = capsys.readouterr().out
    assert code == 0, out


def test_sigkill_at_every_point_recovers(
    tmp_path: Path,
    tiny_model: Path,
    bystanders: dict[str, subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
    no_server_left: None,
) -> None:
    model_b = tmp_path / "tiny-b.gguf"
    model_b.write_bytes(tiny_model.read_bytes())
    run_dir = tmp_path / "run"

    # A clean run on its own journal tells which events the workload journals.
    clean = tmp_path / "clean.db"
    assert _child(clean, tmp_path / "clean-run", tiny_model, model_b) == 0
    reference = [row[3] for row in rows(clean)]
    kinds = list(dict.fromkeys(reference))
    assert {"spawned", "kill_started", "health_failed", "load_abandoned"} <= set(kinds)
    opened = Engine.open(clean, run_dir=tmp_path / "clean-run")  # adopts, then stops it
    assert opened.state.state == "ready"
    opened.close()

    journal = tmp_path / "journal.db"
    rng = random.Random(6)
    # Every journaled event kind, recovery's own events (they happen when a child reopens a
    # crash) and random instants are all tried; then the N-th event, for every N in random
    # order, until 50 kills have landed (a point can miss: after an adoption the workload
    # journals a different sequence than the clean run).
    points: list[dict[str, str]] = [{"CRASH_AFTER_KIND": kind} for kind in kinds]
    points += [
        {"CRASH_AFTER_KIND": kind}
        for kind in ("recovery_started", "orphan_killed", "recovery_adopted", "recovery_finished")
    ]
    points += [{"CRASH_AT_SECONDS": f"{rng.uniform(0.5, 2.0):.3f}"} for _ in range(RANDOM_KILLS)]
    always = len(points)
    numbered = [{"CRASH_AFTER_EVENT": str(n)} for n in range(1, len(reference) + 1)]
    rng.shuffle(numbered)
    points += numbered
    kills = 0
    started = time.monotonic()
    planted: list[subprocess.Popen[bytes]] = []
    for index, point in enumerate(points):
        if index >= always and kills >= 50:
            break
        if index == always // 2:  # a server of ours nobody owns: must be killed on open
            planted.append(_sleeper(f"{journal_id(_journal(journal))}/default/planted"))
        code = _child(journal, run_dir, tiny_model, model_b, **point)
        kills += code == -signal.SIGKILL
        engine = Engine.open(journal, run_dir=run_dir, health_timeout=60.0)
        try:
            _reality_matches(engine)
        finally:
            # Alternate: leave the server for the next child to adopt, or stop it.
            engine.close(keep_server=index % 2 == 0)
        _verify(journal, capsys)
    assert planted[0].wait(timeout=10) is not None  # killed as an orphan by a recovery
    assert kills >= 50, f"only {kills} of {len(points)} points killed the child"
    assert index >= always
    types = [row[3] for row in rows(journal)]
    for kind in ("recovery_adopted", "orphan_killed", "load_failed", "recovery_finished"):
        assert kind in types, f"no {kind} in the journal: recovery path not exercised"
    for name, proc in bystanders.items():
        assert proc.poll() is None, f"the {name} process was killed"
        assert psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    # The last iteration may have left its server for adoption (even index): stop it.
    Engine.open(journal, run_dir=run_dir, health_timeout=60.0).close()
    leftover = ProcessManager().marked_processes(journal_id(_journal(journal)) + "/default/")
    assert leftover == []
    assert time.monotonic() - started < 300
