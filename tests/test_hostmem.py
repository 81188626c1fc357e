"""Host memory: psutil, cgroup limits on Linux, the GPU wired limit on macOS, and the override."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from agent.hostmem import cgroup_limit, detect_host_memory, wired_limit_bytes

MiB, GiB = 2**20, 2**30


def fake_cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(proc_line + "\n")
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, root


def test_real_host_is_detected() -> None:
    host = detect_host_memory()
    assert 0 < host.total_bytes <= psutil.virtual_memory().total
    assert 0 <= host.available_bytes <= host.total_bytes


def test_cgroup_v2_limit_clamps_total_and_available(tmp_path: Path) -> None:
    proc, root = fake_cgroup(
        tmp_path,
        "0::/agent.slice/agent.service",
        {
            "agent.slice/agent.service/memory.max": str(2 * GiB),
            "agent.slice/agent.service/memory.current": str(GiB // 2),
            "agent.slice/memory.max": "max",
        },
    )
    host = detect_host_memory(platform="linux", proc_root=proc, cgroup_root=root)
    assert host.total_bytes == 2 * GiB and host.source == "cgroup"
    assert host.available_bytes <= 2 * GiB - GiB // 2
    assert any("memory.max" in note for note in host.notes)


def test_cgroup_ancestor_limit_binds(tmp_path: Path) -> None:
    proc, root = fake_cgroup(
        tmp_path, "0::/a/b", {"a/b/memory.max": "max", "a/memory.max": str(GiB), "a/memory.current": "0"}
    )
    assert cgroup_limit(proc, root) == (GiB, 0)


def test_cgroup_unlimited_and_v1(tmp_path: Path) -> None:
    proc, root = fake_cgroup(tmp_path / "v2", "0::/x", {"x/memory.max": "max"})
    assert cgroup_limit(proc, root) is None
    proc, root = fake_cgroup(
        tmp_path / "v1",
        "5:memory:/docker/abc",
        {
            "memory/docker/abc/memory.limit_in_bytes": str(3 * GiB),
            "memory/docker/abc/memory.usage_in_bytes": "7",
        },
    )
    assert cgroup_limit(proc, root) == (3 * GiB, 7)
    proc, root = fake_cgroup(tmp_path / "v1u", "5:memory:/", {"memory/memory.limit_in_bytes": str(2**63 - 4096)})
    assert cgroup_limit(proc, root) is None


def test_macos_wired_limit_clamps_and_says_so() -> None:
    host = detect_host_memory(platform="darwin", sysctl=lambda argv: "8192\n")
    if psutil.virtual_memory().total > 8 * GiB:
        assert host.total_bytes == 8 * GiB and host.source == "iogpu.wired_limit_mb"
        assert any("wired" in note for note in host.notes)


@pytest.mark.parametrize("answer", ["0\n", "", "garbage"])
def test_wired_limit_unset_or_unreadable(answer: str) -> None:
    assert wired_limit_bytes(lambda argv: answer) is None


def test_wired_limit_missing_sysctl() -> None:
    def missing(argv: list[str]) -> str:
        raise FileNotFoundError(argv[0])

    assert wired_limit_bytes(missing) is None


def test_override_replaces_the_total() -> None:
    host = detect_host_memory(override_total=64 * GiB)
    assert host.total_bytes == 64 * GiB and host.source == "override"
    assert host.available_bytes <= 64 * GiB
    assert any("--host-memory" in note for note in host.notes)
