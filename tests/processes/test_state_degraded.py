"""The state directory is an aid, never a single point of failure: a failed save degrades, servers keep running."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psutil
import pytest
from fake_servers import Executors, FakeServer
from prometheus_client.parser import text_string_to_metric_families

from agent.engine.pipeline import Agent
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.processes import state_keeper, statefile
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.testing import build_agent

pytestmark = pytest.mark.anyio


def unit_events(tmp_path: Path, name: str) -> list[Event]:
    model_path = write_tiny_gguf(tmp_path / f"{name}.gguf", TinyShape())
    model = ModelSpec(name=name, namespace="d", source=str(model_path), memory_budget="512Mi")
    service = ServiceSpec(name=name, namespace="d", model_ref=name, runtime="healthy", context_size=1024)
    return [Event(EventType.ADDED, model), Event(EventType.ADDED, service)]


def failures_metric(agent: Agent) -> float:
    from prometheus_client import generate_latest

    for family in text_string_to_metric_families(generate_latest(agent.metrics.registry).decode()):
        for sample in family.samples:
            if sample.name == "metal_agent_state_save_failures_total":
                return sample.value
    return -1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])  # a full disk; a disk remounted read-only
async def test_a_failing_disk_degrades_the_state_and_servers_keep_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(state_keeper, "RETRY_SECONDS", 0.1)
    agent = build_agent(
        tmp_path / "state", Executors(FakeServer("healthy")), grace_period=1, probe_interval=0.1, startup_timeout=20,
        model_roots=(tmp_path,), host_memory=16 << 30,
    )  # fmt: skip
    send, receive = anyio.create_memory_object_stream[Event](100)

    async def stream() -> AsyncIterator[Event]:
        async with receive:
            async for event in receive:
                yield event

    def phase(name: str) -> str:
        runtime = agent.runtimes.get(f"d/{name}")
        return runtime.phase if runtime else ""

    async def until(condition: object) -> None:
        with anyio.fail_after(20):
            while not condition():  # type: ignore[operator]
                await anyio.sleep(0.02)

    real_write = statefile.write_atomic

    def disk_full(path: Path, data: bytes, mode: int = 0o600) -> None:
        raise OSError(code, os.strerror(code), str(path))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(agent.run, stream())
        for event in unit_events(tmp_path, "a"):
            await send.send(event)
        await until(lambda: phase("a") == "Ready")
        first = agent.runtimes["d/a"].child
        assert first is not None
        monkeypatch.setattr(statefile, "write_atomic", disk_full)
        for event in unit_events(tmp_path, "b"):  # a new server: its start must be saved, and cannot be
            await send.send(event)
        await until(lambda: phase("b") == "Ready")
        status = agent.status()
        assert status["state"] == "degraded" and os.strerror(code) in status["state_error"]
        assert failures_metric(agent) >= 1 and status["state_save_failures"] >= 1
        assert first.running() and phase("a") == "Ready"  # untouched
        assert not [p for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")]
        monkeypatch.setattr(statefile, "write_atomic", real_write)  # space freed: the retry catches up
        await until(lambda: agent.status()["state"] == "ok")
        saved = json.loads((tmp_path / "state" / "children.json").read_text())
        assert sorted(c["unit"] for c in saved["children"]) == ["d/a", "d/b"]
        assert agent.status()["state_error"] is None
        await agent.shutdown()
        tasks.cancel_scope.cancel()
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_state_dir_that_cannot_be_a_directory_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "file").write_text("")
    done = run_agent("--manifests", str(tmp_path / "m"), "--state-dir", str(tmp_path / "file"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --state-dir: ")


def test_state_file_that_is_a_fifo_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "s").mkdir()
    os.mkfifo(tmp_path / "s" / "children.json")
    done = run_agent("--manifests", str(tmp_path / "m"), "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 2 and "not a regular file" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_state_dir_at_start_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    state = tmp_path / "s"
    state.mkdir(mode=0o500)
    done = run_agent("--manifests", str(tmp_path / "m"), "--state-dir", str(state))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a writable directory" in done.stderr


def test_state_dir_is_made_private(tmp_path: Path) -> None:
    statefile.save(tmp_path / "s" / "children.json", [])
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / "children.json").stat().st_mode & 0o777 == 0o600
