"""extraArgs through the whole agent: a refused flag fails the unit before admission and starts no process."""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
from memory_harness import model_event, running, until

from agent.engine.pipeline import Agent
from agent.hookspecs import hookimpl
from agent.sources.manifest import ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.sources.units import ServingUnit
from agent.testing import build_agent

pytestmark = pytest.mark.anyio


class Reports:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []

    @hookimpl
    def report(self, unit: ServingUnit | None, status: dict[str, Any]) -> None:
        self.statuses.append(status)


def recording_llama_server(tmp_path: Path) -> tuple[Path, Path]:
    """A llama-server that records its arguments, one start per line, then exits (the unit then restarts)."""
    log = tmp_path / "starts.log"
    binary = tmp_path / "llama-server"
    binary.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexit 3\n')
    binary.chmod(0o755)
    return binary, log


def make_agent(tmp_path: Path, reports: Reports) -> Agent:
    binary, _ = recording_llama_server(tmp_path)
    return build_agent(tmp_path / "state", reports, plugin_settings={"llama_server": str(binary)}, backoff_base=10,
                       backoff_cap=10, startup_timeout=10, grace_period=1, probe_interval=0.05,
                       model_roots=(tmp_path,))  # fmt: skip


def service(name: str, extra: list[str]) -> ServiceSpec:
    return ServiceSpec(name=name, namespace="d", model_ref="m", context_size=1024, extra_args=tuple(extra))


def state(agent: Agent, name: str) -> tuple[str, str, str]:
    runtime = agent.runtimes.get(f"d/{name}")
    return (runtime.phase, runtime.reason, runtime.message) if runtime else ("", "", "")


@pytest.mark.parametrize(
    "extra",
    [["--ctx", "131072"], ["--ho", "0.0.0.0"], ["--mod", "/elsewhere/x.gguf"], ["--ctx-size=99999"], ["-c", "9"],
     ["-m", "/elsewhere/x.gguf"], ["-hf", "org/repo"], ["--lora", "/tmp/x"], ["--slot-save-path", "/tmp"]],
)  # fmt: skip
async def test_a_refused_flag_fails_the_unit_and_starts_nothing(tmp_path: Path, extra: list[str]) -> None:
    reports = Reports()
    agent = make_agent(tmp_path, reports)
    log = tmp_path / "starts.log"
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("bad", extra)))
        send(Event(EventType.ADDED, service("good", ["--temp", "0.7"])))  # started: the binary does run
        await until(lambda: state(agent, "bad")[0] == "Failed" and log.exists(), agent=agent)
        phase, reason, message = state(agent, "bad")
        assert (phase, reason) == ("Failed", "InvalidSpec")
        assert message.startswith(f'llamacpp: extraArgs: "{extra[0].split("=")[0]}"')
        assert "d/bad" not in agent.ledger.held  # never admitted, so it reserved nothing
        await until(lambda: state(agent, "good")[0] in ("Restarting", "CrashLoop"), agent=agent)
    starts = log.read_text().splitlines()
    assert len(starts) == 1 and starts[0].endswith("--temp 0.7")  # only the good unit ever started
    refused = [s for s in reports.statuses if s.get("reason") == "InvalidSpec"]
    assert refused and all(len(s["message"]) < 400 for s in refused)  # what Events and conditions quote


async def test_fixing_the_spec_starts_the_unit(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, Reports())
    log = tmp_path / "starts.log"
    bad = service("s", ["--threads", "4", "--host", "0.0.0.0"])
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, bad))
        await until(lambda: state(agent, "s")[:2] == ("Failed", "InvalidSpec"), agent=agent)
        assert '"--host" changes where or how the server listens' in state(agent, "s")[2]
        assert not log.exists()
        send(Event(EventType.MODIFIED, dataclasses.replace(bad, extra_args=("--threads", "4", "--seed=7"))))
        await until(log.exists, agent=agent)
    assert log.read_text().strip().endswith("--threads 4 --seed 7")


@pytest.mark.llama
async def test_allowed_flags_reach_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp itself (a llama-server binary, else the xllamacpp stand-in) is given the allowed flags."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server here: the well-known dirs, then the stand-in
    agent = build_agent(tmp_path / "state", startup_timeout=60, grace_period=3, model_roots=(tmp_path,))
    extra = ["--alias", "tiny-alias", "--temp=0.1", "--jinja", "-s", "-1", "--timeout", "30"]
    async with running(agent) as send:
        send(model_event(tmp_path))
        send(Event(EventType.ADDED, service("s", extra)))
        await until(lambda: state(agent, "s")[0] == "Ready", timeout=90, agent=agent)
        child = agent.runtimes["d/s"].child
        assert child is not None
        models = await anyio.to_thread.run_sync(get_json, f"http://127.0.0.1:{child.port}/v1/models")
    assert "tiny-alias" in [m["id"] for m in models["data"]]
    assert child.argv[-9:] == ["--alias", "tiny-alias", "--temp", "0.1", "--jinja", "-s", "-1", "--timeout", "30"]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)
