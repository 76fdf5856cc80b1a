"""`RealEffects`: the Effects protocol implemented with real processes, HTTP, NVML and files."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import psutil
from pydantic import SecretStr

from engine.adapters import process as proc
from engine.adapters.binary import ServerBinary, binary_identity, lists_architecture
from engine.adapters.capabilities import append_engine_record, probe_capabilities
from engine.adapters.gpu import NvmlProbe
from engine.adapters.health import HealthClient
from engine.adapters.hub import Hub
from engine.adapters.journal import Journal
from engine.adapters.local_models import resolve_local
from engine.adapters.memory import host_ram, measure_server, memory_budget
from engine.core import events as ev
from engine.core.admission import MemoryBudget
from engine.core.capabilities import ServerCapabilities
from engine.core.errors import StepFailed
from engine.core.events import BinaryIdentity, Inventory, LoadSpec, ResolvedModel, ServerProps
from engine.core.eviction import MemoryUse
from engine.core.retention import LogFile, expired_logs
from engine.core.scrub import scrub
from engine.core.state import ServerProcess
from engine.effects import CancelToken, DownloadListener, Exited, Health

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its terminating NUL


class RealEffects:
    def __init__(
        self,
        binary: ServerBinary,
        run_dir: Path,
        journal: Journal | None = None,
        *,
        child_env: Mapping[str, str] | None = None,
        server_api_key: bool = True,
        listen: Literal["tcp", "unix"] = "tcp",
        slot: str = "default",
        boot_time: Callable[[], float] = psutil.boot_time,  # a test steps the clock with it
    ) -> None:
        self.binary = str(binary.path)
        self.server = binary
        self.run_dir = run_dir
        private_dir(run_dir)  # logs, keys and templates of every server: 0700
        self.processes = proc.ProcessManager(binary.env, child_env=child_env, boot_time=boot_time)
        self._server_api_key = server_api_key
        self._listen = listen
        self._journal = journal
        self._slot = slot
        folder = re.sub(r"[^A-Za-z0-9_.-]", "_", slot)  # one folder of logs and keys per slot
        self._logs = run_dir / "logs" / folder
        self._key_dir = run_dir / "keys" / folder
        self._keys: dict[str, SecretStr] = {}  # load id -> its server's key (memory only)
        self._health = HealthClient()
        self._vram = NvmlProbe()
        self.hub = Hub(journal)  # the journal keeps the hub probe cache across restarts
        # Probed (or read from the journal's `@capabilities`) once, here: a bad binary fails open.
        self._capabilities = probe_capabilities(self.binary, {**os.environ, **binary.env}, journal)

    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)

    def capabilities(self) -> ServerCapabilities:
        return self._capabilities

    def resolve(
        self,
        spec: LoadSpec,
        cancel: CancelToken,
        *,
        hf_token: SecretStr | None = None,
        listener: DownloadListener | None = None,
    ) -> ResolvedModel:
        cancel.check()
        if spec.model.startswith("/"):
            return resolve_local(spec.model)
        return self.hub.resolve(spec, cancel, hf_token=hf_token, listener=listener)

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def log_path(self, load_id: str) -> str:
        private_dir(self.run_dir / "logs")
        return str(private_dir(self._logs) / f"{load_id}.log")

    def template_file(self, template: str) -> str:
        # Named by content hash, and written fresh every time: a file already there is never
        # trusted (someone may have swapped it between two loads).
        digest = hashlib.sha256(template.encode()).hexdigest()[:16]
        folder = private_dir(self.run_dir / "templates")
        return str(write_private(folder / f"{digest}.jinja", template))

    def api_key_file(self, load_id: str) -> str | None:
        if not self._server_api_key:
            return None
        key = secrets.token_urlsafe(32)
        private_dir(self.run_dir / "keys")
        path = write_private(private_dir(self._key_dir) / f"{load_id}.key", key + "\n")
        self._keys[load_id] = SecretStr(key)
        return str(path)

    def api_key(self, load_id: str) -> SecretStr | None:
        key = self._keys.get(load_id)
        if key is None and self._server_api_key:
            try:  # a server adopted after a restart: its key is in its 0600 file
                text = (self._key_dir / f"{load_id}.key").read_text().strip()
            except OSError:
                return None
            key = self._keys[load_id] = SecretStr(text)
        return key

    def owns_port(self, pid: int, port: int) -> bool:
        return proc.listens_on(pid, port)

    def spawn(
        self,
        argv: Sequence[str],
        marker: str,
        log_path: str,
        *,
        env: Mapping[str, str] | None = None,
    ) -> tuple[int, float]:
        try:
            return self.processes.spawn(argv, marker, log_path, env=env)
        except OSError as exc:
            raise StepFailed(f"cannot start {argv[0]}: {exc}") from exc

    def exit_status(self, process: ServerProcess) -> Exited | None:
        return self.processes.exit_status(process)

    def terminate(self, process: ServerProcess, grace: float) -> Exited | None:
        return self.processes.terminate(process, grace)

    def kill(self, process: ServerProcess, grace: float) -> Exited | None:
        return self.processes.kill(process, grace)

    def health(self, port: int, *, socket_path: str | None = None) -> Health:
        return self._health(port, socket_path)

    def socket_path(self, load_id: str) -> str | None:
        if self._listen != "unix":
            return None
        path = private_dir(self.run_dir / "sockets") / f"{load_id}.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise StepFailed(
                f"listen='unix': socket path {path} is longer than {MAX_SOCKET_PATH} bytes "
                "(the kernel's limit); open the engine with a shorter run_dir"
            )
        path.unlink(missing_ok=True)  # a stale socket of a dead server would refuse the bind
        return str(path)

    def log_tail(self, log_path: str) -> str:
        return scrub(proc.log_tail(log_path), [k.get_secret_value() for k in self._keys.values()])

    def retire_log(self, load_id: str, *, failed: bool, live: str | None) -> None:
        if failed and (self._logs / f"{load_id}.log").exists():
            (self._logs / f"{load_id}.failed").touch(mode=0o600)  # kept 7 days, not 50 loads
        logs = [
            LogFile(path.stem, path.stat().st_mtime, path.with_suffix(".failed").exists())
            for path in (self._logs.glob("*.log") if self._logs.is_dir() else ())
        ]
        expired = expired_logs(logs, time.time(), live=live)
        for expired_id in expired:
            for suffix in (".log", ".failed"):
                (self._logs / f"{expired_id}{suffix}").unlink(missing_ok=True)
        # A key outlives its server only as a liability: keep the live one's (adoption) alone.
        for key_file in self._key_dir.glob("*.key") if self._key_dir.is_dir() else ():
            if key_file.stem != live:
                key_file.unlink(missing_ok=True)
                self._keys.pop(key_file.stem, None)
        if expired and self._journal is not None:
            record = ev.LogsPruned(at=time.time(), slot=self._slot, load_ids=tuple(expired))
            append_engine_record(self._journal, ev.RUN_FILES_STREAM, record)

    def probe_vram(self) -> list[tuple[int, int]]:
        return self._vram()

    def has_gpu(self) -> bool:
        return self._vram.gpu_count() > 0

    def memory_budget(self, releasing: ServerProcess | None) -> MemoryBudget:
        return memory_budget(self._vram, releasing)

    def measure(self, process: ServerProcess) -> MemoryUse:
        return measure_server(self._vram, process)

    def identity(self, pid: int) -> tuple[str, int] | None:
        return self.processes.identity(pid)

    def marked_processes(self, journal_id: str) -> list[tuple[int, float, str]]:
        return self.processes.marked_processes(journal_id + "/")

    def inventory(self) -> Inventory:
        try:
            gpus = tuple(self._vram.inventory())
        except Exception:  # a failing driver counts as no GPU, as in memory_budget
            gpus = ()
        ram = host_ram()
        return Inventory(
            gpus=gpus,
            ram_total_bytes=ram.total,
            ram_available_bytes=ram.available,
            ram_source=ram.source,
        )

    def server_props(self, process: ServerProcess) -> ServerProps:
        return self._health.props(process.port, process.socket_path, self.api_key(process.load_id))

    def binary_identity(self) -> BinaryIdentity:
        return binary_identity(self.server)

    def lists_architecture(self, architecture: str) -> bool | None:
        return lists_architecture(self.server, architecture)

    def close(self) -> None:
        self._health.close()
        self._vram.close()


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (0700), created if need be."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically, mode 0600 from the first byte."""
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
