"""The download tests' agent: a recording executor that serves any unit with a plain HTTP server."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from agent.engine.pipeline import Agent
from agent.hookspecs import Executor, Launch, hookimpl
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit
from agent.testing import build_agent


class Recording:
    """Serves any unit with a plain HTTP server and records the model paths it was asked to start."""

    name = "recording"

    def __init__(self) -> None:
        self.started: list[Path] = []

    def accepts(self, unit: ServingUnit) -> str | None:
        return None

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        self.started.append(model_path)
        argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
        return Launch(argv=argv, health_path="/", cwd=model_path.parent)


class Plugin:
    def __init__(self, executor: Recording) -> None:
        self.executor = executor

    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(self.executor)


def make_agent(tmp_path: Path, executor: Recording) -> Agent:
    agent = build_agent(tmp_path / "state", Plugin(executor), backoff_base=0.05, backoff_cap=0.2, startup_timeout=20,
                        grace_period=1, probe_interval=0.1, model_roots=(tmp_path / "root",),
                        model_store=tmp_path / "store", min_free_disk=0)  # fmt: skip
    agent.fetcher.settings.report_interval = 0.05
    return agent


def unit(
    source: str, name: str = "s", sha256: str | None = None, budget: str = "512Mi", ctx: int = 1024
) -> list[Event]:
    model = ModelSpec(name=f"m-{name}", namespace="d", source=source, sha256=sha256, memory_budget=budget)
    service = ServiceSpec(name=name, namespace="d", model_ref=f"m-{name}", context_size=ctx)
    return [Event(EventType.ADDED, model), Event(EventType.ADDED, service)]


def phase(agent: Agent, name: str = "s") -> tuple[str, str]:
    runtime = agent.runtimes.get(f"d/{name}")
    return (runtime.phase, runtime.reason) if runtime else ("", "")
