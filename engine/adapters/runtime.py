"""`RealEffects`: the Effects protocol implemented with real processes, HTTP, NVML and files."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import SecretStr

from engine.adapters import process as proc
from engine.adapters.binary import ServerBinary, binary_identity, lists_architecture
from engine.adapters.gpu import NvmlProbe
from engine.adapters.health import HealthClient
from engine.adapters.hub import Hub
from engine.adapters.journal import Journal
from engine.adapters.local_models import resolve_local
from engine.adapters.memory import host_ram, memory_budget
from engine.core.admission import MemoryBudget
from engine.core.capabilities import ServerCapabilities, parse_help
from engine.core.errors import StepFailed
from engine.core.events import BinaryIdentity, Inventory, LoadSpec, ResolvedModel, ServerProps
from engine.core.state import ServerProcess
from engine.effects import CancelToken, DownloadListener, Exited, Health


class RealEffects:
    def __init__(self, binary: ServerBinary, run_dir: Path, journal: Journal | None = None) -> None:
        self.binary = str(binary.path)
        self.server = binary
        self._capabilities: ServerCapabilities | None = None
        self._capabilities_lock = threading.Lock()
        self.run_dir = run_dir
        self.processes = proc.ProcessManager(binary.env)
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

    def marked_processes(self, journal_id: str) -> list[tuple[int, float, str]]:
        return self.processes.marked_processes(journal_id + "/")

    def capabilities(self) -> ServerCapabilities:
        # Minimal probe: `--help` parsed once per engine (issue-12's journaled probe replaces it).
        with self._capabilities_lock:
            if self._capabilities is None:
                try:
                    done = subprocess.run(
                        [self.binary, "--help"],
                        env={**os.environ, **self.server.env},
                        capture_output=True,
                        text=True,
                        timeout=30,
                        check=False,
                    )
                    text = done.stdout + done.stderr
                except (OSError, subprocess.TimeoutExpired):
                    text = ""  # no flags known: the planner emits none that need probing
                self._capabilities = parse_help(text)
            return self._capabilities

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

    def server_props(self, port: int) -> ServerProps:
        return self._health.props(port)

    def binary_identity(self) -> BinaryIdentity:
        return binary_identity(self.server)

    def lists_architecture(self, architecture: str) -> bool | None:
        return lists_architecture(self.server, architecture)

    def close(self) -> None:
        self._health.close()
        self._vram.close()
