"""llama-server processes: spawn with a marker, identify by (pid, create_time), kill the group.

* The server gets its own session (`start_new_session`) and writes straight to a log file, so
  it survives the backend's death and recovery can adopt it — no pipe drained by a thread.
* Identity is (pid, create_time): a reused pid is never signalled.
* An environment marker (journal id, slot, load id) tells our servers from a user's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from engine.core.state import ServerProcess
from engine.effects import Exited

MARKER_ENV = "STUDIO_ENGINE_MARKER"
# What a llama-server inherits from the engine's environment; everything else (HF_TOKEN, cloud
# keys, database URLs ...) is dropped. `Engine.open(child_env=...)` adds more, explicitly.
CHILD_ENV_NAMES = frozenset({"PATH", "HOME", "TMPDIR", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH"})
CHILD_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "HSA_", "GGML_", "OMP_")
TAIL_LINES = 50
_POLL_S = 0.02
CREATE_TIME_SLACK = 0.01  # psutil rounds create_time differently across calls on some kernels


def make_marker(journal_id: str, slot: str, load_id: str) -> str:
    return f"{journal_id}/{slot}/{load_id}"


def same_identity(proc: psutil.Process, create_time: float) -> bool:
    try:
        return abs(proc.create_time() - create_time) <= CREATE_TIME_SLACK
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def child_environment(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed part of `environ`, then `extra` (the engine's own additions) on top."""
    kept = {
        name: value
        for name, value in environ.items()
        if name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)
    }
    return {**kept, **extra}


class ProcessManager:
    def __init__(
        self, env: Mapping[str, str] | None = None, *, child_env: Mapping[str, str] | None = None
    ) -> None:
        # What the binary needs (library path) and what the operator added (`child_env`).
        self._env = {**(child_env or {}), **(env or {})}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def spawn(
        self,
        argv: Sequence[str],
        marker: str,
        log_path: str,
        *,
        env: Mapping[str, str] | None = None,
    ) -> tuple[int, float]:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=child_environment(os.environ, {**self._env, **(env or {}), MARKER_ENV: marker}),
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(log_fd)  # the child has its own copy
        with self._lock:
            self._children[child.pid] = child
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:  # died instantly; still a process we must account for
            create_time = 0.0
        return child.pid, create_time

    def exit_status(self, process: ServerProcess) -> Exited | None:
        with self._lock:
            child = self._children.get(process.pid)
        if child is not None:
            returncode = child.poll()  # also reaps the zombie
            if returncode is None:
                return None
            with self._lock:
                self._children.pop(process.pid, None)
            return Exited(returncode)
        try:
            proc = psutil.Process(process.pid)
            if not same_identity(proc, process.create_time):
                return Exited(None)  # the pid now belongs to someone else
            if proc.status() == psutil.STATUS_ZOMBIE:
                return Exited(None)
        except psutil.NoSuchProcess:
            return Exited(None)
        return None

    def _signal_group(self, process: ServerProcess, sig: signal.Signals) -> None:
        if self.exit_status(process) is not None:
            return
        try:
            # start_new_session made the server its group leader: reach its children too.
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(process.pid, sig)

    def _wait(self, process: ServerProcess, grace: float) -> Exited | None:
        deadline = time.monotonic() + grace
        while True:
            status = self.exit_status(process)
            if status is not None or time.monotonic() >= deadline:
                return status
            time.sleep(_POLL_S)

    def terminate(self, process: ServerProcess, grace: float) -> Exited | None:
        self._signal_group(process, signal.SIGTERM)
        return self._wait(process, grace)

    def kill(self, process: ServerProcess, grace: float) -> Exited | None:
        self._signal_group(process, signal.SIGKILL)
        return self._wait(process, grace)

    def marked_processes(self, prefix: str) -> list[tuple[int, float, str]]:
        """(pid, create_time, marker) of every live process whose marker starts with `prefix`."""
        found = []
        for proc in psutil.process_iter(["pid", "create_time"]):
            try:
                marker = proc.environ().get(MARKER_ENV)
                if marker is None or not marker.startswith(prefix):
                    continue
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                found.append((proc.info["pid"], proc.info["create_time"], marker))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found


def listens_on(pid: int, port: int) -> bool:
    """Whether `pid` itself holds the socket listening on TCP `port`."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections
    )


def log_tail(log_path: str, lines: int = TAIL_LINES, max_bytes: int = 16384) -> str:
    try:
        with open(log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - max_bytes))
            data = log.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
