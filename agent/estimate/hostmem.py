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

from agent.util.quantity import format_bytes

MiB = 2**20
# cgroup v1 writes a page-rounded 2**63 - 1 for "no limit"; anything this large is no limit at all.
V1_UNLIMITED = 2**62
SYSCTL_TIMEOUT_S = 5.0

Sysctl = Callable[[list[str]], str]
VirtualMemory = Callable[[], tuple[int, int]]


class HostMemoryUnknown(RuntimeError):
    """Host memory could not be determined; the verdict fails closed."""


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    source: str  # psutil, cgroup, iogpu.wired_limit_mb or override
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CgroupMemory:
    """The binding cgroup limit and how much more the group can take before it hits any limit."""

    limit_bytes: int
    headroom_bytes: int | None  # None when no usage file could be read
    limit_file: Path  # the file whose limit binds, named in the notes


@dataclass(frozen=True)
class _Layout:
    """File names of one cgroup version: v2 and v1 say the same things under different names."""

    limit: str
    usage: str
    inactive_file: str  # memory.stat key of reclaimable page cache (counted in usage, freed under pressure)


_V2 = _Layout("memory.max", "memory.current", "inactive_file")
_V1 = _Layout("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


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


def _stat_value(directory: Path, key: str) -> int:
    """One counter of ``memory.stat``; 0 when absent (then usage is taken as it is: conservative)."""
    try:
        lines = (directory / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, number = line.partition(" ")
        if name == key and number.strip().isdigit():
            return int(number)
    return 0


def _group_directories(mount: Path, relative: str) -> list[Path]:
    """The process's group and its ancestors up to the mount, the group first.

    Without a cgroup namespace /proc/self/cgroup names the host-side path, which a container's mount does not
    have; then the mount itself is the container's group.
    """
    group = mount / relative
    if not relative or not group.is_dir():
        return [mount]
    directories = [group]
    for parent in group.parents:
        directories.append(parent)
        if parent == mount:
            break
    return directories


def _binding_limit(directories: list[Path], layout: _Layout, unlimited_from: int | None) -> CgroupMemory | None:
    """The smallest limit along the hierarchy and the smallest headroom of any limited level."""
    binding: CgroupMemory | None = None
    headrooms: list[int] = []
    for directory in directories:
        limit = _read_int(directory / layout.limit)
        if limit is None or (unlimited_from is not None and limit >= unlimited_from):
            continue
        usage = _read_int(directory / layout.usage)
        if usage is not None:
            working_set = max(0, usage - _stat_value(directory, layout.inactive_file))
            headrooms.append(max(0, limit - working_set))
        if binding is None or limit < binding.limit_bytes:
            binding = CgroupMemory(limit, None, directory / layout.limit)
    if binding is None:
        return None
    return CgroupMemory(binding.limit_bytes, min(headrooms) if headrooms else None, binding.limit_file)


def cgroup_limit(proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> CgroupMemory | None:
    """This process's cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), None if unlimited.

    Every ancestor's limit applies too, so the smallest along the path binds.
    """
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        relative = relative.strip().lstrip("/")
        found = None
        if hierarchy == "0" and controllers == "":  # cgroup v2 unified hierarchy
            found = _binding_limit(_group_directories(cgroup_root, relative), _V2, None)
        elif "memory" in controllers.split(","):  # cgroup v1 memory controller
            found = _binding_limit(_group_directories(cgroup_root / "memory", relative), _V1, V1_UNLIMITED)
        if found is not None:
            return found
    return None


def _run_sysctl(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=SYSCTL_TIMEOUT_S, check=True).stdout


def wired_limit_bytes(sysctl: Sysctl | None = None) -> int | None:
    """macOS ``iogpu.wired_limit_mb`` in bytes when set; None when 0 (the OS default applies) or unreadable."""
    try:
        mb = int((sysctl or _run_sysctl)(["sysctl", "-n", "iogpu.wired_limit_mb"]).strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return mb * MiB if mb > 0 else None


def _psutil_memory() -> tuple[int, int]:
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def detect_host_memory(
    override_total: int | None = None,
    *,
    platform: str = sys.platform,
    proc_root: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    sysctl: Sysctl | None = None,
    virtual_memory: VirtualMemory = _psutil_memory,
) -> HostMemory:
    """The total budgets are taken from, and what is free now; raises HostMemoryUnknown rather than guess."""
    if override_total is not None and (isinstance(override_total, bool) or override_total <= 0):
        raise ValueError(f"--host-memory must be a positive number of bytes, got {override_total!r}")
    try:
        total, available = virtual_memory()
    except Exception as exc:  # psutil raises OSError or RuntimeError variants by platform
        raise HostMemoryUnknown(f"psutil could not read memory: {exc}") from exc
    if total <= 0 or available < 0:
        raise HostMemoryUnknown(f"psutil reported an impossible {total} bytes total, {available} available")
    source, notes = "psutil", []
    if platform.startswith("linux"):
        cgroup = cgroup_limit(proc_root, cgroup_root)
        if cgroup is not None:
            if cgroup.headroom_bytes is not None:
                available = min(available, cgroup.headroom_bytes)
            if cgroup.limit_bytes < total:
                total, source = cgroup.limit_bytes, "cgroup"
                notes.append(f"cgroup limit {cgroup.limit_file} caps this agent at {format_bytes(total)}")
    elif platform == "darwin":
        wired = wired_limit_bytes(sysctl)
        if wired is not None and wired < total:
            notes.append(
                f"GPU wired limit iogpu.wired_limit_mb is {format_bytes(wired)} of {format_bytes(total)} RAM: "
                "budgets are taken from the wired limit"
            )
            total, source = wired, "iogpu.wired_limit_mb"
    if override_total is not None:
        notes.append(f"--host-memory {format_bytes(override_total)} replaces the detected {format_bytes(total)}")
        total, source = override_total, "override"
    return HostMemory(total_bytes=total, available_bytes=min(available, total), source=source, notes=tuple(notes))
