"""Host memory: psutil, cgroup limits on Linux, the GPU wired limit on macOS, and the override.

Tests point the detector at a fake cgroupfs in tmp_path and at fixed psutil numbers, so every assertion holds
on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from agent.estimate.hostmem import (
    CgroupMemory,
    HostMemory,
    HostMemoryUnknown,
    cgroup_limit,
    detect_host_memory,
    wired_limit_bytes,
)

MiB, GiB = 2**20, 2**30


def machine(total: int, available: int) -> Callable[[], tuple[int, int]]:
    return lambda: (total, available)


def fake_cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(proc_line + "\n")
    root.mkdir(parents=True, exist_ok=True)
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, root


def linux(tmp_path: Path, proc_line: str, files: dict[str, str], total: int, available: int) -> HostMemory:
    proc, root = fake_cgroup(tmp_path, proc_line, files)
    return detect_host_memory(
        platform="linux", proc_root=proc, cgroup_root=root, virtual_memory=machine(total, available)
    )


def test_real_host_is_detected() -> None:
    host = detect_host_memory()
    assert 0 < host.total_bytes <= psutil.virtual_memory().total
    assert 0 <= host.available_bytes <= host.total_bytes


def test_no_limits_means_psutil(tmp_path: Path) -> None:
    host = linux(tmp_path, "0::/", {}, 64 * GiB, 50 * GiB)
    assert host == HostMemory(64 * GiB, 50 * GiB, "psutil", ())


def test_cgroup_v2_limit_clamps_total_and_available(tmp_path: Path) -> None:
    host = linux(
        tmp_path,
        "0::/agent.slice/agent.service",
        {
            "agent.slice/agent.service/memory.max": str(2 * GiB),
            "agent.slice/agent.service/memory.current": str(GiB // 2),
            "agent.slice/memory.max": "max",
        },
        total=64 * GiB,
        available=60 * GiB,
    )
    assert (host.total_bytes, host.available_bytes, host.source) == (2 * GiB, 2 * GiB - GiB // 2, "cgroup")
    assert len(host.notes) == 1 and "memory.max" in host.notes[0] and "2.0 GiB" in host.notes[0]


def test_reclaimable_page_cache_is_not_counted_as_used(tmp_path: Path) -> None:
    """memory.current includes the page cache of files read (the GGUF itself); the kernel frees it on demand."""
    host = linux(
        tmp_path,
        "0::/g",
        {"g/memory.max": str(4 * GiB), "g/memory.current": str(3 * GiB), "g/memory.stat": f"inactive_file {GiB}\n"},
        total=64 * GiB,
        available=60 * GiB,
    )
    assert host.available_bytes == 2 * GiB


def test_cgroup_ancestor_limit_binds(tmp_path: Path) -> None:
    proc, root = fake_cgroup(
        tmp_path, "0::/a/b", {"a/b/memory.max": "max", "a/memory.max": str(GiB), "a/memory.current": "0"}
    )
    assert cgroup_limit(proc, root) == CgroupMemory(GiB, GiB, root / "a" / "memory.max")


def test_the_tightest_headroom_of_any_level_binds(tmp_path: Path) -> None:
    """A roomy parent shared with busy siblings can leave less than the child's own limit suggests."""
    proc, root = fake_cgroup(
        tmp_path,
        "0::/a/b",
        {
            "a/b/memory.max": str(2 * GiB),
            "a/b/memory.current": str(GiB // 4),
            "a/memory.max": str(3 * GiB),
            "a/memory.current": str(5 * GiB // 2),
        },
    )
    assert cgroup_limit(proc, root) == CgroupMemory(2 * GiB, GiB // 2, root / "a" / "b" / "memory.max")


def test_cgroup_unlimited_and_v1(tmp_path: Path) -> None:
    proc, root = fake_cgroup(tmp_path / "v2", "0::/x", {"x/memory.max": "max"})
    assert cgroup_limit(proc, root) is None
    proc, root = fake_cgroup(
        tmp_path / "v1",
        "4:memory:/docker/abc",
        {
            "memory/docker/abc/memory.limit_in_bytes": str(3 * GiB),
            "memory/docker/abc/memory.usage_in_bytes": str(GiB),
            "memory/docker/abc/memory.stat": f"inactive_file 7\ntotal_inactive_file {GiB // 2}\n",
        },
    )
    assert cgroup_limit(proc, root) == CgroupMemory(
        3 * GiB, 5 * GiB // 2, root / "memory/docker/abc/memory.limit_in_bytes"
    )
    proc, root = fake_cgroup(tmp_path / "v1u", "4:memory:/", {"memory/memory.limit_in_bytes": str(2**63 - 4096)})
    assert cgroup_limit(proc, root) is None


def test_container_without_cgroup_namespace_reads_its_mount(tmp_path: Path) -> None:
    """/proc/self/cgroup names the host-side path; inside the container that group is the mount itself."""
    proc, root = fake_cgroup(tmp_path, "4:memory:/kubepods/pod1/abc", {"memory/memory.limit_in_bytes": str(8 * GiB)})
    limit = cgroup_limit(proc, root)
    assert limit is not None and limit.limit_bytes == 8 * GiB and limit.headroom_bytes is None


def test_hybrid_hierarchy_falls_through_to_the_v1_memory_controller(tmp_path: Path) -> None:
    proc, root = fake_cgroup(tmp_path, "", {"memory/g/memory.limit_in_bytes": str(GiB)})
    (proc / "self" / "cgroup").write_text("0::/g\n4:memory:/g\n")
    limit = cgroup_limit(proc, root)
    assert limit is not None and limit.limit_bytes == GiB


def test_a_limit_above_the_machine_still_bounds_available(tmp_path: Path) -> None:
    host = linux(
        tmp_path,
        "0::/g",
        {"g/memory.max": str(100 * GiB), "g/memory.current": str(90 * GiB)},
        total=64 * GiB,
        available=60 * GiB,
    )
    assert (host.total_bytes, host.available_bytes, host.source) == (64 * GiB, 10 * GiB, "psutil")


def test_macos_wired_limit_clamps_and_says_so() -> None:
    calls: list[list[str]] = []

    def sysctl(argv: list[str]) -> str:
        calls.append(argv)
        return "8192\n"

    host = detect_host_memory(platform="darwin", sysctl=sysctl, virtual_memory=machine(16 * GiB, 12 * GiB))
    assert calls == [["sysctl", "-n", "iogpu.wired_limit_mb"]]
    assert (host.total_bytes, host.available_bytes, host.source) == (8 * GiB, 8 * GiB, "iogpu.wired_limit_mb")
    assert len(host.notes) == 1 and "iogpu.wired_limit_mb" in host.notes[0] and "8.0 GiB" in host.notes[0]


def test_macos_default_wired_limit_leaves_psutil() -> None:
    host = detect_host_memory(platform="darwin", sysctl=lambda argv: "0\n", virtual_memory=machine(GiB, GiB // 2))
    assert host == HostMemory(GiB, GiB // 2, "psutil", ())


@pytest.mark.parametrize("answer", ["0\n", "", "garbage", "-5"])
def test_wired_limit_unset_or_unreadable(answer: str) -> None:
    assert wired_limit_bytes(lambda argv: answer) is None


def test_wired_limit_missing_sysctl() -> None:
    def missing(argv: list[str]) -> str:
        raise FileNotFoundError(argv[0])

    assert wired_limit_bytes(missing) is None


def test_override_replaces_the_total() -> None:
    host = detect_host_memory(override_total=4 * GiB, virtual_memory=machine(64 * GiB, 50 * GiB))
    assert (host.total_bytes, host.available_bytes, host.source) == (4 * GiB, 4 * GiB, "override")
    assert len(host.notes) == 1 and "--host-memory 4.0 GiB" in host.notes[0] and "64.0 GiB" in host.notes[0]


def test_override_above_the_machine_keeps_measured_available() -> None:
    host = detect_host_memory(128 * GiB, virtual_memory=machine(64 * GiB, 50 * GiB))
    assert (host.total_bytes, host.available_bytes) == (128 * GiB, 50 * GiB)


@pytest.mark.parametrize("bad", [0, -1])
def test_override_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="--host-memory"):
        detect_host_memory(bad)


def test_unreadable_memory_fails_closed() -> None:
    def broken() -> tuple[int, int]:
        raise OSError("no /proc/meminfo")

    with pytest.raises(HostMemoryUnknown, match="/proc/meminfo"):
        detect_host_memory(virtual_memory=broken)
    with pytest.raises(HostMemoryUnknown, match="impossible"):
        detect_host_memory(virtual_memory=machine(0, 0))
