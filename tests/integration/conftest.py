from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.orchestrator import Engine
from engine.replay import replay_state
from tests.conftest import rows


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL started from the machine's own install for this test session."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("!!! PostgreSQL is not installed (no initdb/pg_ctl): fleet journal UNTESTED")
    base = Path(tempfile.mkdtemp(prefix="studio-engine-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "engine", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://engine@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database per test."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield f"{postgres_server}/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_journal_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "journal.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def real_engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine driving the real llama-server; its journal must replay to its final state."""
    journal = tmp_path / "journal.db"
    engine = Engine.open(journal, run_dir=tmp_path / "run")
    try:
        yield engine
    finally:
        engine.close()
        assert replay_state(rows(journal)) == engine.state, "replay differs from the live state"
        assert not marked_servers(engine), "a llama-server was left running"


def marked_servers(engine: Engine) -> list[tuple[int, float, str]]:
    from engine.adapters.process import ProcessManager

    return ProcessManager().marked_processes(engine.journal_id + "/")


def crash_server(engine: Engine, within: float = 10.0) -> int:
    """SIGKILL the slot's ready server behind the engine's back; wait until the monitor has
    journaled the crash. Returns the dead pid."""
    pid = engine.status().pid
    assert pid is not None, "no server to crash"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + within
    while engine.status().state != "crashed" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.status().state == "crashed", f"the crash of pid {pid} was not noticed"
    return pid
