"""GGUF models on NVIDIA GPUs: llama-server budgeted against GPU memory, not host RAM.

GPU memory comes from ``nvidia-smi`` (the driver's own tool, present wherever the driver is). The unit's
``hardware.gpu.count`` picks that many devices with the most free memory; their memory together is the total
the budget is taken from. No GPU is a clear ``MemoryCheckFailed``, never a crash.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.plugin import (
    Budget,
    Executor,
    HostMemory,
    Launch,
    Mode,
    Reason,
    ServingUnit,
    Verdict,
    check_gguf,
    failed,
    hookimpl,
)
from plugins.llamacpp import LlamaCppExecutor, executor_arguments

MiB = 1 << 20


class NoGPU(RuntimeError):
    """No NVIDIA GPU could be queried."""


@dataclass(frozen=True)
class GPU:
    index: int
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes


def list_gpus(run: Callable[[list[str]], str] | None = None) -> list[GPU]:
    def nvidia_smi(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout

    query = ["nvidia-smi", "--query-gpu=index,memory.total,memory.used", "--format=csv,noheader,nounits"]
    try:
        out = (run or nvidia_smi)(query)
        gpus = [
            GPU(int(index), int(total) * MiB, int(used) * MiB)
            for index, total, used in (line.split(",") for line in out.strip().splitlines() if line.strip())
        ]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise NoGPU(f"no NVIDIA GPU found: nvidia-smi failed ({exc})") from exc
    if not gpus:
        raise NoGPU("no NVIDIA GPU found: nvidia-smi lists no devices")
    return gpus


def pick(gpus: list[GPU], count: int) -> list[GPU]:
    if count > len(gpus):
        raise NoGPU(f"hardware.gpu.count is {count} but only {len(gpus)} GPU(s) exist")
    return sorted(gpus, key=lambda g: g.free_bytes, reverse=True)[:count]


def gpu_memory(unit: ServingUnit) -> tuple[HostMemory, list[GPU]]:
    chosen = pick(list_gpus(), max(1, unit.model.gpu_count or 1))
    total = sum(g.total_bytes for g in chosen)
    free = sum(g.free_bytes for g in chosen)
    indexes = ",".join(str(g.index) for g in chosen)
    return HostMemory(total, free, "nvidia-smi", (f"GPU(s) {indexes}",)), chosen


def is_cuda(unit: ServingUnit) -> bool:
    return unit.model.accelerator == "cuda" and unit.model.format == "gguf"


@hookimpl
def resolve_budget(unit: ServingUnit, host: HostMemory, agent_fraction: float | None) -> Budget | None:
    if not is_cuda(unit):
        return None
    try:
        gpu, _ = gpu_memory(unit)
    except NoGPU:
        return None  # preflight reports it
    return unit.model.budget(gpu.total_bytes, agent_fraction)


@hookimpl
def preflight(unit: ServingUnit, model_path: Path, budget: Budget, host: HostMemory, mode: str) -> Verdict | None:
    if not is_cuda(unit):
        return None
    try:
        gpu, _ = gpu_memory(unit)
    except NoGPU as exc:
        return failed(Reason.MEMORY_CHECK_FAILED, str(exc), Mode(mode), settings=unit.settings)
    return check_gguf(model_path, unit.settings, budget, gpu, Mode(mode))


class CUDAExecutor(LlamaCppExecutor):
    name = "cuda"
    accelerators = ("cuda",)

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        _, chosen = gpu_memory(unit)
        launch = super().command(unit, model_path, port)
        return dataclasses.replace(launch, env={"CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in chosen)})


@hookimpl
def register_executors(register: Callable[[Executor], None], settings: Mapping[str, Any]) -> None:
    register(CUDAExecutor(**executor_arguments(settings)))  # the same llama-server binary and --mlock
