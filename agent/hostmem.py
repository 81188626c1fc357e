"""How much memory this host can really give a model.

psutil reports the machine, not the limits that bind: on Linux a cgroup ``memory.max`` (containers, systemd
slices) caps the agent and its children; on a Mac the GPU can wire at most ``iogpu.wired_limit_mb``. Budgets are
fractions of the binding total, so the total is clamped to these and the notes say why.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.quantity import format_bytes

MiB = 2**20


class HostMemoryUnknown(RuntimeError):
    """Host memory could not be determined; the verdict fails closed."""


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    source: str  # psutil, cgroup, iogpu.wired_limit_mb or override
    notes: tuple[str, ...] = ()


def _read_int(path: Path) -> int | None:
    """An integer limit file; None for ``max`` (unlimited) or when absent or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_limit(
    proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> tuple[int, int | None] | None:
    """This process's cgroup memory limit and current usage, or None when unlimited or not in a cgroup."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        relative = relative.lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2 unified hierarchy
            # Limits of the process's group and every ancestor apply; the smallest binds.
            group = cgroup_root / relative
            limits = []
            for directory in (group, *group.parents):
                limit = _read_int(directory / "memory.max")
                if limit is not None:
                    limits.append((limit, _read_int(directory / "memory.current")))
                if directory == cgroup_root:
                    break
            if limits:
                return min(limits, key=lambda pair: pair[0])
        elif "memory" in controllers.split(","):  # cgroup v1
            base = cgroup_root / "memory" / relative
            limit = _read_int(base / "memory.limit_in_bytes")
            if limit is not None and limit < 2**62:  # v1 writes a huge number for "unlimited"
                return limit, _read_int(base / "memory.usage_in_bytes")
    return None


def wired_limit_bytes(run: Callable[[list[str]], str] | None = None) -> int | None:
    """macOS ``iogpu.wired_limit_mb`` in bytes when set (0 means the OS default), else None."""

    def sysctl(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout

    try:
        out = (run or sysctl)(["sysctl", "-n", "iogpu.wired_limit_mb"]).strip()
        mb = int(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return mb * MiB if mb > 0 else None


def detect_host_memory(
    override_total: int | None = None,
    platform: str = sys.platform,
    proc_root: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    sysctl: Callable[[list[str]], str] | None = None,
) -> HostMemory:
    try:
        vm = psutil.virtual_memory()
    except Exception as exc:  # psutil raises OSError or RuntimeError variants by platform
        raise HostMemoryUnknown(f"psutil could not read memory: {exc}") from exc
    total, available, source, notes = int(vm.total), int(vm.available), "psutil", []
    if total <= 0:
        raise HostMemoryUnknown(f"psutil reported {total} bytes of memory")
    if platform.startswith("linux"):
        cgroup = cgroup_limit(proc_root, cgroup_root)
        if cgroup and cgroup[0] < total:
            limit, current = cgroup
            total, source = limit, "cgroup"
            free_in_group = limit - current if current is not None else limit
            available = max(0, min(available, free_in_group))
            notes.append(f"cgroup memory.max limits this agent to {format_bytes(limit)}")
    elif platform == "darwin":
        wired = wired_limit_bytes(sysctl)
        if wired is not None and wired < total:
            notes.append(
                f"GPU wired limit iogpu.wired_limit_mb is {format_bytes(wired)} of {format_bytes(total)} RAM: "
                "budgets are taken from the wired limit"
            )
            total, source = wired, "iogpu.wired_limit_mb"
            available = min(available, total)
    if override_total is not None:
        notes.append(f"--host-memory {format_bytes(override_total)} replaces the detected {format_bytes(total)}")
        total, source = override_total, "override"
        available = min(available, total)
    return HostMemory(total_bytes=total, available_bytes=available, source=source, notes=tuple(notes))
