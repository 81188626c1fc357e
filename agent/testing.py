"""Run a plugin's executor against the real pipeline, from the plugin's own tests.

A plugin author wants to know that the agent, given their plugin and a manifest, budgets, checks, starts and
probes their server until the unit is Ready. This module is that harness, outside the layers (like
``agent.plugin``) and with nothing of pytest in it::

    from agent.testing import build_agent, running, wait_for_phase

    async def test_my_executor_serves_a_model(tmp_path):
        agent = build_agent(tmp_path / "state", my_plugin_module, model_roots=(tmp_path,))
        async with running(agent, MANIFEST.replace("MODEL", str(model_file))) as send:
            runtime = await wait_for_phase(agent, "my-service", "Ready")
            assert runtime.executor == "mine"

``running`` stops every server the agent started on the way out, whatever the test did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from agent.config.agent_config import AgentConfig
from agent.engine.pipeline import Agent
from agent.engine.plugin_manager import load_plugins
from agent.engine.unit_state import UnitRuntime
from agent.memory.pressure import Provider
from agent.sources.manifest import parse_documents
from agent.sources.standalone import Event, EventType, Synced

__all__ = ["build_agent", "manifest_events", "running", "wait_for_phase"]

Send = Callable[[Event | Synced], None]


def build_agent(
    state_dir: Path,
    *plugins: object,
    entry_points: bool = False,
    plugin_settings: Mapping[str, Any] | None = None,
    memory: Provider | None = None,
    **config: Any,
) -> Agent:
    """An Agent with the built-in hooks and executors plus ``plugins`` (modules or objects with hook functions).

    Installed entry-point plugins are left out unless ``entry_points``; ``plugin_settings`` sets plugin settings by
    name (``{"example_threads": 4}``); ``memory`` simulates the host's memory; ``config`` sets AgentConfig fields
    (``model_roots``, ``memory_fraction``, ``startup_timeout``, ...).
    """
    loaded = load_plugins(extra=list(plugins), entry_points=entry_points)
    if plugin_settings:
        loaded.settings.update(plugin_settings)
    return Agent(AgentConfig(state_dir=state_dir, **config), loaded, memory=memory)


def manifest_events(text: str, where: str = "manifest.yaml") -> list[Event | Synced]:
    """The events the standalone source sends for a manifest file with this YAML text, then ``Synced``."""
    objects = parse_documents(Path(where), text.encode())
    return [*(Event(EventType.ADDED, obj) for obj in objects), Synced()]


@asynccontextmanager
async def running(agent: Agent, events: str | Iterable[Event | Synced] = ()) -> AsyncIterator[Send]:
    """Run ``agent`` fed with ``events`` (or a manifest's YAML text); yields a function that sends more.

    On the way out the agent is cancelled and every server it started is stopped.
    """
    initial = manifest_events(events) if isinstance(events, str) else list(events)
    send, receive = anyio.create_memory_object_stream[Event | Synced](1000)
    for event in initial:
        send.send_nowait(event)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(agent.run, receive)
            try:
                yield send.send_nowait
            finally:
                tasks.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await agent.shutdown()


async def wait_for_phase(
    agent: Agent, service: str, phase: str, namespace: str = "default", timeout: float = 60
) -> UnitRuntime:
    """Wait until the unit of InferenceService ``namespace/service`` is in ``phase``; returns its runtime.

    On timeout the AssertionError names every unit's phase, reason and message, which is what a failing plugin
    test needs to show.
    """
    key = f"{namespace}/{service}"
    try:
        with anyio.fail_after(timeout):
            while (runtime := agent.runtimes.get(key)) is None or runtime.phase != phase:
                await anyio.sleep(0.02)
    except TimeoutError:
        units = [(u["unit"], u["phase"], u["reason"], u["message"]) for u in agent.status()["units"]]
        raise AssertionError(f"{key} not {phase} within {timeout} s; units: {units}") from None
    return runtime
