"""``contextSize: auto``: the largest context that fits the unit's budget and the ledger's free memory now."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anyio
import pytest
from memory_harness import MiB, SimulatedHost, make_agent, running, until

from agent.cli import main
from agent.engine.pipeline import Agent
from agent.estimate.estimator import estimate, max_ctx_size
from agent.estimate.gguf_shape import load_shape
from agent.estimate.shape import ServeSettings
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.memory.context_auto import choose, largest_context
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "m.gguf", TinyShape())


def test_one_slot_is_the_estimators_largest_context(model: Path) -> None:
    shape = load_shape(model)
    for limit in (40 * MiB, 55 * MiB, 70 * MiB, 1 << 30):
        assert largest_context(shape, ServeSettings(), limit) == max_ctx_size(shape, ServeSettings(), limit)
    assert largest_context(shape, ServeSettings(), 1 << 30) == shape.context_length  # capped by training context
    assert largest_context(shape, ServeSettings(), 1 * MiB) == 0


def test_slots_each_get_a_multiple_of_256_up_to_the_training_context(model: Path) -> None:
    shape = load_shape(model)
    settings = ServeSettings(parallel=3)
    assert largest_context(shape, settings, 1 << 30) == 3 * shape.context_length  # llama.cpp splits it 3 ways
    limit = 60 * MiB
    chosen = largest_context(shape, settings, limit)
    assert chosen % (3 * 256) == 0 and chosen > 0
    assert estimate(shape, dataclasses.replace(settings, ctx_size=chosen)).total_bytes <= limit
    assert estimate(shape, dataclasses.replace(settings, ctx_size=chosen + 3 * 256)).total_bytes > limit


def test_never_below_the_minimum(model: Path) -> None:
    shape = load_shape(model)
    service = ServiceSpec("s", "d", "m", context_auto=True, min_context_size=2048)
    unit = ServingUnit(service, ModelSpec("m", "d", str(model)))
    assert choose(unit, shape, 1 * MiB) == 2048  # nothing fits: it asks for the minimum and waits
    default = dataclasses.replace(unit, service=dataclasses.replace(service, min_context_size=None))
    assert choose(default, shape, 1 * MiB) == 4096


def agent_with(tmp_path: Path, host: SimulatedHost, fraction: float) -> Agent:
    # No probes while the test runs: the ledger holds each server's footprint measured at load, and nothing moves it.
    return make_agent(tmp_path, host=host, memory_fraction=fraction, probe_interval=3600)


def events(model: Path, name: str, budget: str, **spec: object) -> list[Event]:
    model_spec = ModelSpec(name=name, namespace="d", source=str(model), memory_budget=budget)
    service = ServiceSpec(name=name, namespace="d", model_ref=name, runtime="tiny", context_auto=True, **spec)  # type: ignore[arg-type]
    return [Event(EventType.ADDED, model_spec), Event(EventType.ADDED, service)]


def unit_status(agent: Agent, name: str) -> dict[str, object]:
    return next((u for u in agent.status()["units"] if u["unit"] == f"d/{name}"), {"phase": "", "reason": ""})


@pytest.mark.anyio
async def test_auto_picks_what_estimate_reports_then_what_the_ledger_leaves(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await anyio.to_thread.run_sync(main, ["estimate", str(model), "--memory-budget", "60Mi", "--json"])
    assert code in (0, 1), capsys.readouterr().err
    reported = json.loads(capsys.readouterr().out)["max_ctx_size"]
    assert 256 <= reported < 4096
    host = SimulatedHost(1024 * MiB)
    agent = agent_with(tmp_path, host, fraction=0.1)  # 102 MiB for all units
    async with running(agent) as send:
        for event in events(model, "first", "60Mi", min_context_size=256, extra_args=("40",)):  # holds 40 MiB more
            send(event)
        await until(lambda: unit_status(agent, "first")["phase"] == "Ready", agent=agent)
        first = unit_status(agent, "first")
        assert first["context_size"] == reported
        assert first["estimate"]["total"] <= 60 * MiB  # type: ignore[index]
        # The second has the same budget, but the ledger has less than that left: a smaller context.
        free = agent.ledger.free_for("d/second")
        assert free < 60 * MiB
        for event in events(model, "second", "60Mi", min_context_size=256):
            send(event)
        await until(lambda: unit_status(agent, "second")["phase"] == "Ready", agent=agent)
        second = unit_status(agent, "second")
        assert second["context_size"] == max_ctx_size(load_shape(model), ServeSettings(), free) < reported
        # A minimum the free memory cannot give: it waits (Pending), it does not start smaller.
        for event in events(model, "third", "60Mi", min_context_size=2048):
            send(event)
        await until(lambda: unit_status(agent, "third")["reason"] == "InsufficientMemory", agent=agent)
        assert unit_status(agent, "third")["phase"] == "Pending"
        assert unit_status(agent, "first")["context_size"] == reported  # kept while it runs


def test_the_sized_unit_is_the_same_unit_to_the_pipeline(model: Path) -> None:
    from agent.memory.context_auto import sized

    unit = ServingUnit(ServiceSpec("s", "d", "m", context_auto=True), ModelSpec("m", "d", str(model)))
    chosen_unit, chosen = sized(unit, model, 1 << 30)
    assert chosen == 4096 and chosen_unit.settings.ctx_size == 4096
    assert chosen_unit.spec_hash() == unit.spec_hash()  # not a spec change: the server it starts is kept
    fixed = ServingUnit(ServiceSpec("s", "d", "m", context_size=1024), ModelSpec("m", "d", str(model)))
    assert sized(fixed, model, 1 << 30) == (fixed, None)


def test_the_context_shown_is_the_one_the_server_runs_with(tmp_path: Path) -> None:
    from agent.engine.ondemand import running_context
    from agent.processes.supervisor import Child

    def child(*argv: str) -> Child:
        return Child(1, 8080, list(argv), tmp_path / "log", 0.0)

    assert running_context(child("llama-server", "-m", "m.gguf", "--ctx-size", "6144", "--parallel", "2")) == 6144
    assert running_context(child("llama-server", "-c", "512")) == 512
    assert running_context(child("mlx_lm.server", "--model", "m")) is None
    assert running_context(child("llama-server", "--ctx-size")) is None
    assert running_context(None) is None
