"""Memory adapter (psutil + pynvml): what the host has free, and what a server would release.

Admission runs before the running server is killed, so the memory that server holds counts
as available: its private resident memory (RSS minus shared pages, which includes the
mmapped weights the page cache keeps anyway) and the VRAM NVML attributes to its pid.
"""

from __future__ import annotations

import contextlib

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
