"""Memory in the running pipeline, with real server processes and a simulated host memory provider.

Pressure is simulated by the provider (a foreign process's share of a fixed total); the servers, their RSS and
their eviction are real.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory_harness import MiB, SimulatedHost, make_agent, model_event, phase, running, service, until

from agent.engine.pipeline import Agent
from agent.sources.manifest import PRIORITIES
from agent.sources.standalone import Event, EventType

TOTAL = 512 * MiB


def alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def ready(agent: Agent, *names: str) -> bool:
    return all(phase(agent, n)[0] == "Ready" for n in names)


@pytest.mark.anyio
async def test_critical_pressure_evicts_by_priority_then_size_only_as_needed_then_recovers(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, host=host)
    names = ("batch-small", "batch-big", "protected", "critical", "normal")
    units = [
        service("batch-small", "batch"),
        service("batch-big", "batch", ballast_mib=30),
        service("protected", "batch", protected=True),
        service("critical", "critical"),
        service("normal", "normal"),
    ]
    async with running(agent) as send:
        send(model_event(tmp_path))
        for unit in units:
            send(Event(EventType.ADDED, unit))
        await until(lambda: ready(agent, *names))
        pids = {n: agent.runtimes[f"d/{n}"].child.pid for n in names}  # type: ignore[union-attr]
        # Just below the critical line (10 % of 512 MiB): one server's worth is enough, the biggest batch one.
        host.leave_available(int(0.10 * TOTAL) - MiB)
        await until(lambda: phase(agent, "batch-big") == ("Pending", "Evicted"))
        calls = host.calls
        await until(lambda: host.calls >= calls + 10)  # several more samples: nobody else is evicted
        assert not alive(pids["batch-big"])
        assert ready(agent, "batch-small", "protected", "critical", "normal")
        message = agent.runtimes["d/batch-big"].message
        assert "critical memory pressure" in message and "available" in message and "of 512.0 MiB" in message
        assert agent.status()["pressure"]["level"] != "normal"  # hysteresis: admissions stay blocked
        # Deeper: short by a little more than the other batch server holds, so it is not enough alone. Next in
        # order: that batch unit, then normal; protected and critical stay.
        host.leave_available(int(0.10 * TOTAL) - agent.ledger.held["d/batch-small"] - MiB)
        await until(lambda: phase(agent, "normal") == ("Pending", "Evicted"))
        calls = host.calls
        await until(lambda: host.calls >= calls + 10)
        assert phase(agent, "batch-small") == ("Pending", "Evicted")
        assert ready(agent, "protected", "critical")
        assert agent.admission.counts["evicted"] == 3
        assert agent.metrics.registry.get_sample_value("metal_agent_evictions_total", {"reason": "MemoryPressure"}) == 3
        # Pressure gone: every evicted unit comes back through the queue, with new processes.
        host.foreign = 0
        await until(lambda: ready(agent, *names))
        assert agent.status()["pressure"]["level"] == "normal"
        assert all(agent.runtimes[f"d/{n}"].child.pid != pids[n] for n in ("batch-big", "batch-small", "normal"))  # type: ignore[union-attr]
        assert agent.ledger.used <= agent.ledger.capacity


@pytest.mark.anyio
async def test_warning_pressure_holds_new_units_until_it_clears(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, host=host)
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("first")))
        await until(lambda: ready(agent, "first"))
        host.leave_available(int(0.15 * TOTAL))  # warning, not critical: nothing is evicted
        await until(lambda: agent.status()["pressure"]["level"] == "warning")
        send(Event(EventType.ADDED, service("second")))
        await until(lambda: phase(agent, "second") == ("Pending", "MemoryPressure"))
        assert "memory pressure is warning" in agent.runtimes["d/second"].message
        assert ready(agent, "first") and agent.runtimes["d/second"].child is None
        host.foreign = 0
        await until(lambda: ready(agent, "first", "second"))


@pytest.mark.anyio
async def test_a_foreign_process_eating_memory_makes_admission_wait(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, host=host, pressure_warning=0.05, pressure_critical=0.02)
    async with running(agent) as send:
        send(model_event(tmp_path))
        host.leave_available(40 * MiB)  # no pressure (above 5 %), but less than the unit's estimate
        send(Event(EventType.ADDED, service("a")))
        await until(lambda: phase(agent, "a") == ("Pending", "InsufficientMemory"))
        assert "another process" in agent.runtimes["d/a"].message and agent.ledger.used == 0
        host.foreign = 0  # the foreign process exits: the watchdog's next sample admits the unit
        await until(lambda: ready(agent, "a"))


@pytest.mark.anyio
async def test_a_unit_bigger_than_the_host_budget_fails_and_says_it_can_never_fit(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, host=host, memory_fraction=0.05)  # 25.6 MiB: less than any unit's estimate
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("huge")))
        await until(lambda: phase(agent, "huge")[0] == "Failed")
        assert phase(agent, "huge")[1] == "InsufficientMemory"
        assert "can never fit" in agent.runtimes["d/huge"].message and not agent.admission.waiting


@pytest.mark.anyio
async def test_measured_footprint_replaces_the_estimate_and_an_overrun_is_flagged(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, host=host)
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("lean")))
        send(Event(EventType.ADDED, service("greedy", ballast_mib=120)))  # far above its estimate
        await until(lambda: ready(agent, "lean", "greedy"))
        lean, greedy = agent.runtimes["d/lean"], agent.runtimes["d/greedy"]
        estimate = greedy.verdict.estimate.total_bytes  # type: ignore[union-attr]
        await until(lambda: greedy.warning is not None)
        assert greedy.warning["reason"] == "ExceedsReservation"  # type: ignore[index]
        assert agent.ledger.held["d/greedy"] >= greedy.actual["rss"] > estimate
        assert lean.warning is None and agent.ledger.held["d/lean"] == max(
            lean.actual["rss"], agent.ledger.held["d/lean"]
        )
        assert agent.status()["units"][0]["warning"] is not None  # d/greedy sorts first


@pytest.mark.anyio
async def test_waiting_units_start_by_priority_when_memory_frees(tmp_path: Path) -> None:
    host = SimulatedHost(TOTAL)
    # Room for one unit at a time: 76.8 MiB; each is estimated at about 44 MiB and measures about 60 once loaded.
    agent = make_agent(tmp_path, host=host, memory_fraction=0.15)
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("first", ballast_mib=40)))
        await until(lambda: ready(agent, "first"))
        for name, priority in (("low", "low"), ("high", "high"), ("batch", "batch")):
            send(Event(EventType.ADDED, service(name, priority, ballast_mib=40)))
            await until(lambda name=name: phase(agent, name) == ("Pending", "InsufficientMemory"))  # type: ignore[misc]
        assert agent.status()["admission"]["waiting"] == ["d/high", "d/low", "d/batch"]
        send(Event(EventType.DELETED, service("first", ballast_mib=40)))
        await until(lambda: ready(agent, "high"))
        assert phase(agent, "low")[0] == "Pending" and phase(agent, "batch")[0] == "Pending"
        send(Event(EventType.DELETED, service("high")))
        await until(lambda: ready(agent, "low"))
        assert phase(agent, "batch")[0] == "Pending"
        for name in ("low", "batch"):
            send(Event(EventType.DELETED, service(name)))
        await until(lambda: not agent.runtimes)
        assert agent.ledger.used == 0 and not agent.admission.waiting


OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["add", "delete", "pause"]), st.integers(0, 4), st.sampled_from(PRIORITIES)),
    min_size=1,
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, fraction=st.sampled_from([0.1, 0.2, 0.35]))
def test_random_arrivals_and_deletions_through_the_pipeline_never_over_commit(
    operations: list[tuple[str, int, str]], fraction: float
) -> None:
    """The real pipeline and real servers: reservations stay within the budget at every moment, and once every
    unit is deleted nothing is held, nothing waits and no server is left."""

    async def scenario(folder: Path) -> None:
        host = SimulatedHost(TOTAL)
        agent = make_agent(folder, host=host, memory_fraction=fraction)
        seen_pids: set[int] = set()
        worst = 0

        async def watch() -> None:
            nonlocal worst
            while True:
                ledger = agent.ledger
                leaving = sum(ledger.held.get(k, 0) for k in agent.admission.evicting)
                worst = max(worst, ledger.used - leaving - ledger.capacity)
                seen_pids.update(r.child.pid for r in agent.runtimes.values() if r.child)
                await anyio.sleep(0.005)

        async with running(agent) as send, anyio.create_task_group() as watcher:
            watcher.start_soon(watch)
            send(model_event(folder))
            live: set[int] = set()
            for op, index, priority in operations:
                if op == "pause":
                    await anyio.sleep(0.1)  # lets starts and loads interleave with the next events
                elif op == "add":
                    send(Event(EventType.ADDED, service(f"u{index}", priority)))
                    live.add(index)
                else:
                    send(Event(EventType.DELETED, service(f"u{index}", priority)))
                    live.discard(index)
            settled = ("Ready", "Pending", "Failed")
            await until(
                lambda: send.delivered() and all(phase(agent, f"u{i}")[0] in settled for i in live), agent=agent
            )
            for index in range(5):
                send(Event(EventType.DELETED, service(f"u{index}")))
            await until(lambda: send.delivered() and not agent.runtimes, agent=agent)  # the deletions applied
            watcher.cancel_scope.cancel()
        assert worst <= 0, f"reservations exceeded the budget by {worst} bytes"
        assert agent.ledger.used == 0 and not agent.ledger.held
        assert not agent.admission.waiting and not agent.admission.holders and not agent.admission.loading
        assert not [pid for pid in seen_pids if alive(pid)]

    with tempfile.TemporaryDirectory() as folder:
        anyio.run(scenario, Path(folder))
