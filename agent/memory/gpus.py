"""NVIDIA GPUs as the agent sees them: memory per device and memory per process.

NVML (``nvidia-ml-py``, NVIDIA's own binding) is asked first; where it cannot be loaded or initialised (no
driver library, a container without it) the same figures come from ``nvidia-smi``, which the driver ships.
Per-process figures are what ``nvidia-smi --query-compute-apps`` shows: a server's whole device memory, CUDA
context included, which is the only figure that can be compared with a GPU's capacity.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
Run = Callable[[list[str]], str]


class NoGPU(RuntimeError):
    """No NVIDIA GPU could be queried."""


@dataclass(frozen=True)
class GPU:
    index: int
    total_bytes: int
    used_bytes: int
    uuid: str = ""

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes


def nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None where NVML cannot be used here."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError when the driver library is missing
        return None
    return pynvml


def nvidia_smi(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout


def _csv(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines() if line.strip()]


# `metal-agent estimate --gpu-memory/--gpu-count`: GPUs to pretend this host has (like --host-memory).
PRETEND: list[GPU] | None = None


def list_gpus(run: Run | None = None) -> list[GPU]:
    """Every GPU with its total and used memory (NVML, else nvidia-smi); NoGPU when neither answers."""
    if PRETEND is not None and run is None:
        return list(PRETEND)
    lib = nvml() if run is None else None
    if lib is not None:
        try:
            gpus = []
            for index in range(lib.nvmlDeviceGetCount()):
                handle = lib.nvmlDeviceGetHandleByIndex(index)
                memory = lib.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(GPU(index, int(memory.total), int(memory.used)))
            if gpus:
                return gpus
        except Exception:  # NVMLError: fall back to nvidia-smi
            pass
    query = ["nvidia-smi", "--query-gpu=index,memory.total,memory.used", "--format=csv,noheader,nounits"]
    try:
        gpus = [GPU(int(row[0]), int(row[1]) * MiB, int(row[2]) * MiB) for row in _csv((run or nvidia_smi)(query))]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise NoGPU(f"no NVIDIA GPU found: nvidia-smi failed ({exc})") from exc
    if not gpus:
        raise NoGPU("no NVIDIA GPU found: nvidia-smi lists no devices")
    return gpus


def budgets(budget_of: Callable[[int], int]) -> tuple[dict[int, int], dict[int, int] | None]:
    """Each GPU's device-memory budget (``budget_of`` its total) and what it has free now; none where no GPU
    answers."""
    try:
        found = list_gpus()
    except NoGPU:
        return {}, None
    return {gpu.index: budget_of(gpu.total_bytes) for gpu in found}, {gpu.index: gpu.free_bytes for gpu in found}


def free_memory() -> dict[int, int] | None:
    """What each GPU has free now, memory of every process on it counted (ours and others'); None if none answers."""
    try:
        return {gpu.index: gpu.free_bytes for gpu in list_gpus()}
    except NoGPU:
        return None


@dataclass(frozen=True)
class ProcessMemory:
    """Device memory of one process, by GPU index, and where the figures came from."""

    by_gpu: dict[int, int]
    source: str  # "nvml" or "nvidia-smi"


def process_memory(pid: int, run: Run | None = None) -> ProcessMemory | None:
    """The GPU memory ``pid`` holds on each device (NVML, else nvidia-smi); None when neither can say.

    A process that holds no GPU memory (yet) gives an empty ``by_gpu``: the tools answered, the answer is 0.
    """
    lib = nvml() if run is None else None
    if lib is not None:
        try:
            found: dict[int, int] = {}
            for index in range(lib.nvmlDeviceGetCount()):
                handle = lib.nvmlDeviceGetHandleByIndex(index)
                for proc in lib.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = proc.usedGpuMemory  # None where the driver does not say (some vGPU setups)
                    if proc.pid == pid and used is not None:
                        found[index] = found.get(index, 0) + int(used)
            return ProcessMemory(found, "nvml")
        except Exception:  # NVMLError: try nvidia-smi
            pass
    call = run or nvidia_smi
    try:
        indexes = {row[1]: int(row[0]) for row in _csv(call(["nvidia-smi", "--query-gpu=index,uuid",
                                                                "--format=csv,noheader,nounits"]))}  # fmt: skip
        apps = _csv(call(["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid",
                          "--format=csv,noheader,nounits"]))  # fmt: skip
        found = {}
        for row in apps:
            if int(row[0]) == pid:
                index = indexes.get(row[2], -1) if len(row) > 2 else -1
                found[index] = found.get(index, 0) + int(row[1]) * MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return ProcessMemory(found, "nvidia-smi")


# Measured on an NVIDIA H200 with CUDA 13.0 (driver 580): a llama-server process holds 589 MiB of device
# memory beyond the buffers llama.cpp reports (CUDA context, cuBLAS, kernel images), constant to 1 MiB over 17
# cases (docs/running.md, "What is measured how"). Rounded up; other GPUs and drivers differ, so the agent learns it.
DEFAULT_CONTEXT_OVERHEAD = 600 * MiB


@dataclass
class ContextOverhead:
    """The device memory a CUDA server holds beyond its buffers: the setting, then what the agent measured.

    The first server the agent measures on a GPU replaces the setting for that GPU (process VRAM less the
    buffers llama.cpp reported on it); later estimates for that GPU use the learned figure.
    """

    default: int = DEFAULT_CONTEXT_OVERHEAD
    learned: dict[int, int] = field(default_factory=dict)

    def bytes_for(self, indexes: list[int] | None = None) -> int:
        """The overhead to assume on these GPUs (the largest of what each says); the setting where unknown."""
        figures = [self.learned.get(i, self.default) for i in indexes or ()]
        return max(figures, default=self.default) if figures else self.default

    def learn(self, index: int, process_bytes: int, buffer_bytes: int) -> int | None:
        """Record the first server's overhead on ``index``; returns it when it is new."""
        if index in self.learned or process_bytes <= buffer_bytes or buffer_bytes <= 0:
            return None
        self.learned[index] = process_bytes - buffer_bytes
        return self.learned[index]

    def status(self) -> dict[str, Any]:
        return {
            "setting_bytes": self.default,
            "learned_bytes": {str(index): value for index, value in sorted(self.learned.items())},
        }


CONTEXT_OVERHEAD = ContextOverhead()  # one per agent process: what it learns serves every later estimate
