"""GPU memory: wait for the driver to release a killed server's VRAM, and probe it with NVML.

The NVIDIA driver frees a dead process's memory asynchronously (tens to hundreds of ms).
Sizing the next load from a sample taken in that window offloads layers to the CPU for
nothing, so before spawning we wait until two consecutive samples agree — but never longer
than `max_wait`, probe time included, and not at all when there is nothing to wait for.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.core.events import GpuInfo, SettleKind

Sample = list[tuple[int, int]]  # (gpu index, free MiB)
Probe = Callable[[], Sample]

SETTLE_WINDOW_S = 15.0
MAX_WAIT_S = 2.0
INTERVAL_S = 0.25
MIN_TOLERANCE_MIB = 256
TOLERANCE_FRACTION = 0.02


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    kind: SettleKind
    waited_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)


class _ProbeTimeout(Exception):
    pass


def _probe_within(probe: Probe, timeout: float) -> Sample:
    """Run `probe` in a daemon thread so a wedged driver call cannot outlast `timeout`."""
    if timeout <= 0:
        raise _ProbeTimeout
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["sample"] = probe()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=run, name="vram-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _ProbeTimeout
    if "error" in box:
        raise box["error"]
    return sorted(box["sample"])


def agree(a: Sample, b: Sample) -> bool:
    """Every GPU within max(256 MiB, 2 % of the larger sample)."""
    return all(
        abs(free_a - free_b) <= max(MIN_TOLERANCE_MIB, TOLERANCE_FRACTION * max(free_a, free_b))
        for (_, free_a), (_, free_b) in zip(a, b, strict=True)
    )


def wait_for_settle(
    probe: Probe,
    since_kill: float,
    *,
    max_wait: float = MAX_WAIT_S,
    interval: float = INTERVAL_S,
    settle_window: float = SETTLE_WINDOW_S,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    gpus_present: bool | None = None,
) -> SettleOutcome:
    """Wait until GPU free memory is stable after a kill at monotonic time `since_kill` (0 = never).

    Zero probes on a cold start or a kill older than `settle_window`. Returns at once when the
    first probe finds no GPU, when a probe raises, or when the set of GPUs changes. The whole
    wait, probe time included, is bounded by `max_wait`. `gpus_present=False` (the caller
    already knows the host has none, e.g. `NvmlProbe.gpu_count()`) costs no probe either.
    """
    if not since_kill:
        return SettleOutcome("cold")
    # Looked up per call (not bound as defaults) so a frozen clock in tests applies.
    now: Callable[[], float] = clock or time.monotonic
    pause: Callable[[float], None] = sleep or time.sleep
    start = now()
    if start - since_kill > settle_window:
        return SettleOutcome("stale")
    if gpus_present is False:
        return SettleOutcome("cpu-only")
    deadline = start + max_wait
    samples: list[Sample] = []

    def take() -> Sample:
        sample = _probe_within(probe, deadline - now())
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)
        return sample

    def done(kind: SettleKind) -> SettleOutcome:
        return SettleOutcome(kind, now() - start, samples)

    try:
        previous = take()
    except _ProbeTimeout:
        return done("timeout")
    except Exception:
        return done("probe-error")
    if not previous:
        return done("cpu-only")
    while True:
        remaining = deadline - now()
        if remaining <= 0:
            return done("timeout")
        pause(min(interval, remaining))
        try:
            current = take()
        except _ProbeTimeout:
            return done("timeout")
        except Exception:
            return done("probe-error")
        if [i for i, _ in current] != [i for i, _ in previous]:
            return done("gpu-change")
        if agree(previous, current):
            return done("stable")
        previous = current


class NvmlProbe:
    """Per-GPU free MiB through pynvml, honouring CUDA_VISIBLE_DEVICES.

    NVML is initialised once, on first use, and shut down by `close()`. A host where NVML
    cannot initialise (no driver, no GPU) is CPU-only: the probe returns no GPUs.
    """

    def __init__(self, visible_devices: str | None = None) -> None:
        self._visible = (
            visible_devices
            if visible_devices is not None
            else os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        self._lock = threading.Lock()
        self._handles: list[tuple[int, Any]] | None = None
        self._initialised = False

    def _init(self) -> list[tuple[int, Any]]:
        import pynvml

        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return []  # no driver / no GPU: the CPU-only path
        self._initialised = True
        count = pynvml.nvmlDeviceGetCount()
        handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        if self._visible is None:
            return handles
        wanted = [w.strip() for w in self._visible.split(",") if w.strip()]
        chosen: list[tuple[int, Any]] = []
        for token in wanted:
            if token.lstrip("-").isdigit():
                if int(token) < 0:
                    break  # CUDA stops enumerating at the first invalid ordinal
                chosen += [(i, h) for i, h in handles if i == int(token)]
            else:
                chosen += [
                    (i, h)
                    for i, h in handles
                    if _text(pynvml.nvmlDeviceGetUUID(h)).startswith(token)
                ]
        return chosen

    def __call__(self) -> Sample:
        import pynvml

        handles = self._visible_gpus()
        return [
            (index, int(pynvml.nvmlDeviceGetMemoryInfo(handle).free) // (1024 * 1024))
            for index, handle in handles
        ]

    def _visible_gpus(self) -> list[tuple[int, Any]]:
        """(index, handle) of the visible GPUs; NVML is initialised on the first call only."""
        with self._lock:
            if self._handles is None:
                self._handles = self._init()
            return self._handles

    def inventory(self) -> list[GpuInfo]:
        """Index, UUID, total and free bytes of each visible GPU (empty: CPU-only host)."""
        import pynvml

        gpus = []
        for index, handle in self._visible_gpus():
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=uuid,
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                )
            )
        return gpus

    def gpu_count(self) -> int:
        """GPUs visible to this process (0 on a CPU-only host)."""
        return len(self._visible_gpus())

    def used_by(self, pid: int) -> int:
        """Bytes of VRAM NVML attributes to `pid` on the visible GPUs (0 when unknown)."""
        return sum(used for _, used in self.used_by_gpu(pid))

    def used_by_gpu(self, pid: int) -> list[tuple[int, int]]:
        """(gpu index, bytes) NVML attributes to `pid`, for each visible GPU it uses."""
        import pynvml

        found = []
        for index, handle in self._visible_gpus():
            try:
                running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except pynvml.NVMLError:
                continue
            used = sum(p.usedGpuMemory or 0 for p in running if p.pid == pid)
            if used:
                found.append((index, int(used)))
        return found

    def close(self) -> None:
        import pynvml

        with self._lock:
            if self._initialised:
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()
            self._initialised = False
            self._handles = None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
