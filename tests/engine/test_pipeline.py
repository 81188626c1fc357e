"""The pipeline in-process: crash loops back off, failing spawns are reported, Model changes re-run units."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from fake_servers import SERVER, FakeServer
from memory_harness import drive
from structlog.testing import capture_logs

from agent.engine.pipeline import Agent
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.hookspecs import Executor, Launch, hookimpl
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit
from agent.testing import build_agent

pytestmark = pytest.mark.anyio


class Refusing:
    name = "refusing"

    def accepts(self, unit: ServingUnit) -> str | None:
        return None if unit.service.runtime == "refuse" else "not mine"

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        raise RuntimeError("cannot build a command for this model")


class Chatty:
    """A server that writes a line to its output every 20 ms, from a shell that keeps the SIGPIPE disposition it
    inherits, as a program that leaves the signal alone does (Python would ignore SIGPIPE whatever it inherited)."""

    name = "chatty"

    def accepts(self, unit: ServingUnit) -> str | None:
        return None if unit.service.runtime == "chatty" else "not mine"

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        loop = '"$0" -c "$1" "$2" healthy 0 & while :; do echo tick; sleep 0.02; done'
        return Launch(argv=["sh", "-c", loop, sys.executable, SERVER, str(port)])


class Executors:
    @hookimpl
    def register_executors(self, register: Callable[[Executor], None]) -> None:
        register(FakeServer("crashing", mode="crash", runtime="crash"))
        register(Refusing())
        register(FakeServer("sicken", mode="0.5"))  # healthy for half a second, then 503 forever
        register(FakeServer("models", health_path="/v1/models"))  # no /health: answers where MLX's server does
        register(Chatty())


def state(agent: Agent) -> tuple[str, str]:
    runtime = agent.runtimes.get("d/s")
    return (runtime.phase, runtime.reason) if runtime else ("", "")


def objects(tmp_path: Path, runtime: str, budget: str = "512Mi") -> list[Event]:
    model_path = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    model = ModelSpec(name="m", namespace="d", source=str(model_path), memory_budget=budget)
    service = ServiceSpec(name="s", namespace="d", model_ref="m", runtime=runtime, context_size=1024)
    return [Event(EventType.ADDED, model), Event(EventType.ADDED, service)]


def make_agent(tmp_path: Path) -> Agent:
    return build_agent(tmp_path / "state", Executors(), backoff_base=0.01, backoff_cap=0.05, crash_loop_after=3,
                       startup_timeout=10, grace_period=1, probe_interval=0.05, model_roots=(tmp_path,))  # fmt: skip


async def test_crashing_server_backs_off_into_crash_loop(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    await drive(agent, objects(tmp_path, "crash"), lambda: state(agent) == ("CrashLoop", "Failed"))
    runtime = agent.runtimes["d/s"]
    assert runtime.restarts >= 3 and "boom" in runtime.message and "retry in" in runtime.message
    assert agent.ledger.used == 0  # a crashed server holds no memory


async def test_spawn_failure_marks_the_unit_failed_with_the_plugin_message(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    await drive(agent, objects(tmp_path, "refuse"), lambda: state(agent)[0] == "Failed")
    runtime = agent.runtimes["d/s"]
    assert runtime.reason == "SpawnFailed" and "cannot build a command" in runtime.message
    assert agent.ledger.used == 0


async def test_no_executor_is_a_clear_reason(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    await drive(agent, objects(tmp_path, "vllm"), lambda: state(agent)[1] == "NoExecutor")
    assert "no executor accepts" in agent.runtimes["d/s"].message


async def test_a_model_budget_lowered_below_the_estimate_is_rejected(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    events = objects(tmp_path, "refuse")
    lowered = ModelSpec(name="m", namespace="d", source=events[0].obj.source, memory_budget="1Mi")  # type: ignore[union-attr]
    events.append(Event(EventType.MODIFIED, lowered))
    await drive(agent, events, lambda: state(agent)[1] == "InsufficientMemory")
    assert agent.runtimes["d/s"].phase == "Failed" and "1.0 MiB" in agent.runtimes["d/s"].message


async def test_unhealthy_server_is_stopped_before_its_replacement_starts(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    pids: list[int] = []

    def restarted() -> bool:
        runtime = agent.runtimes.get("d/s")
        if runtime and runtime.child and runtime.child.pid not in pids:
            # Whenever a new server appears, every earlier one is already gone.
            assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
            pids.append(runtime.child.pid)
        return runtime is not None and runtime.restarts >= 2 and len(pids) >= 2

    await drive(agent, objects(tmp_path, "sicken"), restarted)
    assert agent.runtimes["d/s"].unhealthy >= 1 or agent.runtimes["d/s"].restarts >= 2


async def test_a_server_healthy_on_its_own_health_path_is_probed_there_and_never_restarted(tmp_path: Path) -> None:
    """The executor's ``Launch.health_path`` holds for every probe of a running server, not only for the start."""
    agent = make_agent(tmp_path)  # probes every 0.05 s; 3 failed probes in a row restart a server
    seen: list[tuple[int, int]] = []  # (restarts, unhealthy probes) once probed ten times, before the shutdown

    def probed_ten_times_while_ready() -> bool:
        runtime = agent.runtimes.get("d/s")
        if runtime is None or runtime.child is None or runtime.phase != "Ready":
            return False
        if runtime.child.log_path.read_text().count("GET ") < 10:
            return False
        seen.append((runtime.restarts, runtime.unhealthy))
        return True

    await drive(agent, objects(tmp_path, "models"), probed_ten_times_while_ready)
    assert seen == [(0, 0)]
    log = (tmp_path / "state" / "logs" / "d_s.log").read_text()
    assert set(log.split()) == {"GET", "/v1/models"}  # never /health


async def test_a_server_whose_log_writer_is_killed_serves_on_and_the_loss_is_logged_once(tmp_path: Path) -> None:
    """The writer ignores SIGTERM, but SIGKILL ends it: the server's next write then meets a closed pipe. It must
    not die of SIGPIPE mid-request (nor be restarted): it serves on, and the agent says once that its log is lost."""
    agent = make_agent(tmp_path)
    seen: dict[str, int] = {}

    def probed_a_while_after_the_writer_died() -> bool:
        runtime = agent.runtimes.get("d/s")
        if runtime is None or runtime.child is None or runtime.phase != "Ready":
            return False
        child = runtime.child
        if not seen:
            assert child.writer is not None
            seen["pid"] = child.pid
            os.kill(child.writer.pid, signal.SIGKILL)
            child.writer.wait(5)
            seen["probes"] = 0
            return False
        seen["probes"] += 1  # polled every 20 ms; the agent probes every 50 ms
        seen["restarts"], seen["now"] = runtime.restarts, child.pid  # as it is before the shutdown
        return seen["probes"] >= 50

    with capture_logs() as logs:
        await drive(agent, objects(tmp_path, "chatty"), probed_a_while_after_the_writer_died)
    assert seen["restarts"] == 0 and seen["now"] == seen["pid"]
    lost = [e for e in logs if e["event"] == "server_log_lost"]
    assert len(lost) == 1 and lost[0]["pid"] == seen["pid"] and lost[0]["writer_status"] == -signal.SIGKILL
