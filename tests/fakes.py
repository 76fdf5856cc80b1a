"""An in-memory Effects layer: processes, health and VRAM without any real process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from engine.core.admission import MemoryBudget
from engine.core.errors import StepFailed
from engine.core.events import LoadSpec, ResolvedModel
from engine.core.state import ServerProcess
from engine.effects import CancelToken, DownloadListener, Exited, Health


class FakeEffects:
    """Model files whose name contains `broken` fail to resolve; `crashy` servers exit
    before they are healthy; everything else becomes healthy on the first poll."""

    binary = "/opt/fake/llama-server"

    def __init__(self) -> None:
        self.clock = 1_800_000_000.0
        self.alive: dict[int, bool] = {}
        self.crashy: set[int] = set()
        self.crashy_ports: set[int] = set()
        self.spawned: list[tuple[str, ...]] = []
        self.next_pid = 1000
        self.next_port = 20000
        self.max_alive = 0
        self.available_ram = 64 << 30
        self.gpus: list[tuple[int, int]] = []  # (index, free MiB); empty = CPU-only host

    def now(self) -> float:
        self.clock += 0.001
        return self.clock

    def monotonic(self) -> float:
        return self.now()

    def resolve(
        self,
        spec: LoadSpec,
        cancel: CancelToken,
        *,
        hf_token: SecretStr | None = None,
        listener: DownloadListener | None = None,
    ) -> ResolvedModel:
        cancel.check()
        if "broken" in spec.model:
            raise StepFailed(f"{spec.model} is not a readable GGUF file")
        return ResolvedModel(source=f"file:{spec.model}", model_file=spec.model)

    def free_port(self) -> int:
        self.next_port += 1
        return self.next_port

    def log_path(self, load_id: str) -> str:
        return f"/fake/logs/{load_id}.log"

    def template_file(self, template: str) -> str:
        return "/fake/template.jinja"

    def spawn(self, argv: Sequence[str], marker: str, log_path: str) -> tuple[int, float]:
        self.next_pid += 1
        pid = self.next_pid
        self.alive[pid] = True
        if "crashy" in Path(argv[argv.index("-m") + 1]).name:
            self.crashy.add(pid)
            self.crashy_ports.add(int(argv[argv.index("--port") + 1]))
        self.spawned.append(tuple(argv))
        self.max_alive = max(self.max_alive, sum(self.alive.values()))
        return pid, float(pid)

    def exit_status(self, process: ServerProcess) -> Exited | None:
        if process.pid in self.crashy:
            self.alive[process.pid] = False
        return (
            None if self.alive.get(process.pid) else Exited(1 if process.pid in self.crashy else 0)
        )

    def terminate(self, process: ServerProcess, grace: float) -> Exited | None:
        self.alive[process.pid] = False
        return Exited(0)

    def kill(self, process: ServerProcess, grace: float) -> Exited | None:
        return self.terminate(process, grace)

    def health(self, port: int) -> Health:
        return "down" if port in self.crashy_ports else "ok"

    def log_tail(self, log_path: str) -> str:
        return "error: fake server failed to load"

    def probe_vram(self) -> list[tuple[int, int]]:
        return list(self.gpus)

    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def memory_budget(self, releasing: ServerProcess | None) -> MemoryBudget:
        return MemoryBudget(free_vram_bytes=0, available_ram_bytes=self.available_ram)

    def identity(self, pid: int) -> tuple[str, int] | None:
        return None  # no /proc here: create_time is the identity

    def marked_processes(self, journal_id: str) -> list[tuple[int, float, str]]:
        return []

    def die(self, pid: int) -> None:
        """The server exits on its own (OOM killer, segfault)."""
        self.alive[pid] = False
