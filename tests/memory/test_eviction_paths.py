"""Eviction paths beyond the common one: a server still starting, eviction switched off, a shrinking host budget,
and the macOS kernel level alone. Real server processes; host memory simulated."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import psutil
import pytest
from fake_servers import Executors, FakeServer
from memory_harness import MiB, SimulatedHost, TinyPlugin, make_agent, model_event, phase, running, service, until

from agent.engine.memory_guard import MemoryGuard
from agent.memory.pressure import Sample
from agent.sources.standalone import Event, EventType

pytestmark = pytest.mark.anyio
TOTAL = 512 * MiB


class Plugin(Executors):
    """Runtime ``loading``: a server that stays "loading" (503) for as long as it runs."""

    def __init__(self) -> None:
        super().__init__(FakeServer("loading", mode="loading"))


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_server_still_starting_is_evicted_without_waiting_for_its_startup_timeout(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    # startup timeout 300 s: the test would time out if the eviction waited
    agent = make_agent(tmp_path, TinyPlugin(), Plugin(), host=host, startup_timeout=300)
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("ready")))
        await until(lambda: phase(agent, "ready")[0] == "Ready")
        loading = dataclasses.replace(service("loading", priority="batch"), runtime="loading")
        send(Event(EventType.ADDED, loading))
        await until(lambda: phase(agent, "loading")[0] == "Starting")
        pid = agent.runtimes["d/loading"].child.pid  # type: ignore[union-attr]
        host.leave_available(int(0.10 * TOTAL) - MiB)
        await until(lambda: phase(agent, "loading") == ("Pending", "Evicted"))
        assert gone(pid) and phase(agent, "ready")[0] == "Ready"  # the batch unit went first


async def test_without_eviction_critical_pressure_only_blocks(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, TinyPlugin(), Plugin(), host=host, startup_timeout=300, eviction=False)
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("a", priority="batch")))
        await until(lambda: phase(agent, "a")[0] == "Ready")
        host.leave_available(int(0.05 * TOTAL))
        await until(lambda: agent.status()["pressure"]["level"] == "critical")
        send(Event(EventType.ADDED, service("b")))
        await until(lambda: phase(agent, "b") == ("Pending", "MemoryPressure"))
        calls = host.calls
        await until(lambda: host.calls >= calls + 10)
        assert phase(agent, "a")[0] == "Ready" and agent.admission.counts["evicted"] == 0
        assert agent.status()["pressure"]["eviction"] is False


async def test_a_shrinking_host_budget_evicts_the_lowest_priority_until_reservations_fit(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, TinyPlugin(), Plugin(), host=host, startup_timeout=300, memory_fraction=0.5)  # 256 MiB
    async with running(agent) as send:
        send(model_event(tmp_path))
        for name, priority in (("critical", "critical"), ("low", "low"), ("batch", "batch")):
            send(Event(EventType.ADDED, service(name, priority, ballast_mib=30)))
        await until(lambda: all(phase(agent, n)[0] == "Ready" for n in ("critical", "low", "batch")))
        held = dict(agent.ledger.held)
        # The host shrinks (a lower cgroup limit): the budget is now just below what the three hold together.
        new_total = 2 * (sum(held.values()) - 1)
        host.total, host.foreign = new_total, 0
        await until(lambda: phase(agent, "batch") == ("Pending", "Evicted"))
        assert "host budget shrank" in agent.runtimes["d/batch"].message
        assert phase(agent, "critical")[0] == "Ready" and phase(agent, "low")[0] == "Ready"
        assert agent.ledger.capacity == new_total // 2 and agent.ledger.used <= agent.ledger.capacity


def test_the_kernel_level_alone_frees_one_unit_at_a_time(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, TinyPlugin(), Plugin(), host=SimulatedHost(TOTAL), startup_timeout=300)
    guard: MemoryGuard = agent.memory
    assert guard.to_free(Sample(TOTAL, TOTAL // 2, kernel_level=4)) == 1  # plenty available, kernel critical
    assert guard.to_free(Sample(TOTAL, TOTAL // 2, kernel_level=2)) == 0
    assert guard.to_free(Sample(TOTAL, int(0.10 * TOTAL) - MiB)) == MiB + 1
