"""Helpers for memory tests: a trivial executor (a Python HTTP server with optional ballast) and a simulated host.

The simulated host has a fixed total; what is available is that total less a "foreign" process's share (set by
the test) less the real RSS of the agent's live children, so evicting a server really frees memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.streams.memory import MemoryObjectSendStream
from fake_servers import Executors, FakeServer

from agent.engine.pipeline import Agent
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.memory.pressure import Sample
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType, Synced
from agent.testing import build_agent

MiB = 1 << 20


class TinyPlugin(Executors):
    """Serves runtime ``tiny`` at once; ``extraArgs: [N]`` makes its server hold N MiB more."""

    def __init__(self) -> None:
        super().__init__(FakeServer("tiny"))


class SimulatedHost:
    def __init__(self, total: int) -> None:
        self.total, self.foreign, self.calls = total, 0, 0
        self.agent: Agent | None = None

    def children_rss(self) -> int:
        rss = 0
        for runtime in self.agent.runtimes.values() if self.agent else ():
            if runtime.child is not None:
                with suppress(psutil.Error):
                    rss += psutil.Process(runtime.child.pid).memory_info().rss
        return rss

    def __call__(self) -> Sample:
        self.calls += 1
        return Sample(self.total, max(0, self.total - self.foreign - self.children_rss()))

    def leave_available(self, available: int) -> None:
        """Set the foreign share so that exactly ``available`` is left now."""
        self.foreign = max(0, self.total - self.children_rss() - available)


def model_event(tmp_path: Path) -> Event:
    path = tmp_path / "m.gguf"
    if not path.exists():
        write_tiny_gguf(path, TinyShape())
    return Event(EventType.ADDED, ModelSpec(name="m", namespace="d", source=str(path), memory_budget="512Mi"))


def service(name: str, priority: str = "normal", protected: bool = False, ballast_mib: int = 0) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        namespace="d",
        model_ref="m",
        runtime="tiny",
        context_size=1024,
        priority=priority,
        eviction_protection=protected,
        extra_args=(str(ballast_mib),),
    )


class Sender:
    """Sends the agent events; ``delivered()`` once it has applied all of them (a wait on the agent's state before
    that could pass on the state before the events)."""

    def __init__(self, stream: MemoryObjectSendStream[Event | Synced]) -> None:
        self.stream = stream

    def __call__(self, event: Event | Synced) -> None:
        self.stream.send_nowait(event)

    def delivered(self) -> bool:
        return self.stream.statistics().current_buffer_used == 0


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Sender]:
    """Run the agent; yields a function that sends it an event. Every child is stopped on the way out."""
    send, receive = anyio.create_memory_object_stream[Event | Synced](1000)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(agent.run, receive)
            try:
                yield Sender(send)
            finally:
                tasks.cancel_scope.cancel()  # first: no worker starts anything after this
    finally:
        with anyio.CancelScope(shield=True):
            await agent.shutdown()


def make_agent(folder: Path, *plugins: object, host: SimulatedHost | None = None, **settings: Any) -> Agent:
    """The suite's agent factory: the built-in plugins plus ``plugins`` (a TinyPlugin when none is given), the
    suite's fast timings, models under ``folder``, and ``host`` (simulated memory) when given; ``settings``
    override any AgentConfig field."""
    config: dict[str, Any] = {
        "memory_fraction": 0.9, "startup_timeout": 20, "grace_period": 2, "probe_interval": 0.05,
        "pressure_interval": 0.05, "model_roots": (folder,), **settings,
    }  # fmt: skip
    agent = build_agent(folder / "state", *(plugins or (TinyPlugin(),)), memory=host, **config)
    if host is not None:
        host.agent = agent
    return agent


async def until(condition: Callable[[], bool], timeout: float = 30, agent: Agent | None = None) -> None:
    """Wait for ``condition``; on timeout the error shows the agent's units (phase, reason, message)."""
    try:
        with anyio.fail_after(timeout):
            while not condition():
                await anyio.sleep(0.02)
    except TimeoutError:
        units = [(u["unit"], u["phase"], u["reason"], u["message"]) for u in agent.status()["units"]] if agent else []
        raise AssertionError(f"condition not met within {timeout} s; units: {units}") from None


def phase(agent: Agent, name: str) -> tuple[str, str]:
    runtime = agent.runtimes.get(f"d/{name}")
    return (runtime.phase, runtime.reason) if runtime else ("", "")


async def drive(agent: Agent, events: list[Event], until: Callable[[], bool], timeout: float = 20) -> None:
    """Run ``agent`` on ``events`` until ``until()`` holds, then shut it down (every server stopped)."""
    send, receive = anyio.create_memory_object_stream[Event](100)

    async def stream() -> AsyncIterator[Event]:
        async with receive:
            async for event in receive:
                yield event

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(agent.run, stream())
            for event in events:
                await send.send(event)
            while not until():
                await anyio.sleep(0.02)
            await agent.shutdown()
            tasks.cancel_scope.cancel()
