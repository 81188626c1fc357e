"""A restarted agent and the servers a previous one left running: adopted and held in the ledger even while
memory pressure blocks admissions, or stopped when their unit can no longer run."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from fake_servers import exec_done, server_argv
from memory_harness import MiB, SimulatedHost, make_agent, model_event, phase, running, service, until

from agent.hookspecs import Launch
from agent.processes import supervisor
from agent.processes.ports import free_port
from agent.processes.statefile import ChildRecord, save
from agent.sources.manifest import ModelSpec
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit

pytestmark = pytest.mark.anyio
TOTAL = 512 * MiB


def leftover_server(tmp_path: Path, model: ModelSpec, name: str) -> supervisor.Child:
    """A server a killed agent left behind, with its record in the state file."""
    port = free_port()
    child = exec_done(supervisor.start(Launch(argv=server_argv(port)), port, tmp_path / "left.log"))
    unit = ServingUnit(service=service(name), model=model)
    record = ChildRecord(
        unit.key, unit.spec_hash(), child.pid, child.create_time, child.argv, port, str(child.log_path), "/health"
    )
    save(tmp_path / "state" / "children.json", [record])
    return child


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_leftover_server_is_adopted_and_held_while_pressure_blocks_admissions(tmp_path: Path) -> None:
    event = model_event(tmp_path)
    child = leftover_server(tmp_path, event.obj, "kept")  # type: ignore[arg-type]
    host = SimulatedHost(TOTAL)
    host.leave_available(int(0.15 * TOTAL))  # warning: nothing new is admitted
    agent = make_agent(tmp_path, host=host)
    try:
        async with running(agent) as send:
            send(event)
            send(Event(EventType.ADDED, service("kept")))
            send(Event(EventType.ADDED, service("new")))
            await until(lambda: phase(agent, "kept") == ("Ready", "Adopted"))
            await until(lambda: phase(agent, "new") == ("Pending", "MemoryPressure"))
            assert agent.runtimes["d/kept"].child.pid == child.pid  # type: ignore[union-attr]
            assert agent.ledger.held["d/kept"] > 0 and "d/new" not in agent.ledger.held
    finally:
        await supervisor.stop(child, 2)
    assert gone(child.pid)


async def test_a_leftover_server_whose_unit_cannot_run_is_stopped(tmp_path: Path) -> None:
    event = model_event(tmp_path)
    child = leftover_server(tmp_path, event.obj, "shrunk")  # type: ignore[arg-type]
    host = SimulatedHost(TOTAL)
    agent = make_agent(tmp_path, host=host)
    tiny_budget = ModelSpec(name="m", namespace="d", source=event.obj.source, memory_budget="1Mi")  # type: ignore[union-attr]
    try:
        async with running(agent) as send:
            send(Event(EventType.ADDED, tiny_budget))  # changed while no agent ran: it no longer fits its budget
            send(Event(EventType.ADDED, service("shrunk")))
            await until(lambda: phase(agent, "shrunk") == ("Failed", "InsufficientMemory"))
            await until(lambda: gone(child.pid))
    finally:
        await supervisor.stop(child, 2)
