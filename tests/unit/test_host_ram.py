"""Host RAM for the planner: cgroup v2 and v1 limits, read from a fake cgroup tree."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from engine.adapters.memory import cgroup_memory, host_ram

GIB = 1 << 30


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def v2(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory\n")
    write(tmp_path / "self", "0::/app/worker\n")
    return root, tmp_path / "self"


def test_v2_limit_minus_usage_not_counting_reclaimable_page_cache(v2: tuple[Path, Path]) -> None:
    root, self_cgroup = v2
    write(root / "app" / "worker" / "memory.max", f"{4 * GIB}\n")
    write(root / "app" / "worker" / "memory.current", f"{3 * GIB}\n")
    write(root / "app" / "worker" / "memory.stat", f"anon 1\ninactive_file {GIB}\n")
    assert cgroup_memory(root, self_cgroup) == (4 * GIB, 2 * GIB, "cgroup v2")
    ram = host_ram(root, self_cgroup)
    assert ram.total == 4 * GIB and ram.source == "cgroup v2"
    assert ram.available <= 2 * GIB


def test_v2_the_tightest_ancestor_wins(v2: tuple[Path, Path]) -> None:
    root, self_cgroup = v2
    write(root / "app" / "worker" / "memory.max", "max\n")  # no limit of its own
    write(root / "app" / "memory.max", f"{2 * GIB}\n")
    write(root / "app" / "memory.current", f"{GIB}\n")
    assert cgroup_memory(root, self_cgroup) == (2 * GIB, GIB, "cgroup v2")


def test_v2_unlimited_is_the_host(v2: tuple[Path, Path]) -> None:
    root, self_cgroup = v2
    write(root / "app" / "worker" / "memory.max", "max\n")
    assert cgroup_memory(root, self_cgroup) is None
    ram = host_ram(root, self_cgroup)
    assert ram.source == "host" and ram.total == psutil.virtual_memory().total


def test_v2_namespaced_root_is_our_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "memory\n")
    write(root / "memory.max", f"{GIB}\n")
    write(root / "memory.current", f"{GIB // 4}\n")
    write(tmp_path / "self", "0::/\n")
    assert cgroup_memory(root, tmp_path / "self") == (GIB, GIB // 4, "cgroup v2")


def test_v1_memory_controller(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(tmp_path / "self", "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n")
    group = root / "memory" / "docker" / "abc"
    write(group / "memory.limit_in_bytes", f"{8 * GIB}\n")
    write(group / "memory.usage_in_bytes", f"{5 * GIB}\n")
    write(group / "memory.stat", f"total_inactive_file {GIB}\n")
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    assert cgroup_memory(root, tmp_path / "self") == (8 * GIB, 4 * GIB, "cgroup v1")


def test_no_cgroup_files_at_all_is_the_host(tmp_path: Path) -> None:
    assert cgroup_memory(tmp_path / "nothing", tmp_path / "missing") is None
