"""The boundary between the orchestrator and the world: what an effect may do, and how it ends.

`RealEffects` (engine.adapters.runtime) implements it with processes, HTTP and NVML; the test suite
implements it in memory. The orchestrator never touches the world except through it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import SecretStr

from engine.core.admission import MemoryBudget
from engine.core.capabilities import ServerCapabilities
from engine.core.events import BinaryIdentity, Inventory, LoadSpec, ResolvedModel, ServerProps
from engine.core.eviction import MemoryUse
from engine.core.state import ServerProcess


class Cancelled(Exception):
    """A load saw its cancel token at a checkpoint."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class CancelToken:
    """One per load: each load captures its own, so a cancel can never be rebound or lost."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once on cancel (then raising Cancelled)."""
        if self._event.wait(max(seconds, 0.0)):
            raise Cancelled(self.reason)


@dataclass(frozen=True, slots=True)
class Exited:
    returncode: int | None  # None when the process was not our child


Health = Literal["ok", "loading", "down"]
VramProbe = Callable[[], list[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class FileProgress:
    path: str
    done: int  # bytes
    total: int


@dataclass(frozen=True, slots=True)
class DownloadProgress:
    """What `Engine.progress()` returns while a load downloads its model."""

    load_id: str
    repo_id: str
    files: tuple[FileProgress, ...]

    @property
    def done(self) -> int:
        return sum(f.done for f in self.files)

    @property
    def total(self) -> int:
        return sum(f.total for f in self.files)


LoadPhase = Literal["downloading", "starting", "loading", "ready"]


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """What `Engine.progress()` returns for the load in flight (or the one just served).

    `fraction` covers the whole load and never goes backwards: the download (half of it when
    the load downloads), then the weights mapped while `loading` (the server's RSS + VRAM
    high-water against the model's bytes, at most 0.99 until healthy), 1.0 once `ready`.
    """

    load_id: str
    phase: LoadPhase
    bytes_done: int  # downloaded while downloading, else mapped (memory high-water)
    bytes_total: int
    fraction: float
    download: DownloadProgress | None = None  # per file, for a load that downloads


class DownloadListener(Protocol):
    """Told about a download as it goes. `started` and `finished` are journaled (coarse grain);
    `advanced` is called per chunk and must stay cheap (memory only)."""

    def started(self, repo_id: str, revision: str, files: Sequence[tuple[str, int]]) -> None: ...

    def advanced(self, path: str, done: int, total: int) -> None: ...

    def finished(self, path: str, size: int, seconds: float) -> None: ...


class Effects(Protocol):
    binary: str

    def now(self) -> float: ...  # wall clock, seconds since the epoch

    def capabilities(self) -> ServerCapabilities:
        """What the binary accepts, from its own `--help` (probed once per binary identity)."""
        ...

    def monotonic(self) -> float: ...

    def resolve(
        self,
        spec: LoadSpec,
        cancel: CancelToken,
        *,
        hf_token: SecretStr | None = None,
        listener: DownloadListener | None = None,
    ) -> ResolvedModel:
        """Find the model (local file or hub repo; downloads are reported to `listener`).

        `hf_token` is the request's own token: it lives in memory for the load and is never
        journaled (the spec carries its fingerprint only).
        """
        ...

    def free_port(self) -> int: ...

    def log_path(self, load_id: str) -> str: ...

    def template_file(self, template: str) -> str: ...

    def api_key_file(self, load_id: str) -> str | None:
        """A fresh random API key for this load's server, written to a 0600 file whose path
        goes in argv (the key never does); None when the engine runs servers without a key."""
        ...

    def api_key(self, load_id: str) -> SecretStr | None:
        """The key of `load_id`'s server (memory; after a restart, its 0600 file)."""
        ...

    def spawn(
        self,
        argv: Sequence[str],
        marker: str,
        log_path: str,
        *,
        env: Mapping[str, str] | None = None,
    ) -> tuple[int, float]:
        """Start the server; `env` is added to the child's environment (GPU pinning)."""
        ...

    def owns_port(self, pid: int, port: int) -> bool:
        """Whether the socket listening on `port` belongs to `pid` (not to another user's)."""
        ...

    def exit_status(self, process: ServerProcess) -> Exited | None:
        """None while the process (same pid *and* identity: start ticks, else create_time) is
        alive."""
        ...

    def terminate(self, process: ServerProcess, grace: float) -> Exited | None: ...

    def kill(self, process: ServerProcess, grace: float) -> Exited | None: ...

    def health(self, port: int, *, socket_path: str | None = None) -> Health:
        """GET /health on 127.0.0.1:`port`, or over the Unix socket `socket_path` when set."""
        ...

    def socket_path(self, load_id: str) -> str | None:
        """Where `load_id`'s server listens when the engine runs servers on Unix sockets
        (`Engine.open(listen="unix")`, in the 0700 run folder); None for TCP."""
        ...

    def log_tail(self, log_path: str) -> str: ...

    def retire_log(self, load_id: str, *, failed: bool, live: str | None) -> None:
        """A load ended: keep its log (7 days more if it `failed`), delete logs past retention
        and the key files of servers no longer live (journaled); `live` is the running one."""
        ...

    def probe_vram(self) -> list[tuple[int, int]]: ...

    def has_gpu(self) -> bool:
        """False on a CPU-only host (no driver, no visible GPU): settling needs no probe."""
        ...

    def memory_budget(self, releasing: ServerProcess | None) -> MemoryBudget:
        """Free VRAM + available RAM now, plus what killing `releasing` gives back."""
        ...

    def measure(self, process: ServerProcess) -> MemoryUse:
        """What the server uses now: resident memory + the VRAM NVML attributes to its pid
        (zeros once it is gone)."""
        ...

    def identity(self, pid: int) -> tuple[str, int] | None:
        """(boot id, start time in clock ticks since boot) of a live pid; None where the
        platform has no such thing (then create_time is the identity)."""
        ...

    def marked_processes(self, journal_id: str) -> list[tuple[int, float, str]]:
        """(pid, create_time, marker) of live processes carrying this journal's marker."""
        ...

    # --- launch planning ---------------------------------------------------------------------

    def inventory(self) -> Inventory:
        """GPUs (index, uuid, total, free) and host RAM (cgroup-aware) right now."""
        ...

    def server_props(self, process: ServerProcess) -> ServerProps:
        """`GET /props` of a healthy server; an unreadable answer is reported in `error`."""
        ...

    def binary_identity(self) -> BinaryIdentity:
        """The llama-server a spawn would run now: path, size, mtime and version."""
        ...

    def lists_architecture(self, architecture: str) -> bool | None:
        """Whether this llama-server build knows `architecture` (None: cannot tell)."""
        ...
