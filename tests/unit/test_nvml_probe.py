"""The NVML adapter with pynvml faked at its function boundary (there is no GPU here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from engine.adapters.gpu import NvmlProbe

MIB = 1024 * 1024


@dataclass
class FakeNvml:
    """Three GPUs; counts init/shutdown calls; `init_error` makes nvmlInit fail."""

    free_mib: list[int] = field(default_factory=lambda: [1000, 2000, 3000])
    init_error: int | None = None
    inits: int = 0
    shutdowns: int = 0
    processes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fakes: dict[str, Any] = {
            "nvmlInit": self.init,
            "nvmlShutdown": self.shutdown,
            "nvmlDeviceGetCount": lambda: len(self.free_mib),
            "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
            "nvmlDeviceGetUUID": lambda h: f"GPU-{h[1]}aaa-{h[1]}",
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(
                free=self.free_mib[h[1]] * MIB, total=80_000 * MIB
            ),
            "nvmlDeviceGetComputeRunningProcesses": lambda h: [
                SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in self.processes.get(h[1], [])
            ],
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(pynvml, name, fake)

    def init(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.inits += 1

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.install(monkeypatch)
    return fake


def test_free_mib_per_gpu_initialised_once_and_shut_down_at_close(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # every GPU
    probe = NvmlProbe()
    assert probe() == [(0, 1000), (1, 2000), (2, 3000)]
    nvml.free_mib[1] = 2500
    assert probe() == [(0, 1000), (1, 2500), (2, 3000)]
    assert nvml.inits == 1
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1


def test_nvml_error_on_init_is_a_cpu_only_host(nvml: FakeNvml) -> None:
    nvml.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    probe = NvmlProbe(visible_devices="0")
    assert probe() == []
    probe.close()
    assert nvml.shutdowns == 0, "never shut down what did not initialise"


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("2,0", [2, 0]),  # CUDA's order; NVML indices stay physical
        ("1", [1]),
        ("0,-1,2", [0]),  # CUDA stops at the first invalid ordinal
        ("GPU-2aaa", [2]),  # UUID prefixes
        ("7", []),
        ("", []),  # an empty CUDA_VISIBLE_DEVICES hides every GPU
    ],
)
def test_cuda_visible_devices_is_honoured(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[int]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    probe = NvmlProbe()
    assert [index for index, _ in probe()] == expected


def test_vram_used_by_a_pid(nvml: FakeNvml) -> None:
    nvml.processes = {0: [(42, 500 * MIB), (7, 1 * MIB)], 2: [(42, 100 * MIB)]}
    probe = NvmlProbe(visible_devices="0,1,2")
    assert probe.used_by(42) == 600 * MIB
    assert probe.used_by_gpu(42) == [(0, 500 * MIB), (2, 100 * MIB)]
    assert probe.used_by(99) == 0 and probe.used_by_gpu(99) == []


def test_inventory_lists_index_uuid_total_and_free_of_visible_gpus(nvml: FakeNvml) -> None:
    probe = NvmlProbe(visible_devices="2,0")
    inventory = probe.inventory()
    assert [(g.index, g.uuid, g.free_bytes) for g in inventory] == [
        (2, "GPU-2aaa-2", 3000 * MIB),
        (0, "GPU-0aaa-0", 1000 * MIB),
    ]
    assert all(g.total_bytes == 80_000 * MIB for g in inventory)
