"""agent.testing, the harness plugin authors run their executor with, driven by the example plugin."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.sources.manifest import API_VERSION
from agent.testing import build_agent, manifest_events, running, wait_for_phase

sys.path.insert(0, str(Path(__file__).parents[1] / "example_plugin"))

import metal_agent_example

pytestmark = pytest.mark.anyio


def example_manifest(model: Path, budget: str = "512Mi") -> str:
    return (
        f"apiVersion: {API_VERSION}\nkind: Model\nmetadata: {{name: ex}}\n"
        f"spec:\n  source: {model}\n  hardware: {{accelerator: cpu, memoryBudget: '{budget}'}}\n---\n"
        f"apiVersion: {API_VERSION}\nkind: InferenceService\nmetadata: {{name: ex}}\n"
        "spec: {modelRef: ex, runtime: example, contextSize: 1024}\n"
    )


def test_a_manifest_becomes_the_source_events_then_synced(tmp_path: Path) -> None:
    events = manifest_events(example_manifest(tmp_path / "m.gguf"))
    assert [type(e).__name__ for e in events] == ["Event", "Event", "Synced"]


async def test_a_unit_that_never_gets_there_fails_the_wait_with_every_units_state(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    agent = build_agent(tmp_path / "state", metal_agent_example, model_roots=(tmp_path,))
    async with running(agent, example_manifest(model, budget="1Mi")):
        failed = await wait_for_phase(agent, "ex", "Failed", timeout=30)  # far too small a budget: never started
        assert failed.child is None and agent.ledger.used == 0
        with pytest.raises(
            AssertionError, match=r"default/ex not Ready within 0.2 s; units: \[\('default/ex', 'Failed'"
        ):
            await wait_for_phase(agent, "ex", "Ready", timeout=0.2)


async def test_plugin_settings_reach_the_executor(tmp_path: Path) -> None:
    agent = build_agent(tmp_path / "state", metal_agent_example, plugin_settings={"example_threads": 7})
    example = next(e for e in agent.executors if e.name == "example")
    assert example.threads == 7  # type: ignore[attr-defined]


@pytest.mark.llama
async def test_the_example_executor_serves_a_model_through_the_pipeline(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    agent = build_agent(tmp_path / "state", metal_agent_example, model_roots=(tmp_path,), startup_timeout=120)
    async with running(agent, example_manifest(model)):
        ready = await wait_for_phase(agent, "ex", "Ready", timeout=120)
        assert ready.executor == "example" and ready.child is not None and ready.child.running()
        child = ready.child
    assert not child.running()  # running() stopped the server on the way out
