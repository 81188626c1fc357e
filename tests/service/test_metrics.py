"""/metrics of an in-process Agent with its API served, scraped over HTTP and parsed with prometheus_client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from anyio.streams.memory import MemoryObjectSendStream
from fake_servers import FakeServer
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from agent.engine.pipeline import Agent
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.hookspecs import Executor, hookimpl
from agent.processes.ports import free_port
from agent.service.api import serve
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit
from agent.testing import build_agent

pytestmark = pytest.mark.anyio


class Plugin:
    """The test executors, and a reporter that records every status the pipeline reports."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("healthy"))
        register(FakeServer("crashing", mode="crash", runtime="crash"))

    @hookimpl
    def report(self, unit: ServingUnit | None, status: dict[str, Any]) -> None:
        self.reports.append(status)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class Scraper:
    def __init__(self, base: str, send: MemoryObjectSendStream[Event], agent: Agent) -> None:
        self.base, self.send, self.agent = base, send, agent

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
        async with aiohttp.ClientSession() as session, session.get(self.base + path, headers=headers) as response:
            assert response.status == 200
            return await response.text(), response.headers["Content-Type"]

    async def metrics(self) -> Samples:
        text, content_type = await self.get("/metrics")
        assert content_type.startswith("text/plain")
        return parse(text)

    async def status(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.base + "/status") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def snapshot(self) -> tuple[Samples, dict[str, Any]]:
        """/metrics and /status of one moment: a health probe every 0.05 s measures the server again, so the
        pair is read until no measured value moved while /status was read."""
        measured = ("metal_agent_unit_actual_bytes", "metal_agent_unit_reserved_bytes", "metal_agent_reserved_bytes")
        for _ in range(100):
            samples, status = await self.metrics(), await self.status()
            after = await self.metrics()
            if all(samples.get(key) == after.get(key) for key in {*samples, *after} if key[0] in measured):
                return samples, status
        raise AssertionError("the measured memory moved on every read")


def make_agent(tmp_path: Path, plugin: Plugin, **overrides: Any) -> Agent:
    return build_agent(
        tmp_path / "state", plugin, startup_timeout=10, grace_period=1, probe_interval=0.05,
        host_memory=16 << 30, memory_fraction=0.004, model_roots=(tmp_path,), **overrides,
    )  # fmt: skip


@asynccontextmanager
async def served(agent: Agent) -> AsyncIterator[Scraper]:
    send, receive = anyio.create_memory_object_stream[Event](100)
    port = free_port()
    runner = await serve(agent, "127.0.0.1", port)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(agent.run, receive)
            try:
                yield Scraper(f"http://127.0.0.1:{port}", send, agent)
            finally:
                with anyio.CancelScope(shield=True):
                    await agent.shutdown()
                tasks.cancel_scope.cancel()
    finally:
        await runner.cleanup()


async def until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)  # between checks of the condition


def phase(agent: Agent, key: str) -> tuple[str, str]:
    runtime = agent.runtimes.get(key)
    return (runtime.phase, runtime.reason) if runtime else ("", "")


def unit_events(
    tmp_path: Path, name: str, runtime: str, budget: str = "512Mi", model: Path | None = None
) -> list[Event]:
    if model is None:
        model = tmp_path / f"{name}.gguf"
        write_tiny_gguf(model, TinyShape(n_layer=2, n_embd=64))
    spec = ModelSpec(name=name, namespace="d", source=str(model), memory_budget=budget)
    service = ServiceSpec(name=name, namespace="d", model_ref=name, runtime=runtime, context_size=2048)
    return [Event(EventType.ADDED, spec), Event(EventType.ADDED, service)]


async def test_admission_waiting_and_release_move_the_metrics_and_gauges_match_status(tmp_path: Path) -> None:
    plugin = Plugin()
    agent = make_agent(tmp_path, plugin)  # host budget 0.005 x 16 GiB = 81.9 MiB: one tiny unit fits, not two
    async with served(agent) as api:
        before = await api.metrics()
        assert value(before, "metal_agent_admissions_total") == 0
        assert value(before, "metal_agent_pipeline_latency_seconds_count") == 0
        for event in unit_events(tmp_path, "a", "healthy"):
            await api.send.send(event)
        await until(lambda: phase(agent, "d/a") == ("Ready", "Ready"))
        samples, status = await api.snapshot()
        unit, host = status["units"][0], status["host"]
        ids = {"unit": "d/a", "executor": "healthy"}
        assert value(samples, "metal_agent_admissions_total") == 1
        assert value(samples, "metal_agent_unit_phase", unit="d/a", phase="Ready") == 1
        assert value(samples, "metal_agent_unit_phase", unit="d/a", phase="Starting") == 0
        assert value(samples, "metal_agent_unit_estimated_bytes", **ids) == unit["estimate"]["total"] > 0
        assert value(samples, "metal_agent_unit_reserved_bytes", **ids) == unit["reserved_bytes"]
        # Once it is healthy, the ledger holds the measured footprint (here the server's RSS), not the estimate.
        assert unit["reserved_bytes"] == host["reserved_bytes"] >= unit["actual"]["rss"] > 0
        assert value(samples, "metal_agent_reserved_bytes") == host["reserved_bytes"]
        assert value(samples, "metal_agent_unit_budget_bytes", **ids) == 512 << 20
        assert value(samples, "metal_agent_unit_actual_bytes", component="rss", **ids) == unit["actual"]["rss"] > 0
        assert value(samples, "metal_agent_host_budget_bytes") == host["budget_bytes"] == int(0.004 * (16 << 30))
        assert value(samples, "metal_agent_host_total_bytes") == host["total_bytes"]
        available = value(samples, "metal_agent_host_available_bytes")
        assert available is not None and abs(available - host["available_bytes"]) < 0.1 * host["available_bytes"]
        assert value(samples, "metal_agent_server_startup_seconds_count", executor="healthy") == 1
        assert value(samples, "metal_agent_pipeline_latency_seconds_count") == 1  # the service event started it
        assert (value(samples, "metal_agent_pipeline_latency_seconds_sum") or 0) > 0
        assert value(samples, "metal_agent_build_info", version=__import__("agent").__version__) == 1

        for event in unit_events(tmp_path, "b", "healthy"):
            await api.send.send(event)
        waits = lambda: [r for r in plugin.reports if r["unit"] == "d/b" and r["reason"] == "InsufficientMemory"]  # noqa: E731
        await until(lambda: len(waits()) >= 1)  # it waits in the admission queue: one rejection per wait
        samples = await api.metrics()
        assert value(samples, "metal_agent_rejections_total", reason="WaitingForMemory") == 1
        assert value(samples, "metal_agent_unit_reserved_bytes", unit="d/b", executor="") == 0
        assert value(samples, "metal_agent_unit_phase", unit="d/b", phase="Pending") == 1

        await api.send.send(Event(EventType.DELETED, ServiceSpec(name="a", namespace="d", model_ref="a")))
        await until(lambda: phase(agent, "d/b") == ("Ready", "Ready") and "d/a" not in agent.runtimes)
        samples, status = await api.snapshot()
        assert value(samples, "metal_agent_admissions_total") == 2
        reserved = value(samples, "metal_agent_unit_reserved_bytes", unit="d/b", executor="healthy")
        assert reserved == next(u for u in status["units"] if u["unit"] == "d/b")["reserved_bytes"] > 0
        assert not [key for key in samples if ("unit", "d/a") in key[1]]  # a deleted unit leaves no series


async def test_rejections_are_counted_by_reason(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, Plugin())
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(64)))
    async with served(agent) as api:
        for event in [
            *unit_events(tmp_path, "small", "healthy", budget="1Mi"),
            *unit_events(tmp_path, "nobody", "vllm"),
            *unit_events(tmp_path, "corrupt", "healthy", model=corrupt),
        ]:
            await api.send.send(event)
        await until(lambda: all(phase(agent, f"d/{n}")[0] == "Failed" for n in ("small", "nobody", "corrupt")))
        samples = await api.metrics()
    assert value(samples, "metal_agent_rejections_total", reason="InsufficientMemory") == 1
    assert value(samples, "metal_agent_rejections_total", reason="NoExecutor") == 1
    assert value(samples, "metal_agent_rejections_total", reason="MemoryCheckFailed") == 1
    assert value(samples, "metal_agent_admissions_total") == 1  # only "nobody" fitted; then no executor took it
    assert value(samples, "metal_agent_reserved_bytes") == 0


async def test_a_restart_is_counted_and_the_series_goes_with_the_unit(tmp_path: Path) -> None:
    # A long backoff: exactly one failure happens within the test, so the counter and /status must agree on 1.
    agent = make_agent(tmp_path, Plugin(), backoff_base=60, backoff_cap=60)
    async with served(agent) as api:
        for event in unit_events(tmp_path, "c", "crash"):
            await api.send.send(event)
        await until(lambda: phase(agent, "d/c")[0] == "Restarting")
        samples, status = await api.metrics(), await api.status()
        assert status["units"][0]["restarts"] == 1
        assert value(samples, "metal_agent_unit_restarts_total", unit="d/c") == 1
        assert value(samples, "metal_agent_unit_phase", unit="d/c", phase="Restarting") == 1
        assert value(samples, "metal_agent_reserved_bytes") == 0  # a crashed server holds no memory
        await api.send.send(Event(EventType.DELETED, ServiceSpec(name="c", namespace="d", model_ref="c")))
        await until(lambda: "d/c" not in agent.runtimes)
        samples = await api.metrics()
        assert value(samples, "metal_agent_unit_restarts_total", unit="d/c") is None


async def test_evictions_and_watch_reconnects_counted_by_other_parts_are_served(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, Plugin())
    async with served(agent) as api:
        assert value(await api.metrics(), "metal_agent_evictions_total", reason="MemoryPressure") is None
        agent.metrics.evicted("MemoryPressure")
        agent.metrics.evicted("MemoryPressure")
        agent.metrics.watch_reconnected("InferenceService")
        samples = await api.metrics()
        assert value(samples, "metal_agent_evictions_total", reason="MemoryPressure") == 2
        assert value(samples, "metal_agent_watch_reconnects_total", resource="InferenceService") == 1
        # A scraper asking for OpenMetrics gets it, and it parses with the stricter OpenMetrics parser.
        text, content_type = await api.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert content_type.startswith("application/openmetrics-text")
        families = {family.name: family for family in openmetrics_families(text)}
        assert families["metal_agent_evictions"].samples[0].value == 2


async def test_each_agent_has_its_own_registry(tmp_path: Path) -> None:
    first = make_agent(tmp_path / "1", Plugin())
    second = make_agent(tmp_path / "2", Plugin())  # the process-global registry would refuse the duplicate names
    first.metrics.admitted()
    async with served(second) as api:
        assert value(await api.metrics(), "metal_agent_admissions_total") == 0
