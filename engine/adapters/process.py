"""llama-server processes: spawn with a marker, identify by (pid, start), kill the tree.

* The server gets its own session (`start_new_session`) and writes straight to a log file, so
  it survives the backend's death and recovery can adopt it — no pipe drained by a thread.
* Identity: on Linux (boot id, start time in clock ticks since boot, /proc/<pid>/stat field
  22), which no wall-clock step (NTP, VM resume) can move; psutil's create_time elsewhere
  (and for journals written before). A reused pid is never signalled.
* An environment marker (journal id, slot, load id) tells our servers from a user's own.
* A kill reaches the whole tree: the process group when the server leads one (ours always
  do), else the process and its descendants (a wrapper script's server, an adopted child);
  ESRCH at any point means "already gone". Exits are awaited with a blocking wait on a pidfd
  (no poll loop), so an unload costs what the server takes to exit and no more.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
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
CREATE_TIME_SLACK = 0.01  # psutil rounds create_time differently across calls on some kernels


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@cache
def boot_id() -> str:
    """This boot of this host (Linux: the kernel's random boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as source:
            return source.read().strip()
    except OSError:  # not Linux: the boot time identifies the boot just as well
        return f"boot-{psutil.boot_time():.0f}"


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None when
    there is no such process or no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as source:
            data = source.read()
    except OSError:
        return None
    # Field 2 (the command name) may hold spaces and parentheses: count after the last ")".
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])  # fields[0] is field 3


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
        self,
        env: Mapping[str, str] | None = None,
        *,
        child_env: Mapping[str, str] | None = None,
        boot_time: Callable[[], float] = psutil.boot_time,
    ) -> None:
        # What the binary needs (library path) and what the operator added (`child_env`).
        self._env = {**(child_env or {}), **(env or {})}
        # The wall-clock time of boot, as the kernel derives it now: it moves when the clock
        # steps. Injectable so a test can step it; identity never depends on it.
        self._boot_time = boot_time
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._descendants: dict[int, list[psutil.Process]] = {}  # signalled one by one
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
            create_time = self.create_time(child.pid)
        except psutil.NoSuchProcess:  # died instantly; still a process we must account for
            create_time = 0.0
        return child.pid, create_time

    def create_time(self, pid: int) -> float:
        """Wall-clock start time, for people and for journals without ticks."""
        ticks = start_ticks(pid)
        if ticks is None:
            return float(psutil.Process(pid).create_time())
        return self._boot_time() + ticks / CLOCK_TICKS_PER_S

    def identity(self, pid: int) -> tuple[str, int] | None:
        """(boot id, start ticks) of a live pid on Linux, else None."""
        ticks = start_ticks(pid)
        return None if ticks is None else (boot_id(), ticks)

    def is_same(self, process: ServerProcess) -> bool:
        """Whether `process.pid` still is the process the journal recorded."""
        if process.start_ticks is not None and process.boot_id is not None:
            return process.boot_id == boot_id() and start_ticks(process.pid) == process.start_ticks
        try:
            return abs(self.create_time(process.pid) - process.create_time) <= CREATE_TIME_SLACK
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False

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
        if not self.is_same(process):
            return Exited(None)  # gone, or the pid now belongs to someone else
        try:
            if psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE:
                return Exited(None)
        except psutil.NoSuchProcess:
            return Exited(None)
        return None

    def _signal_tree(self, process: ServerProcess, sig: signal.Signals) -> None:
        if self.exit_status(process) is not None:
            return
        pid = process.pid
        try:
            if os.getpgid(pid) == pid:
                # start_new_session made our server its group leader: one signal reaches
                # every process it started, even those that outlived a child in between.
                os.killpg(pid, sig)
                return
        except ProcessLookupError:
            return  # gone between the check and the signal
        except PermissionError:
            pass
        # Not a group leader (a wrapper script's server, a server adopted from another
        # group): the process and its descendants, each ESRCH meaning "already gone".
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        with self._lock:
            self._descendants[pid] = tree[1:]
        for victim in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(sig)

    def _wait(self, process: ServerProcess, grace: float) -> Exited | None:
        """Block until the process exits or `grace` passes (pidfd: woken by the exit itself)."""
        deadline = time.monotonic() + grace
        status = self.exit_status(process)
        if status is None:
            _block_until_exit(process.pid, grace)
            status = self.exit_status(process)
        with self._lock:
            descendants = self._descendants.pop(process.pid, [])
        if status is not None and descendants:
            psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
        return status

    def terminate(self, process: ServerProcess, grace: float) -> Exited | None:
        self._signal_tree(process, signal.SIGTERM)
        return self._wait(process, grace)

    def kill(self, process: ServerProcess, grace: float) -> Exited | None:
        self._signal_tree(process, signal.SIGKILL)
        return self._wait(process, grace)

    def marked_processes(self, prefix: str) -> list[tuple[int, float, str]]:
        """(pid, create_time, marker) of every live process whose marker starts with `prefix`."""
        if os.path.isdir("/proc/self"):
            return _scan_proc(prefix, self.create_time)
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
    """Whether `pid`, or a process it started (a wrapper script's server), holds the socket
    listening on TCP `port`: a process tree we spawned, never another user's."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    for process in tree:
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections
        ):
            return True
    return False


def _scan_proc(prefix: str, create_time: Callable[[int], float]) -> list[tuple[int, float, str]]:
    """`marked_processes` on Linux: read each /proc/<pid>/environ directly and ask psutil only
    about the matches (psutil per process costs ~100x more, and open scans every process)."""
    needle = f"{MARKER_ENV}={prefix}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as source:
                environ = source.read()
        except OSError:  # gone, a kernel thread, or someone else's
            continue
        start = environ.find(needle)
        if start < 0 or (start and environ[start - 1] != 0):
            continue
        end = environ.find(b"\0", start)
        marker = environ[start + len(MARKER_ENV) + 1 : end if end >= 0 else None].decode()
        try:
            proc = psutil.Process(int(name))
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append((proc.pid, create_time(proc.pid), marker))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _block_until_exit(pid: int, timeout: float) -> None:
    """Return when `pid` has exited (it is a zombie or gone) or after `timeout` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    except (AttributeError, OSError):  # not Linux >= 5.3: psutil's wait (it backs off)
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            psutil.Process(pid).wait(timeout)
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has terminated
        poller.poll(max(0, int(timeout * 1000)))
    finally:
        os.close(pidfd)


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
