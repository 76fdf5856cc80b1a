"""`RealEffects`: the Effects protocol implemented with real processes, HTTP, NVML and files."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
from pydantic import SecretStr

from engine.adapters import process as proc
from engine.adapters.binary import ServerBinary
from engine.adapters.gpu import NvmlProbe
from engine.adapters.health import HealthClient
from engine.adapters.hub import Hub
from engine.adapters.journal import Journal
from engine.adapters.local_models import resolve_local
from engine.adapters.memory import memory_budget
from engine.core.admission import MemoryBudget
from engine.core.errors import StepFailed
from engine.core.events import LoadSpec, ResolvedModel
from engine.core.state import ServerProcess
from engine.effects import CancelToken, DownloadListener, Exited, Health


class RealEffects:
    def __init__(
        self,
        binary: ServerBinary,
        run_dir: Path,
        journal: Journal | None = None,
        *,
        boot_time: Callable[[], float] = psutil.boot_time,  # a test steps the clock with it
    ) -> None:
        self.binary = str(binary.path)
        self.run_dir = run_dir
        self.processes = proc.ProcessManager(binary.env, boot_time=boot_time)
        self._health = HealthClient()
        self._vram = NvmlProbe()
        self.hub = Hub(journal)  # the journal keeps the hub probe cache across restarts

    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)

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
        return str(self.run_dir / "logs" / f"{load_id}.log")

    def template_file(self, template: str) -> str:
        digest = hashlib.sha256(template.encode()).hexdigest()[:16]
        path = self.run_dir / "templates" / f"{digest}.jinja"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".{os.getpid()}.tmp")
            staging.write_text(template)
            staging.replace(path)
        return str(path)

    def spawn(self, argv: Sequence[str], marker: str, log_path: str) -> tuple[int, float]:
        try:
            return self.processes.spawn(argv, marker, log_path)
        except OSError as exc:
            raise StepFailed(f"cannot start {argv[0]}: {exc}") from exc

    def exit_status(self, process: ServerProcess) -> Exited | None:
        return self.processes.exit_status(process)

    def terminate(self, process: ServerProcess, grace: float) -> Exited | None:
        return self.processes.terminate(process, grace)

    def kill(self, process: ServerProcess, grace: float) -> Exited | None:
        return self.processes.kill(process, grace)

    def health(self, port: int) -> Health:
        return self._health(port)

    def log_tail(self, log_path: str) -> str:
        return proc.log_tail(log_path)

    def probe_vram(self) -> list[tuple[int, int]]:
        return self._vram()

    def has_gpu(self) -> bool:
        return self._vram.gpu_count() > 0

    def memory_budget(self, releasing: ServerProcess | None) -> MemoryBudget:
        return memory_budget(self._vram, releasing)

    def identity(self, pid: int) -> tuple[str, int] | None:
        return self.processes.identity(pid)

    def marked_processes(self, journal_id: str) -> list[tuple[int, float, str]]:
        return self.processes.marked_processes(journal_id + "/")

    def close(self) -> None:
        self._health.close()
        self._vram.close()
