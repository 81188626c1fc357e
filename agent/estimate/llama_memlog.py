"""What llama.cpp says it allocated, read from its log.

After load, llama.cpp prints each buffer it allocated (weights, KV cache, output, compute) per backend. These
lines are the ground truth the estimate is checked against, and what the status reports as *actual* memory.
Its ``--fit`` step may print a dry run with empty buffers first, so the last report of each kind wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MiB = 1 << 20

_MODEL = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_KV = re.compile(
    r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers,\s+(\d+)/(\d+) seqs\), "
    r"K \((\w+)\):\s+([\d.]+) MiB, V \((\w+)\):\s+([\d.]+) MiB"
)
# Recurrent layers (mamba, RWKV, hybrids' SSM layers) keep a per-sequence state instead of a KV cache.
_STATE = re.compile(r"llama_memory_recurrent: size =\s+([\d.]+) MiB")
_OUTPUT = re.compile(r"llama_context:\s+(\S+)\s+output buffer size =\s+([\d.]+) MiB")
_KV_BUFFER = re.compile(r"(\S+) KV buffer size =\s+([\d.]+) MiB")
_LOAD_START = "load_tensors: loading model tensors"
_COMPUTE = re.compile(r"(?:sched_reserve|llama_context):\s+(\S+) compute buffer size =\s+([\d.]+) MiB")


def mib_to_bytes(text: str) -> int:
    return round(float(text) * MiB)


def as_printed(n_bytes: int) -> str:
    """Bytes as llama.cpp prints them (MiB, two decimals), so an estimate can be compared with a log exactly."""
    return f"{n_bytes / MiB:.2f}"


@dataclass(frozen=True)
class KVReport:
    bytes: int
    cells: int
    layers: int
    k_type: str
    k_bytes: int
    v_type: str
    v_bytes: int
    size_text: str  # as printed, e.g. "24.00"


@dataclass(frozen=True)
class LlamaMemoryReport:
    model_bytes: int | None = None
    kv: tuple[KVReport, ...] = ()  # one per cache (a sliding-window model has two)
    state_bytes: int | None = None  # recurrent state (SSM/RWKV layers); None when the model has none
    state_text: str | None = None  # as printed
    output_bytes: int | None = None
    compute_bytes: int | None = None

    @property
    def kv_bytes(self) -> int | None:
        return sum(r.bytes for r in self.kv) if self.kv else None

    @property
    def memory_bytes(self) -> int | None:
        """KV cache plus recurrent state: what the estimate's ``kv_cache`` term covers."""
        if self.kv_bytes is None and self.state_bytes is None:
            return None
        return (self.kv_bytes or 0) + (self.state_bytes or 0)

    @property
    def total_bytes(self) -> int | None:
        parts = (self.model_bytes, self.memory_bytes, self.output_bytes, self.compute_bytes)
        if any(p is None for p in parts):
            return None
        return sum(p for p in parts if p is not None)


def _sum_last_block(matches: list[re.Match[str]], group: int) -> int | None:
    """Sum one report's buffers across backends (CPU + Metal, CUDA0 + CUDA1 ...); a new report starts over."""
    if not matches:
        return None
    seen: dict[str, int] = {}
    for m in matches:
        backend = m.group(1)
        if backend in seen:  # the same backend again: a later report (dry run first), start over
            seen = {}
        seen[backend] = mib_to_bytes(m.group(group))
    return sum(seen.values())


def last_load(text: str) -> str:
    """The part of the log from the last model load on: earlier loads (a dry run, a reload) do not count."""
    cut = text.rfind(_LOAD_START)
    return text[cut:] if cut >= 0 else text


def parse_memory_log(text: str) -> LlamaMemoryReport:
    text = last_load(text)
    kv = tuple(
        KVReport(
            bytes=mib_to_bytes(m.group(1)),
            cells=int(m.group(2)),
            layers=int(m.group(3)),
            k_type=m.group(6),
            k_bytes=mib_to_bytes(m.group(7)),
            v_type=m.group(8),
            v_bytes=mib_to_bytes(m.group(9)),
            size_text=m.group(1),
        )
        for m in _KV.finditer(text)
    )
    state = list(_STATE.finditer(text))
    return LlamaMemoryReport(
        model_bytes=_sum_last_block(list(_MODEL.finditer(text)), 2),
        kv=kv,
        state_bytes=mib_to_bytes(state[-1].group(1)) if state else None,
        state_text=state[-1].group(1) if state else None,
        output_bytes=_sum_last_block(list(_OUTPUT.finditer(text)), 2),
        compute_bytes=_sum_last_block(list(_COMPUTE.finditer(text)), 2),
    )


def backend_bytes(text: str) -> dict[str, int]:
    """Bytes llama.cpp allocated per backend (``CPU``, ``CUDA0``, ``CUDA_Host``, ``Metal``...) in its last load:
    weights, KV, output and compute buffers together. On CUDA the ``CUDA<n>`` backends are device memory,
    everything else host memory."""
    text = last_load(text)
    totals: dict[str, int] = {}
    for pattern, group in ((_MODEL, 2), (_KV_BUFFER, 2), (_OUTPUT, 2), (_COMPUTE, 2)):
        block: dict[str, int] = {}
        for m in pattern.finditer(text):
            if m.group(1) in block:  # a later report of the same kind (a dry run first): start over
                block = {}
            block[m.group(1)] = mib_to_bytes(m.group(group))
        for backend, value in block.items():
            totals[backend] = totals.get(backend, 0) + value
    return totals
