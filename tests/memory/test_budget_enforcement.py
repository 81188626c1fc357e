"""After load the budget still holds: a server over its own budget is stopped (enforce) or warned about (warn),
and one whose footprint takes the host ledger over the host budget evicts by the usual order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from memory_harness import MiB, SimulatedHost, make_agent, phase, running, service, until

from agent.estimate.preflight import Mode
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.sources.manifest import ModelSpec
from agent.sources.standalone import Event, EventType


def model(tmp_path: Path, budget: str) -> Event:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    return Event(EventType.ADDED, ModelSpec(name="m", namespace="d", source=str(path), memory_budget=budget))


@pytest.mark.anyio
async def test_a_server_that_outgrows_its_budget_is_stopped_in_enforce_mode(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, host=SimulatedHost(4096 * MiB), memory_fraction=0.5)
    async with running(agent) as send:
        send(model(tmp_path, "64Mi"))  # the estimate fits 64 MiB; the server then holds 80 MiB more than that
        send(Event(EventType.ADDED, service("greedy", ballast_mib=80)))
        await until(lambda: phase(agent, "greedy") == ("Failed", "ExceedsBudget"), agent=agent)
        runtime = agent.runtimes["d/greedy"]
        assert runtime.child is None and not agent.ledger.held
        assert "exceeds its budget 64.0 MiB" in runtime.message and "host from rss" in runtime.message
        assert "memoryBudget" in runtime.message  # what to change
        assert agent.metrics.registry.get_sample_value("metal_agent_rejections_total", {"reason": "ExceedsBudget"}) == 1


@pytest.mark.anyio
async def test_warn_mode_keeps_it_with_a_warning(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, host=SimulatedHost(4096 * MiB), memory_fraction=0.5, mode=Mode.WARN)
    async with running(agent) as send:
        send(model(tmp_path, "64Mi"))
        send(Event(EventType.ADDED, service("greedy", ballast_mib=80)))
        await until(lambda: (agent.runtimes.get("d/greedy") is not None and agent.runtimes["d/greedy"].warning
                             is not None and phase(agent, "greedy")[0] == "Ready"), agent=agent)  # fmt: skip
        warning = agent.runtimes["d/greedy"].warning
        assert warning is not None and warning["reason"] == "ExceedsBudget" and "64.0 MiB" in warning["message"]


@pytest.mark.anyio
async def test_a_footprint_over_the_host_budget_evicts_by_priority(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path, host=SimulatedHost(4096 * MiB), memory_fraction=0.06
    )  # a 245 MiB host budget, and no memory pressure
    async with running(agent) as send:
        send(model(tmp_path, "512Mi"))
        send(Event(EventType.ADDED, service("low", "low")))
        await until(lambda: phase(agent, "low")[0] == "Ready", agent=agent)
        send(Event(EventType.ADDED, service("high", "high", ballast_mib=220)))  # far above its reservation
        await until(lambda: phase(agent, "low") == ("Pending", "Evicted"), agent=agent)
        assert "took the host ledger to" in agent.runtimes["d/low"].message
        assert phase(agent, "high")[0] == "Ready"


@pytest.mark.anyio
async def test_a_server_stopped_for_its_own_budget_evicts_nobody(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, host=SimulatedHost(4096 * MiB), memory_fraction=0.06)  # a 245 MiB host budget
    async with running(agent) as send:
        send(model(tmp_path, "512Mi"))
        small = write_tiny_gguf(tmp_path / "g.gguf", TinyShape())
        send(Event(EventType.ADDED, ModelSpec(name="g", namespace="d", source=str(small), memory_budget="64Mi")))
        send(Event(EventType.ADDED, service("low", "low")))
        await until(lambda: phase(agent, "low")[0] == "Ready", agent=agent)
        greedy = dataclasses.replace(service("greedy", "high", ballast_mib=220), model_ref="g")
        send(Event(EventType.ADDED, greedy))  # over its own 64 MiB and over the host ledger
        await until(lambda: phase(agent, "greedy") == ("Failed", "ExceedsBudget"), agent=agent)
        assert phase(agent, "low") == ("Ready", "Ready") and agent.admission.counts["evicted"] == 0
