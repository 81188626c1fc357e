"""GGUF models on NVIDIA GPUs: llama-server budgeted against GPU memory, not host RAM.

GPU memory comes from NVML, else ``nvidia-smi`` (agent/memory/gpus.py). The unit's ``hardware.gpu.count`` picks that
many devices with the most free memory; their memory together is the total the budget is taken from. The
estimate is split into device and host memory (agent/estimate/device_estimate.py), the budget limits the device part,
and a running server is measured per process on each GPU. No GPU is a clear ``MemoryCheckFailed``, never a crash.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.plugin import (
    CONTEXT_OVERHEAD,
    DEFAULT_CONTEXT_OVERHEAD,
    GPU,
    QUANTITY,
    Budget,
    Executor,
    Footprint,
    HostMemory,
    Launch,
    Mode,
    NoGPU,
    Reason,
    ServingUnit,
    Setting,
    Verdict,
    check_gguf,
    failed,
    gpu_estimate,
    gpu_process_memory,
    hookimpl,
    is_device_backend,
    list_gpus,
    measure_process,
)
from plugins.llamacpp import LlamaCppExecutor, executor_arguments

__all__ = ["GPU", "NoGPU", "list_gpus"]
MiB = 1 << 20


def pick(found: list[GPU], count: int) -> list[GPU]:
    if count > len(found):
        raise NoGPU(f"hardware.gpu.count is {count} but only {len(found)} GPU(s) exist")
    return sorted(found, key=lambda g: g.free_bytes, reverse=True)[:count]


def gpu_memory(unit: ServingUnit) -> tuple[HostMemory, list[GPU]]:
    chosen = pick(list_gpus(), max(1, unit.model.gpu_count or 1))
    total = sum(g.total_bytes for g in chosen)
    free = sum(g.free_bytes for g in chosen)
    indexes = ",".join(str(g.index) for g in chosen)
    return HostMemory(total, free, "GPU", (f"GPU(s) {indexes}",)), chosen


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
        gpu, chosen = gpu_memory(unit)
    except NoGPU as exc:
        return failed(Reason.MEMORY_CHECK_FAILED, str(exc), Mode(mode), settings=unit.settings)
    overhead = CONTEXT_OVERHEAD.bytes_for([g.index for g in chosen]) * len(chosen)  # a context per GPU
    estimator = functools.partial(gpu_estimate, context_overhead=overhead, gpu_layers=unit.model.gpu_layers)
    return check_gguf(model_path, unit.settings, budget, gpu, Mode(mode), estimator)


class CUDAExecutor(LlamaCppExecutor):
    name = "cuda"
    accelerators = ("cuda",)
    uses_device = True  # its servers hold GPU memory: the agent keeps a ledger per GPU

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        _, chosen = gpu_memory(unit)
        launch = super().command(unit, model_path, port)
        return dataclasses.replace(launch, env={"CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in chosen)})

    def measure(self, pid: int, log_path: Path | None = None) -> Footprint:
        """Host memory, the process's memory on each GPU (NVML, else nvidia-smi) and llama.cpp's buffers; the
        first server on a GPU teaches the agent that GPU's CUDA context overhead."""
        device = gpu_process_memory(pid)
        # A loaded CUDA server always holds GPU memory: none listed for its pid means the tools cannot see it (a
        # container's own PID namespace), not that it uses none; the ledger then keeps the estimate.
        found = (device.by_gpu, device.source) if device is not None and device.by_gpu else None
        footprint = measure_process(pid, log_path, uses_device=True, device=found)
        reported = {k: v for k, v in footprint.buffers.items() if is_device_backend(k)}
        if device is not None and len(device.by_gpu) == 1 and len(reported) == 1:
            ((index, used),) = device.by_gpu.items()
            learned = CONTEXT_OVERHEAD.learn(index, used, sum(reported.values()))
            if learned is not None:
                import structlog  # here, not at import: `estimate` loads this plugin and needs no logging

                structlog.get_logger("metal_agent.cuda").info(
                    "learned the CUDA context overhead", gpu=index, overhead=learned, process=used
                )
        return footprint


SETTINGS = (
    Setting("cuda_context_overhead", "executors.cuda", "context_overhead", QUANTITY, "600Mi",
            "device memory a CUDA llama-server holds beyond its buffers (context, cuBLAS, kernels; 589 MiB on an "
            "H200 with CUDA 13); replaced per GPU by what the agent measures on its first server there"),
)  # fmt: skip


@hookimpl
def agent_settings() -> list[Setting]:
    return list(SETTINGS)


def configure(settings: Mapping[str, Any]) -> None:
    """Apply the configured context overhead (the estimate command and the agent both call it)."""
    overhead = settings.get("cuda_context_overhead")
    CONTEXT_OVERHEAD.default = int(overhead) if overhead else DEFAULT_CONTEXT_OVERHEAD


@hookimpl
def register_executors(register: Callable[[Executor], None], settings: Mapping[str, Any]) -> None:
    configure(settings)
    register(CUDAExecutor(**executor_arguments(settings)))  # the same llama-server binary and --mlock
