"""A restarted agent finds its servers by the mark in their environment, whatever state the state file is in:
torn, hostile (bad pids, deep nesting, another shape), or a directory. It adopts the one a unit still wants,
stops the others, warns about each bad record, and never touches a server another agent marked."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fake_servers import exec_done, marked_servers, server_argv
from memory_harness import MiB, SimulatedHost, make_agent, model_event, phase, running, service, until
from structlog.testing import capture_logs

from agent.engine.pipeline import Agent
from agent.hookspecs import Launch
from agent.processes import marker, supervisor
from agent.processes.ports import free_port
from agent.sources.manifest import ModelSpec
from agent.sources.standalone import SYNCED, Event, EventType
from agent.sources.units import ServingUnit

pytestmark = pytest.mark.anyio


def leftover(tmp_path: Path, name: str, state_dir: Path | None = None) -> supervisor.Child:
    """A server a killed agent (on ``state_dir``, by default this test's) left running, carrying its mark."""
    model = model_event(tmp_path).obj
    assert isinstance(model, ModelSpec)
    unit = ServingUnit(service=service(name), model=model)
    port = free_port()
    mark = marker.child_env(
        marker.state_id(state_dir or tmp_path / "state"), unit.key, unit.spec_hash(), port, "/health"
    )
    return exec_done(supervisor.start(Launch(argv=server_argv(port)), port, tmp_path / f"{name}.log", mark=mark))


def record(child: supervisor.Child, unit: str, **override: Any) -> dict[str, Any]:
    fields = {
        "unit": unit, "spec_hash": "x", "pid": child.pid, "create_time": child.create_time, "argv": child.argv,
        "port": child.port, "log_path": str(child.log_path), "health_path": "/health",
    }  # fmt: skip
    return {**fields, **override}


def state_file(*records: Any) -> str:
    return json.dumps({"version": 1, "children": list(records)})


@pytest.fixture
def cleanup() -> Iterator[list[supervisor.Child]]:
    """Servers a test started itself: stopped at the end whatever happened."""
    children: list[supervisor.Child] = []
    yield children
    for child in children:
        if child.running():
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
        if child.process is not None:
            child.process.wait()


def gone(child: supervisor.Child) -> bool:
    return not child.running()


DEEP = "[" * 100_000 + "]" * 100_000
# (what lies at STATE/children.json, given the leftover's true record; the warning expected)
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], str], str]] = {
    "truncated by 10 bytes": (lambda r: state_file(r)[:-10], "state file unreadable"),
    'pid "abc"': (lambda r: state_file({**r, "pid": "abc"}), "state record skipped"),
    "pid -1": (lambda r: state_file({**r, "pid": -1}), "state record skipped"),
    "pid 1.5": (lambda r: state_file({**r, "pid": 1.5}), "state record skipped"),
    "pid true": (lambda r: state_file({**r, "pid": True}), "state record skipped"),
    "create time NaN": (lambda r: state_file({**r, "create_time": float("nan")}), "state record skipped"),
    "argv deeply nested": (lambda r: state_file({**r, "argv": [[[[["x"]]]]]}), "state record skipped"),
    "records of every type": (lambda r: state_file(None, 5, "x", [], {}, {"unit": "d"}), "state record skipped"),
    "100k nested lists": (lambda r: DEEP, "state file unreadable"),
    "100k nested lists as children": (lambda r: '{"version": 1, "children": ' + DEEP + "}", "state file unreadable"),
    "a list": (lambda r: "[1, 2, 3]", "state file of another shape"),
    "children an object": (lambda r: json.dumps({"version": 1, "children": {"a": r}}), "state file of another shape"),
    "another version": (lambda r: json.dumps({"version": 99, "children": [r]}), "state file of another version"),
    "not UTF-8": (lambda r: "\udcff\udcfe{", "state file unreadable"),
}


@pytest.mark.parametrize("case", HOSTILE)
async def test_a_hostile_state_file_is_survived_and_servers_are_adopted_by_their_mark(
    tmp_path: Path, case: str, cleanup: list[supervisor.Child]
) -> None:
    child = leftover(tmp_path, "kept")
    cleanup.append(child)
    content, warning = HOSTILE[case]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "children.json").write_text(content(record(child, "d/kept")), errors="surrogateescape")
    with capture_logs() as logs:
        agent = make_agent(tmp_path, host=SimulatedHost(512 * MiB))
    assert [e for e in logs if e["event"].startswith(warning) and e["log_level"] == "warning"], logs
    assert all(len(str(e)) < 2000 for e in logs)  # no warning quotes the file at length
    await adopted_once(tmp_path, agent, child)


async def adopted_once(tmp_path: Path, agent: Agent, child: supervisor.Child) -> None:
    """The agent adopts ``child`` for unit kept, starts no second server, and stops it on shutdown."""
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("kept")))
        send(SYNCED)
        await until(lambda: phase(agent, "kept") == ("Ready", "Adopted"), agent=agent)
        assert agent.runtimes["d/kept"].child.pid == child.pid  # type: ignore[union-attr]
        assert marked_servers(tmp_path / "state") == [child.pid]  # nothing started twice
    await until(lambda: gone(child))
    assert marked_servers(tmp_path / "state") == []


@pytest.mark.parametrize("state", ["missing", "a directory", "a record naming another process"])
async def test_servers_are_adopted_by_their_mark_without_a_usable_state_file(
    tmp_path: Path, state: str, cleanup: list[supervisor.Child]
) -> None:
    child = leftover(tmp_path, "kept")
    cleanup.append(child)
    path = tmp_path / "state" / "children.json"
    path.parent.mkdir()
    if state == "a directory":
        path.mkdir()
    elif state != "missing":  # a record of a process that is not the server: never touched, never adopted
        other = psutil.Process()
        path.write_text(state_file(record(child, "d/kept", pid=other.pid, create_time=other.create_time())))
    with capture_logs() as logs:
        agent = make_agent(tmp_path, host=SimulatedHost(512 * MiB))
    assert agent.handover.adoptable["d/kept"].pid == child.pid
    if state == "a directory":
        assert [e for e in logs if e["event"].startswith("state file unreadable")]
        path.rmdir()  # saving over a directory is the state writer's concern, not adoption's
    await adopted_once(tmp_path, agent, child)


async def test_a_second_server_for_one_unit_and_one_for_a_deleted_unit_are_stopped(
    tmp_path: Path, cleanup: list[supervisor.Child]
) -> None:
    first, second, deleted = leftover(tmp_path, "kept"), leftover(tmp_path, "kept"), leftover(tmp_path, "deleted")
    cleanup += [first, second, deleted]
    agent = make_agent(tmp_path, host=SimulatedHost(512 * MiB))
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("kept")))
        send(SYNCED)  # the first listing had no unit "deleted"
        await until(lambda: phase(agent, "kept") == ("Ready", "Adopted"), agent=agent)
        assert agent.runtimes["d/kept"].child.pid == first.pid  # type: ignore[union-attr]  # the oldest
        await until(lambda: gone(second) and gone(deleted))
        assert marked_servers(tmp_path / "state") == [first.pid]
    assert marked_servers(tmp_path / "state") == []


async def test_a_server_marked_by_another_agent_is_never_touched(
    tmp_path: Path, cleanup: list[supervisor.Child]
) -> None:
    foreign = leftover(tmp_path, "kept", state_dir=tmp_path / "other-state")
    cleanup.append(foreign)
    agent = make_agent(tmp_path, host=SimulatedHost(512 * MiB))
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("kept")))
        send(SYNCED)
        await until(lambda: phase(agent, "kept") == ("Ready", "Ready"), agent=agent)
        assert agent.runtimes["d/kept"].child.pid != foreign.pid  # type: ignore[union-attr]
    assert foreign.running() and marked_servers(tmp_path / "state") == []


async def test_an_unclaimed_leftover_is_stopped_with_the_agent(tmp_path: Path, cleanup: list[supervisor.Child]) -> None:
    """Shut down before the first listing ends: a server found by its mark does not outlive the agent."""
    child = leftover(tmp_path, "kept")
    cleanup.append(child)
    agent = make_agent(tmp_path, host=SimulatedHost(512 * MiB))
    async with running(agent):
        assert "d/kept" in agent.handover.adoptable
    assert gone(child) and marked_servers(tmp_path / "state") == []


async def test_leftovers_of_a_suspended_unit_and_of_a_unit_without_its_model_are_stopped(
    tmp_path: Path, cleanup: list[supervisor.Child]
) -> None:
    suspended, orphan, scaled_down = (
        leftover(tmp_path, "suspended"),
        leftover(tmp_path, "orphan"),
        leftover(tmp_path, "zero"),
    )
    cleanup += [suspended, orphan, scaled_down]
    agent = make_agent(tmp_path, host=SimulatedHost(512 * MiB))
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, dataclasses.replace(service("suspended"), suspend=True)))
        send(Event(EventType.ADDED, dataclasses.replace(service("orphan"), model_ref="missing")))
        send(Event(EventType.ADDED, dataclasses.replace(service("zero"), replicas=0)))
        send(SYNCED)
        await until(lambda: gone(suspended) and gone(orphan) and gone(scaled_down), agent=agent)
        assert phase(agent, "suspended") == ("Stopped", "Suspended") and phase(agent, "orphan")[1] == "ModelNotFound"
        assert marked_servers(tmp_path / "state") == [] and agent.ledger.used == 0
