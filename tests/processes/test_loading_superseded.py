"""A server still loading is stopped at once when its unit is suspended or deleted, whether this agent launched it
or adopted it from a previous one: its reservation goes with it and the unit never shows Ready."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fake_servers import Executors, FakeServer, exec_done, marked_servers, server_argv
from memory_harness import MiB, SimulatedHost, make_agent, model_event, phase, running, service, until

from agent.engine.pipeline import Agent
from agent.hookspecs import Launch
from agent.processes import marker, supervisor
from agent.processes.ports import free_port
from agent.sources.manifest import ModelSpec
from agent.sources.standalone import SYNCED, Event, EventType
from agent.sources.units import ServingUnit

pytestmark = pytest.mark.anyio


def loading_for_ever() -> Executors:
    """A server that answers 503 for ever: only the delete or the suspend can end its start (timeout 300 s)."""
    return Executors(FakeServer("tiny", mode="loading"))


def never_ready(agent: Agent, seen: list[str]) -> bool:
    runtime = agent.runtimes.get("d/a")
    seen.append(runtime.phase if runtime else "")
    return "Ready" not in seen


@pytest.mark.parametrize("change", ["suspended", "deleted"])
async def test_a_loading_server_is_stopped_when_its_unit_is_suspended_or_deleted(tmp_path: Path, change: str) -> None:
    agent = make_agent(tmp_path, loading_for_ever(), host=SimulatedHost(512 * MiB), startup_timeout=300)
    seen: list[str] = []
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("a")))
        await until(lambda: phase(agent, "a")[0] == "Starting", agent=agent)
        child = agent.runtimes["d/a"].child
        assert child is not None and agent.ledger.held["d/a"] > 0
        if change == "suspended":
            send(Event(EventType.MODIFIED, dataclasses.replace(service("a"), suspend=True)))
            await until(lambda: phase(agent, "a") == ("Stopped", "Suspended") and never_ready(agent, seen), 2)
        else:
            send(Event(EventType.DELETED, service("a")))
            await until(lambda: "d/a" not in agent.runtimes and never_ready(agent, seen), 2)
        assert not child.running() and "d/a" not in agent.ledger.held and agent.ledger.used == 0
        assert marked_servers(tmp_path / "state") == []
    assert "Ready" not in seen


async def test_an_adopted_server_still_loading_is_stopped_when_its_unit_is_deleted(tmp_path: Path) -> None:
    model = model_event(tmp_path).obj
    assert isinstance(model, ModelSpec)
    unit = ServingUnit(service=service("a"), model=model)
    port = free_port()
    mark = marker.child_env(marker.state_id(tmp_path / "state"), unit.key, unit.spec_hash(), port, "/health")
    child = exec_done(
        supervisor.start(Launch(argv=server_argv(port, "loading")), port, tmp_path / "left.log", mark=mark)
    )
    agent = make_agent(tmp_path, loading_for_ever(), host=SimulatedHost(512 * MiB), startup_timeout=300)
    try:
        async with running(agent) as send:
            send(model_event(tmp_path))
            send(Event(EventType.ADDED, service("a")))
            send(SYNCED)
            await until(lambda: phase(agent, "a") == ("Starting", "Adopted"), agent=agent)
            send(Event(EventType.DELETED, service("a")))
            await until(lambda: not child.running() and "d/a" not in agent.runtimes, 2)
            assert agent.ledger.used == 0 and marked_servers(tmp_path / "state") == []
    finally:
        await supervisor.stop(child, 1)


@pytest.mark.parametrize("change", ["suspended", "deleted"])
async def test_a_ready_server_that_takes_its_grace_period_to_stop_never_shows_ready_meanwhile(
    tmp_path: Path, change: str
) -> None:
    agent = make_agent(tmp_path, Executors(FakeServer("tiny", mode="stubborn")), host=SimulatedHost(512 * MiB))
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("a")))
        await until(lambda: phase(agent, "a") == ("Ready", "Ready"), agent=agent)
        child = agent.runtimes["d/a"].child
        assert child is not None
        if change == "suspended":
            send(Event(EventType.MODIFIED, dataclasses.replace(service("a"), suspend=True)))
        else:
            send(Event(EventType.DELETED, service("a")))
        # It ignores SIGTERM, so it runs on until the SIGKILL at the end of the grace period (2 s): meanwhile the
        # unit says it is stopping, and nothing says Ready.
        await until(lambda: phase(agent, "a")[0] == "Stopping", 2, agent=agent)
        assert child.running()
        assert agent.status()["units"][0]["phase"] == "Stopping"
        if change == "suspended":
            await until(lambda: phase(agent, "a") == ("Stopped", "Suspended"), 10, agent=agent)
        else:
            await until(lambda: "d/a" not in agent.runtimes, 10, agent=agent)
        assert not child.running() and agent.ledger.used == 0
