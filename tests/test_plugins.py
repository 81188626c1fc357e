"""Plugins: hooks called in pluggy's order and awaited, failures isolated, third-party executors by entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_agent_e2e import AgentProcess, manifest

from agent.hookspecs import hookimpl
from agent.plugin_manager import load_plugins
from agent.tinymodel import TinyShape, write_tiny_gguf

EXAMPLE = Path(__file__).parent / "example_plugin"


class AsyncBudget:
    @hookimpl
    async def resolve_budget(self, unit: object, host: object, agent_fraction: object) -> str:
        return "from-async-plugin"


class BrokenReporter:
    @hookimpl
    def report(self, unit: object, status: dict[str, Any]) -> None:
        raise RuntimeError("reporter is down")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @hookimpl
    async def report(self, unit: object, status: dict[str, Any]) -> None:
        self.seen.append(status)


@pytest.mark.anyio
async def test_async_hooks_are_awaited_and_plugins_come_before_the_defaults() -> None:
    plugins = load_plugins(extra=[AsyncBudget()], entry_points=False)
    assert await plugins.first("resolve_budget", unit=None, host=None, agent_fraction=None) == "from-async-plugin"


@pytest.mark.anyio
async def test_a_failing_reporter_does_not_stop_the_others() -> None:
    recorder = Recorder()
    plugins = load_plugins(extra=[recorder, BrokenReporter()], entry_points=False)
    await plugins.each("report", unit=None, status={"phase": "Ready"})
    assert recorder.seen == [{"phase": "Ready"}]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, really built and installed (offline) into its own site directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300, cwd=target,
    )  # fmt: skip
    broken = target / "broken_plugin-1.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (broken / "entry_points.txt").write_text("[metal_agent.executors]\nbroken = no_such_module_here\n")
    return target


def plugins_json(site: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "plugins", "--json"],
        capture_output=True, text=True, check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(site)},
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_third_party_executor_is_listed_and_a_broken_plugin_is_reported(installed: Path) -> None:
    info = plugins_json(installed)
    assert {"name": "example", "version": "0.1.0"} in info["plugins"]
    assert [e["name"] for e in info["executors"]] == ["example", "cuda", "mlx", "llamacpp"]
    assert "no_such_module_here" in info["failed"]["broken"]


@pytest.mark.llama
def test_third_party_executor_serves_a_model(installed: Path, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    model = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    text = manifest("ex", model).replace("spec: {modelRef: ex,", "spec: {modelRef: ex, runtime: example,")
    (manifests / "ex.yaml").write_text(text)
    process = AgentProcess(manifests, tmp_path / "state", env={"PYTHONPATH": str(installed)})
    try:
        process.wait(lambda: (process.unit("ex") or {}).get("phase") == "Ready")
        assert process.unit("ex")["executor"] == "example"  # type: ignore[index]
    finally:
        process.close()
