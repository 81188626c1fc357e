"""What a running server really uses, per kind of memory, and how sure each figure is.

Each figure says where it came from and whether it is *authoritative*: a complete count of that kind of memory
for the process. Linux RSS is complete for a server that uses only host memory. On macOS RSS misses Metal and
IOKit allocations (the GPU's share of unified memory), so the process's *physical footprint*
(``proc_pid_rusage``'s ``ri_phys_footprint``, what Activity Monitor shows) is the authoritative figure; RSS is
the fallback, and not authoritative. GPU memory comes from NVML or nvidia-smi per process (agent/memory/gpus.py).
llama.cpp's own buffer report (its log) is kept beside them: it names each buffer but misses the runtime, so it
is never authoritative, only a lower bound.

The admission ledger trusts a footprint only if it is authoritative for every kind the server uses; otherwise
it holds the larger of the estimate and the measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.estimate.llama_memlog import backend_bytes, parse_memory_log

RSS, PHYS_FOOTPRINT, LLAMA_LOG = "rss", "phys_footprint", "llama.cpp log"
LOG_WINDOW = 1 << 20  # the end of the log read for the buffer report: -lv 4 prints some hundred lines before it


@dataclass(frozen=True)
class Figure:
    bytes: int
    source: str
    authoritative: bool


def is_device_backend(name: str) -> bool:
    """``CUDA0`` is device memory; ``CUDA_Host`` (pinned) and ``CPU*`` are host memory."""
    return name.startswith("CUDA") and name[4:].isdigit()


@dataclass(frozen=True)
class Footprint:
    host: Figure | None = None
    devices: dict[int, Figure] = field(default_factory=dict)  # GPU index -> figure
    device_source: str | None = None  # where the device figures came from; None: they could not be measured
    uses_device: bool = False  # the server keeps memory on a GPU (its executor says so)
    buffers: dict[str, int] = field(default_factory=dict)  # llama.cpp's report per backend
    report: dict[str, int] = field(default_factory=dict)  # llama.cpp's report per kind (model, kv, ...)
    rss: int = 0

    @property
    def reported_host_bytes(self) -> int:
        if self.buffers:
            return sum(v for k, v in self.buffers.items() if not is_device_backend(k))
        return 0 if self.uses_device else self.report.get("total", 0)

    @property
    def reported_device_bytes(self) -> int:
        return sum(v for k, v in self.buffers.items() if is_device_backend(k))

    @property
    def host_bytes(self) -> int:
        return max(self.host.bytes if self.host else 0, self.reported_host_bytes)

    @property
    def device_bytes(self) -> int:
        if self.device_source is None:
            return self.reported_device_bytes
        return sum(f.bytes for f in self.devices.values())

    @property
    def total_bytes(self) -> int:
        return self.host_bytes + self.device_bytes

    @property
    def authoritative(self) -> bool:
        host_ok = self.host is not None and self.host.authoritative
        return host_ok and (not self.uses_device or self.device_source is not None)

    def actual(self) -> dict[str, int]:
        """The flat figures of the unit's status ``actual`` (the llama.cpp report's kinds, rss, host, device)."""
        figures = dict(self.report)
        if self.rss:
            figures["rss"] = self.rss
        if self.host is not None:
            figures["host"] = self.host_bytes
        if self.uses_device:
            figures["device"] = self.device_bytes
        return figures

    def status(self) -> dict[str, Any]:
        """Each figure with its source, for /status."""
        host = self.host
        return {
            "host": {"bytes": self.host_bytes, "source": host.source if host else None,
                     "authoritative": bool(host and host.authoritative)},
            "devices": {str(i): {"bytes": f.bytes, "source": f.source} for i, f in sorted(self.devices.items())},
            "device_bytes": self.device_bytes if self.uses_device else None,
            "device_source": (self.device_source or (LLAMA_LOG if self.buffers else None)) if self.uses_device
            else None,
            "llama_buffers": dict(self.buffers),
            "authoritative": self.authoritative,
            "total_bytes": self.total_bytes,
        }  # fmt: skip


# struct rusage_info_v0 (<sys/resource.h>): ri_phys_footprint is the eighth 64-bit field after the 16-byte uuid.
class _RusageInfoV0(ctypes.Structure):
    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [
        (name, ctypes.c_uint64)
        for name in ("ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
                     "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
                     "ri_proc_exit_abstime")
    ]  # fmt: skip


RUSAGE_INFO_V0 = 0


def libproc() -> Any | None:
    """macOS's libproc (in libSystem), or None elsewhere."""
    name = ctypes.util.find_library("proc")
    try:
        return ctypes.CDLL(name or "/usr/lib/libproc.dylib", use_errno=True)
    except OSError:
        return None


def phys_footprint(pid: int, lib: Any | None = None) -> int | None:
    """The process's physical footprint in bytes (macOS), counting Metal and IOKit memory; None if unavailable."""
    lib = lib if lib is not None else libproc()
    if lib is None:
        return None
    info = _RusageInfoV0()
    try:
        if lib.proc_pid_rusage(int(pid), RUSAGE_INFO_V0, ctypes.byref(info)) != 0:
            return None
    except (AttributeError, OSError, ctypes.ArgumentError):
        return None
    return int(info.ri_phys_footprint)


def host_figure(pid: int, platform: str | None = None, lib: Any | None = None) -> tuple[Figure | None, int]:
    """(the host figure, the RSS): the physical footprint on macOS, RSS elsewhere (or where it fails)."""
    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None, 0
    if (platform or sys.platform) == "darwin":
        footprint = phys_footprint(pid, lib)
        if footprint is not None:
            return Figure(footprint, PHYS_FOOTPRINT, True), rss
        return Figure(rss, RSS, False), rss  # misses what Metal allocated: never trusted alone
    return Figure(rss, RSS, True), rss


def log_tail(path: Path, window: int = LOG_WINDOW) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - window))
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def measure_process(
    pid: int,
    log_path: Path | None,
    uses_device: bool = False,
    device: tuple[dict[int, int], str] | None = None,
    platform: str | None = None,
) -> Footprint:
    """A server's footprint: its host figure, the given device figures and llama.cpp's report from its log."""
    host, rss = host_figure(pid, platform)
    text = log_tail(log_path) if log_path is not None else ""
    report = parse_memory_log(text)
    kinds = {name.removesuffix("_bytes"): getattr(report, name)
             for name in ("model_bytes", "kv_bytes", "output_bytes", "compute_bytes", "total_bytes")}  # fmt: skip
    devices = {index: Figure(value, device[1], True) for index, value in device[0].items()} if device else {}
    return Footprint(
        host=host,
        devices=devices,
        device_source=device[1] if device else None,
        uses_device=uses_device,
        buffers=backend_bytes(text),
        report={k: v for k, v in kinds.items() if v is not None},
        rss=rss,
    )


def keep_report(new: Footprint, old: Footprint | None) -> Footprint:
    """llama.cpp prints its buffers once, at load; a rotated log no longer has them: keep the earlier report."""
    if old is None or new.buffers or new.report or not (old.buffers or old.report):
        return new
    return Footprint(new.host, new.devices, new.device_source, new.uses_device, old.buffers, old.report, new.rss)


def measure_with(executor: object, pid: int, log_path: Path | None) -> Footprint:
    """The executor's own measurement (``Executor.measure``) where it has one, else the default for the host."""
    measure = getattr(executor, "measure", None)
    if callable(measure):
        footprint: Footprint = measure(pid, log_path)
        return footprint
    return measure_process(pid, log_path)
