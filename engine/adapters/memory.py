"""Memory adapter (psutil + pynvml): what the host has free, and what a server would release.

Admission runs before the running server is killed, so the memory that server holds counts
as available: its private resident memory (RSS minus shared pages, which includes the
mmapped weights the page cache keeps anyway) and the VRAM NVML attributes to its pid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.adapters.gpu import NvmlProbe
from engine.adapters.process import CREATE_TIME_SLACK
from engine.core.admission import MIB, MemoryBudget
from engine.core.eviction import MemoryUse
from engine.core.state import ServerProcess


def releasable_ram(process: ServerProcess | None) -> int:
    if process is None or not process.pid:
        return 0
    try:
        live = psutil.Process(process.pid)
        if abs(live.create_time() - process.create_time) > CREATE_TIME_SLACK:
            return 0  # the pid was reused: that memory is not ours to count
        info = live.memory_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
    return max(int(info.rss) - int(getattr(info, "shared", 0)), 0)


def memory_budget(vram: NvmlProbe, process: ServerProcess | None) -> MemoryBudget:
    free_vram = 0
    with contextlib.suppress(Exception):  # a failing driver counts as no GPU: RAM only
        free_vram = sum(free for _, free in vram()) * MIB
    released_vram = vram.used_by(process.pid) if process is not None and process.pid else 0
    return MemoryBudget(
        free_vram_bytes=free_vram,
        available_ram_bytes=int(psutil.virtual_memory().available),
        releasable_bytes=releasable_ram(process) + released_vram,
    )


def measure_server(vram: NvmlProbe, process: ServerProcess) -> MemoryUse:
    """What a server of ours uses now: its whole RSS (mmapped weights included: they are
    what a second server would be short of) + the VRAM NVML attributes to its pid on every
    visible GPU. Zeros when the pid is gone or belongs to another process now."""
    try:
        live = psutil.Process(process.pid)
        if abs(live.create_time() - process.create_time) > CREATE_TIME_SLACK:
            return MemoryUse(0, 0)
        rss = int(live.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return MemoryUse(0, 0)
    by_gpu: list[tuple[int, int]] = []
    with contextlib.suppress(Exception):  # no driver: a CPU-only server
        by_gpu = vram.used_by_gpu(process.pid)
    return MemoryUse(rss, sum(used for _, used in by_gpu), tuple(by_gpu))


# --- host RAM for the launch planner (cgroup-aware) -------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge page-rounded number


@dataclass(frozen=True, slots=True)
class HostRam:
    total: int  # the tightest limit that applies to us
    available: int
    source: str  # "host", "cgroup v2" or "cgroup v1"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _own_cgroup(proc_cgroup: Path, controller: str | None) -> str:
    """Our cgroup's path: the v2 line ("0::/x") or the v1 line naming `controller`."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (
            controller is not None and controller in controllers.split(",")
        ):
            return path or "/"
    return "/"


def cgroup_memory(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> tuple[int, int, str] | None:
    """(limit, usage, version) of the tightest memory limit on our cgroup and its ancestors;
    None when no limit applies. Reclaimable page cache (inactive_file) is not usage."""
    if (root / "cgroup.controllers").exists():  # v2: one unified hierarchy
        limit_file, usage_file, stat_key, version = (
            "memory.max",
            "memory.current",
            "inactive_file",
            "cgroup v2",
        )
        base = root
        own = _own_cgroup(proc_cgroup, None)
    else:
        limit_file, usage_file, stat_key, version = (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
            "cgroup v1",
        )
        base = root / "memory"
        own = _own_cgroup(proc_cgroup, "memory")
    folder = base / own.lstrip("/")
    if not folder.is_dir():  # a cgroup namespace: our cgroup is the mounted root itself
        folder = base
    tightest: tuple[int, int] | None = None
    while True:
        limit = _read_int(folder / limit_file)
        if limit is not None and limit < _UNLIMITED:
            usage = _read_int(folder / usage_file) or 0
            usage = max(usage - _stat_value(folder / "memory.stat", stat_key), 0)
            if tightest is None or limit - usage < tightest[0] - tightest[1]:
                tightest = (limit, usage)
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    return (tightest[0], tightest[1], version) if tightest is not None else None


def host_ram(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> HostRam:
    """Host RAM for planning: psutil's, capped by a cgroup limit when one is tighter."""
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    limited = cgroup_memory(root, proc_cgroup)
    if limited is None:
        return HostRam(total, available, "host")
    limit, usage, version = limited
    if limit >= total:
        return HostRam(total, available, "host")
    return HostRam(limit, max(min(available, limit - usage), 0), version)
