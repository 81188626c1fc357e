"""Measuring a server: host figures per platform, GPU figures per process (NVML, nvidia-smi), llama.cpp's report."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import pytest
from fake_gpu import FakeNVML, GiB, MiB, fake_nvidia_smi, no_nvml

from agent.estimate.llama_memlog import backend_bytes
from agent.memory import gpus
from agent.memory.footprint import Figure, Footprint, host_figure, keep_report, measure_process, phys_footprint

# What llama-server b11434 with CUDA prints at -lv 4 (llama8b-32k of the reference table), after a dry run.
CUDA_LOG = """\
load_tensors: loading model tensors, this can take a while... (mmap = true)
load_tensors:        CUDA0 model buffer size =     0.00 MiB
load_tensors: loading model tensors, this can take a while... (mmap = true)
load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
load_tensors:        CUDA0 model buffer size =  4026.83 MiB
llama_context:  CUDA_Host  output buffer size =     0.49 MiB
llama_kv_cache:      CUDA0 KV buffer size =  4096.00 MiB
llama_kv_cache: size = 4096.00 MiB ( 32768 cells,  32 layers,  1/1 seqs), K (f16): 2048.00 MiB, V (f16): 2048.00 MiB
sched_reserve:      CUDA0 compute buffer size =   148.01 MiB
sched_reserve:  CUDA_Host compute buffer size =    64.02 MiB
"""


class FakeLibproc:
    """``proc_pid_rusage`` filling in ``ri_phys_footprint`` (or failing, as for a process of another user)."""

    def __init__(self, footprint: int | None) -> None:
        self.footprint, self.calls = footprint, 0

    def proc_pid_rusage(self, pid: int, flavor: int, buffer: Any) -> int:
        self.calls += 1
        if self.footprint is None:
            return -1
        info = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_uint64 * 12)).contents
        info[2 + 7] = self.footprint  # after the 16-byte uuid (two words), the eighth field
        return 0


def test_macos_host_figure_is_the_physical_footprint_which_counts_metal() -> None:
    lib = FakeLibproc(5 * GiB)
    assert phys_footprint(os.getpid(), lib) == 5 * GiB
    figure, rss = host_figure(os.getpid(), platform="darwin", lib=lib)
    assert figure == Figure(5 * GiB, "phys_footprint", True) and 0 < rss < 5 * GiB


def test_macos_without_the_footprint_falls_back_to_rss_which_is_not_authoritative() -> None:
    figure, rss = host_figure(os.getpid(), platform="darwin", lib=FakeLibproc(None))
    assert figure == Figure(rss, "rss", False)
    assert not Footprint(host=figure).authoritative  # Metal memory is not in RSS: the ledger keeps the estimate


def test_linux_rss_is_authoritative_for_a_host_only_server() -> None:
    figure, rss = host_figure(os.getpid(), platform="linux")
    assert figure == Figure(rss, "rss", True) and Footprint(host=figure).authoritative
    assert host_figure(2**22 + 12345)[0] is None  # no such process


def test_backend_bytes_takes_the_last_load_per_backend() -> None:
    buffers = backend_bytes(CUDA_LOG)
    assert buffers["CUDA0"] == round((4026.83 + 4096 + 148.01) * MiB)
    assert buffers["CUDA_Host"] == round((0.49 + 64.02) * MiB) and buffers["CPU_Mapped"] == round(281.81 * MiB)


def test_nvml_per_process_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNVML([24 * GiB, 80 * GiB], {4242: {1: 8860 * MiB}, 7: {0: GiB}}).install(monkeypatch)
    assert gpus.process_memory(4242) == gpus.ProcessMemory({1: 8860 * MiB}, "nvml")
    assert gpus.process_memory(99) == gpus.ProcessMemory({}, "nvml")  # answered: it holds none
    assert [(g.index, g.total_bytes, g.used_bytes) for g in gpus.list_gpus()] == [
        (0, 24 * GiB, GiB),
        (1, 80 * GiB, 8860 * MiB),
    ]


def test_nvidia_smi_is_the_fallback_where_nvml_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_nvml(monkeypatch)
    fake_nvidia_smi(
        tmp_path, monkeypatch, "0, 143771, 9000\\n", apps="4242, 8860, GPU-a\\n77, 10, GPU-a\\n", uuids="0, GPU-a\\n"
    )
    assert gpus.process_memory(4242) == gpus.ProcessMemory({0: 8860 * MiB}, "nvidia-smi")
    assert gpus.list_gpus()[0].total_bytes == 143771 * MiB


def test_no_tool_at_all_means_the_device_cannot_be_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_nvml(monkeypatch)
    fake_nvidia_smi(tmp_path, monkeypatch, None)
    assert gpus.process_memory(4242) is None
    with pytest.raises(gpus.NoGPU):
        gpus.list_gpus()


def test_a_gpu_server_footprint_is_authoritative_only_with_a_device_figure(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(CUDA_LOG)
    measured = measure_process(os.getpid(), log, uses_device=True, device=({0: 8860 * MiB}, "nvml"))
    assert measured.authoritative and measured.device_bytes == 8860 * MiB
    assert measured.status()["device_source"] == "nvml" and measured.status()["devices"]["0"]["source"] == "nvml"
    # llama.cpp's report is a lower bound: the pinned host buffers count on the host side.
    assert measured.host_bytes >= round((281.81 + 0.49 + 64.02) * MiB)
    blind = measure_process(os.getpid(), log, uses_device=True, device=None)
    assert not blind.authoritative
    assert blind.device_bytes == round((4026.83 + 4096 + 148.01) * MiB)  # what the log says: less than nvidia-smi
    assert blind.status()["device_source"] == "llama.cpp log"


def test_a_rotated_log_keeps_the_report_from_load(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(CUDA_LOG)
    first = measure_process(os.getpid(), log)
    log.write_text("srv  update_slots: all slots are idle\n")
    later = keep_report(measure_process(os.getpid(), log), first)
    assert later.buffers == first.buffers and later.report == first.report


def test_context_overhead_is_learned_once_per_gpu() -> None:
    overhead = gpus.ContextOverhead(default=600 * MiB)
    assert overhead.bytes_for([0]) == 600 * MiB
    assert overhead.learn(0, 8860 * MiB, round((4026.83 + 4096 + 148.01) * MiB)) == pytest.approx(589 * MiB, abs=MiB)
    assert overhead.learn(0, 9999 * MiB, MiB) is None  # the first server taught it
    assert overhead.learn(1, MiB, 2 * MiB) is None  # nonsense (buffers above the process) is not learned
    assert overhead.bytes_for([0]) == pytest.approx(589 * MiB, abs=MiB) and overhead.bytes_for([1]) == 600 * MiB
