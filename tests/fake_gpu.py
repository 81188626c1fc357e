"""Fake NVIDIA tools for tests on hosts without a GPU: an NVML module and an nvidia-smi script.

``FakeNVML`` stands in for ``pynvml`` (install it with ``install(monkeypatch)``): GPUs of given sizes, and
per-process memory from ``used_by_pid`` (a dict, or a function of the pid for servers started later), and
``foreign`` memory other tenants of a card use.
``fake_nvidia_smi`` writes an ``nvidia-smi`` on PATH that answers the agent's three queries.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

MiB, GiB = 1 << 20, 1 << 30


class NVMLError(Exception):
    pass


@dataclass
class FakeNVML:
    totals: list[int] = field(default_factory=lambda: [80 * GiB])
    used_by_pid: dict[int, dict[int, int]] | Callable[[int], dict[int, int]] = field(default_factory=dict)
    fail_init: bool = False
    foreign: dict[int, int] = field(default_factory=dict)  # GPU index -> bytes other processes (no pid seen) use
    NVMLError: type[Exception] = NVMLError

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.totals)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def usage(self, pid: int) -> dict[int, int]:
        return self.used_by_pid(pid) if callable(self.used_by_pid) else self.used_by_pid.get(pid, {})

    def _pids(self) -> list[int]:
        if not callable(self.used_by_pid):
            return list(self.used_by_pid)
        return [p.pid for p in psutil.Process().children(recursive=True)]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        used = sum(self.usage(pid).get(handle, 0) for pid in self._pids()) + self.foreign.get(handle, 0)
        return SimpleNamespace(total=self.totals[handle], used=used, free=self.totals[handle] - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        found = []
        for pid in self._pids():
            used = self.usage(pid).get(handle)
            if used is not None:
                found.append(SimpleNamespace(pid=pid, usedGpuMemory=used))
        return found

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
        monkeypatch.setitem(sys.modules, "pynvml", self)
        return self


def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML cannot be loaded (no driver library): the agent falls back to nvidia-smi."""
    FakeNVML(fail_init=True).install(monkeypatch)


def fake_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: str | None, apps: str = "", uuids: str = ""
) -> None:
    """``gpus``: lines ``index, total MiB, used MiB`` (None: nvidia-smi fails); ``apps``: ``pid, MiB, uuid``."""
    script = tmp_path / "nvidia-smi"
    if gpus is None:
        script.write_text("#!/bin/sh\nexit 9\n")
    else:
        script.write_text(
            '#!/bin/sh\ncase "$1" in\n'
            f"  --query-gpu=index,memory.total,memory.used) printf '{gpus}' ;;\n"
            f"  --query-gpu=index,uuid) printf '{uuids}' ;;\n"
            f"  --query-compute-apps=*) printf '{apps}' ;;\n"
            "  *) exit 2 ;;\nesac\n"
        )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
