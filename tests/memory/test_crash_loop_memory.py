"""A crash-looping server: its restarts back off exponentially up to the cap, it ends in CrashLoop, and it holds
no memory while it waits to retry, so a unit waiting behind it gets the memory."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_servers import FakeServer
from memory_harness import MiB, SimulatedHost, TinyPlugin, make_agent, model_event, phase, running, service, until

from agent.hookspecs import Executor, hookimpl
from agent.sources.standalone import Event, EventType

pytestmark = pytest.mark.anyio


class Plugin:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []

    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("crashing", mode="crash", runtime="crash"))

    @hookimpl
    def report(self, unit: object, status: dict[str, Any]) -> None:
        self.statuses.append(status)


async def test_crash_loop_backs_off_and_frees_its_memory_between_attempts(tmp_path: Path) -> None:
    host, plugin = SimulatedHost(512 * MiB), Plugin()
    agent = make_agent(
        tmp_path,
        TinyPlugin(),
        plugin,
        host=host,
        memory_fraction=0.135,  # 69 MiB: one 44 MiB estimate at a time, or one beside a loaded ~20 MiB server
        backoff_base=0.05,
        backoff_cap=0.2,
        crash_loop_after=4,
        grace_period=1,
    )
    crasher = service("crasher", "critical")
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, dataclasses.replace(crasher, runtime="crash")))
        send(Event(EventType.ADDED, service("patient", "batch")))
        await until(lambda: phase(agent, "crasher")[0] == "CrashLoop")
        await until(lambda: phase(agent, "patient")[0] == "Ready")  # it got the memory between attempts
    delays = [
        float(m.group(1))
        for s in plugin.statuses
        if s["unit"] == "d/crasher" and (m := re.search(r"retry in ([\d.]+) s", s["message"]))
    ]
    assert delays[:5] == [0.05, 0.1, 0.2, 0.2, 0.2][: len(delays[:5])] and len(delays) >= 4
    phases = [s["phase"] for s in plugin.statuses if s["unit"] == "d/crasher" and "retry in" in s["message"]]
    assert phases[:4] == ["Restarting", "Restarting", "Restarting", "CrashLoop"]
    assert "exited with status 3" in next(s["message"] for s in plugin.statuses if s["phase"] == "CrashLoop")
