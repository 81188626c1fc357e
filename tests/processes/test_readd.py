"""Units deleted and re-added: a unit that comes back (the same spec included) starts again and its memory is
held once; nothing waits forever because its worker ended or its spec looked unchanged."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from memory_harness import MiB, SimulatedHost, TinyPlugin, model_event, phase, running, service, until

from agent.engine.pipeline import Agent
from agent.hookspecs import Executor, Launch, hookimpl
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit
from agent.testing import build_agent

pytestmark = pytest.mark.anyio

SLOW_TO_STOP = """
import http.server, pathlib, signal, sys, time
def on_term(*_):
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(0.5)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class SlowToStop:
    """A server that takes half a second to stop after SIGTERM, and marks when it got it."""

    name = "slow-stop"

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def accepts(self, unit: ServingUnit) -> str | None:
        return None if unit.service.runtime == "slow-stop" else "not mine"

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        return Launch(argv=[sys.executable, "-c", SLOW_TO_STOP, str(port), str(self.marker)])


class Plugin:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(SlowToStop(self.marker))


def make_agent(tmp_path: Path, host: SimulatedHost) -> Agent:
    agent = build_agent(tmp_path / "state", TinyPlugin(), Plugin(tmp_path / "sigterm"), memory=host,
                        memory_fraction=0.9, grace_period=5, probe_interval=0.05, pressure_interval=0.05,
                        model_roots=(tmp_path,))  # fmt: skip
    host.agent = agent
    return agent


async def test_a_unit_re_added_while_its_server_is_stopping_starts_again(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, SimulatedHost(512 * MiB))
    unit = dataclasses.replace(service("s"), runtime="slow-stop")
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, unit))
        await until(lambda: phase(agent, "s")[0] == "Ready")
        first = agent.runtimes["d/s"].child.pid  # type: ignore[union-attr]
        send(Event(EventType.DELETED, unit))
        await until((tmp_path / "sigterm").exists)  # the old server is stopping now
        send(Event(EventType.ADDED, unit))  # the same spec comes back
        await until(lambda: phase(agent, "s")[0] == "Ready" and agent.runtimes["d/s"].child.pid != first)  # type: ignore[union-attr]
        assert list(agent.ledger.held) == ["d/s"]


async def test_a_unit_whose_model_is_deleted_and_re_added_starts_again(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, SimulatedHost(512 * MiB))
    model = model_event(tmp_path)
    async with running(agent) as send:
        send(model)
        send(Event(EventType.ADDED, service("s")))
        await until(lambda: phase(agent, "s")[0] == "Ready")
        send(Event(EventType.DELETED, model.obj))
        await until(lambda: phase(agent, "s") == ("Pending", "ModelNotFound"))
        assert agent.ledger.used == 0 and agent.runtimes["d/s"].child is None
        send(model)  # the same Model again: the unit's spec is what it was before
        await until(lambda: phase(agent, "s")[0] == "Ready")
