"""The agent's status document: what /status serves, ``metal-agent status`` shows and /metrics reads its gauges from.

One snapshot, built on demand from the agent's live state: the host budget and what the ledger holds; per unit its
phase, reason and message, what the ledger holds for it and where that figure comes from, its reservations on
GPUs, its context size and on-demand state; then the manifest errors, the source's and the reporter's counters,
memory pressure and the admission queue, the state file's health and the CUDA context overhead. Building it only
reads and never awaits, so a scraper may ask at any moment, however often, and sees one consistent moment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.engine.unit_state import UnitRuntime
from agent.estimate.hostmem import detect_host_memory
from agent.memory import gpus

if TYPE_CHECKING:
    from agent.engine.pipeline import Agent


def agent_status(agent: Agent) -> dict[str, Any]:
    host = detect_host_memory(agent.config.host_memory)
    ledger = agent.ledger
    return {
        "host": {
            "total_bytes": host.total_bytes,
            "available_bytes": host.available_bytes,
            "budget_bytes": ledger.capacity,
            "reserved_bytes": ledger.used,
            "budget_source": "agent" if agent.config.memory_fraction else "adaptive",
        },
        "units": [unit_status(agent, runtime) for runtime in sorted(agent.runtimes.values(), key=lambda r: r.key)],
        "manifest_errors": dict(agent.source_errors),
        **({"watch": agent.source_status()} if agent.source_status else {}),
        **({"report": agent.report_status()} if agent.report_status else {}),
        **agent.memory.status(),
        **agent.handover.state.status(),
        "cuda_context_overhead": gpus.CONTEXT_OVERHEAD.status(),
    }


def unit_status(agent: Agent, runtime: UnitRuntime) -> dict[str, Any]:
    """One unit's entry: its own status, what the ledgers hold for it, and its on-demand and context fields."""
    gpu_holdings = {
        str(index): ledger.held[runtime.key]
        for index, ledger in sorted(agent.admission.gpu_ledgers.items())
        if runtime.key in ledger.held
    }
    return {
        **runtime.status(),
        "reserved_bytes": agent.ledger.held.get(runtime.key, 0),
        "reserved_from": reserved_from(runtime),
        "reserved_gpu_bytes": gpu_holdings or None,
        **agent.ondemand.unit_status(runtime),
    }


def reserved_from(runtime: UnitRuntime) -> str:
    """What the ledger holds for a unit: its estimate, its measurement, or the larger of the two."""
    footprint = runtime.footprint
    if footprint is None:
        return "estimate"
    return "measured" if footprint.authoritative else "max(estimate, measured)"
