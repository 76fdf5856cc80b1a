"""An in-memory Effects layer: processes, health and VRAM without any real process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import SecretStr

from engine.core.admission import MemoryBudget
from engine.core.capabilities import ServerCapabilities, parse_help
from engine.core.errors import StepFailed
from engine.core.events import (
    BinaryIdentity,
    GpuInfo,
    Inventory,
    LoadSpec,
    ResolvedModel,
    ServerProps,
)
from engine.core.eviction import MemoryUse
from engine.core.state import ServerProcess
from engine.effects import CancelToken, DownloadListener, Exited, Health

HELP_FIXTURE = Path(__file__).parent / "fixtures" / "llama-server-help.txt"
_CAPABILITIES: list[ServerCapabilities] = []


def fixture_capabilities() -> ServerCapabilities:
    """The flags of the real llama-server this project builds (its saved `--help`)."""
    if not _CAPABILITIES:
        _CAPABILITIES.append(parse_help(HELP_FIXTURE.read_text()))
    return _CAPABILITIES[0]


class FakeEffects:
    """Model files whose name contains `broken` fail to resolve; `crashy` servers exit
    before they are healthy; `mmproj` files are projectors, `embed` files embedding models;
    everything else becomes healthy on the first poll."""

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
        self.server_rss = 100 << 20
        self.rss: dict[int, int] = {}
        self.keys: dict[str, str] = {}
        self.retired: list[tuple[str, bool, str | None]] = []
        self.foreign_ports: set[int] = set()  # another user's listener answers /health there
        self.gpu_total_mib = 24_576
        self.help_text: str | None = None  # None: the real binary's flags (the fixture)
        self.binary_id = BinaryIdentity(path=self.binary, size_bytes=1, mtime_ns=1, version="1")
        self.known_architectures: set[str] | None = None  # None: cannot tell
        self.spawn_env: list[Mapping[str, str] | None] = []
        self.model_facts: dict[str, dict[str, object]] = {}  # file -> ResolvedModel fields

    def now(self) -> float:
        self.clock += 0.001
        return self.clock

    def monotonic(self) -> float:
        return self.now()

    def capabilities(self) -> ServerCapabilities:
        return parse_help(self.help_text) if self.help_text is not None else fixture_capabilities()

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
        facts: dict[str, object] = {"native_ctx": 8192, "architecture": "llama"}
        if "mmproj" in Path(spec.model).name:
            facts.update(architecture="clip", kind="projector")
        if "embed" in Path(spec.model).name:
            facts.update(kind="embedding")
        facts.update(self.model_facts.get(spec.model, {}))
        return ResolvedModel(
            source=f"file:{spec.model}",
            model_file=spec.model,
            **facts,  # type: ignore[arg-type]
        )

    def free_port(self) -> int:
        self.next_port += 1
        return self.next_port

    def log_path(self, load_id: str) -> str:
        return f"/fake/logs/{load_id}.log"

    def template_file(self, template: str) -> str:
        return "/fake/template.jinja"

    def api_key_file(self, load_id: str) -> str | None:
        self.keys[load_id] = f"key-{load_id}"
        return f"/fake/keys/{load_id}.key"

    def api_key(self, load_id: str) -> SecretStr | None:
        key = self.keys.get(load_id)
        return SecretStr(key) if key is not None else None

    def owns_port(self, pid: int, port: int) -> bool:
        return port not in self.foreign_ports

    def spawn(
        self,
        argv: Sequence[str],
        marker: str,
        log_path: str,
        *,
        env: Mapping[str, str] | None = None,
    ) -> tuple[int, float]:
        self.spawn_env.append(env)
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

    def socket_path(self, load_id: str) -> str | None:
        return None

    def health(self, port: int, *, socket_path: str | None = None) -> Health:
        return "down" if port in self.crashy_ports else "ok"

    def retire_log(self, load_id: str, *, failed: bool, live: str | None) -> None:
        self.retired.append((load_id, failed, live))

    def log_tail(self, log_path: str) -> str:
        return "error: fake server failed to load"

    def probe_vram(self) -> list[tuple[int, int]]:
        return list(self.gpus)

    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def memory_budget(self, releasing: ServerProcess | None) -> MemoryBudget:
        return MemoryBudget(free_vram_bytes=0, available_ram_bytes=self.available_ram)

    def measure(self, process: ServerProcess) -> MemoryUse:
        """Each live server uses `server_rss` (per pid in `rss`, when set)."""
        if not self.alive.get(process.pid):
            return MemoryUse(0, 0)
        return MemoryUse(self.rss.get(process.pid, self.server_rss), 0)

    def identity(self, pid: int) -> tuple[str, int] | None:
        return None  # no /proc here: create_time is the identity

    def marked_processes(self, journal_id: str) -> list[tuple[int, float, str]]:
        return []

    def inventory(self) -> Inventory:
        mib = 1024 * 1024
        return Inventory(
            gpus=tuple(
                GpuInfo(
                    index=i,
                    uuid=f"GPU-{i}",
                    total_bytes=self.gpu_total_mib * mib,
                    free_bytes=free * mib,
                )
                for i, free in self.gpus
            ),
            ram_total_bytes=self.available_ram,
            ram_available_bytes=self.available_ram,
        )

    def server_props(self, process: ServerProcess) -> ServerProps:
        """What a real server reports: the -c and --parallel it was started with."""
        port = process.port
        argv = next(a for a in reversed(self.spawned) if a[a.index("--port") + 1] == str(port))

        def value(*names: str) -> int | None:
            found = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] in names]
            return int(found[-1]) if found else None

        return ServerProps(
            n_ctx=value("-c", "--ctx-size") or 8192,
            total_slots=value("--parallel"),
            model_alias=argv[argv.index("-m") + 1],
            build_info="fake",
        )

    def binary_identity(self) -> BinaryIdentity:
        return self.binary_id

    def lists_architecture(self, architecture: str) -> bool | None:
        if self.known_architectures is None:
            return None
        return architecture in self.known_architectures

    def die(self, pid: int) -> None:
        """The server exits on its own (OOM killer, segfault)."""
        self.alive[pid] = False


# The lines of `llama-server --help` the planner asks about (the real text has ~250 flags).
