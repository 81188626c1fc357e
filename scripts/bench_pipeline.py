"""1,000 serving units through the pipeline: time to steady state and per-event overhead.

Run: ``python scripts/bench_pipeline.py [N]``. Each unit goes through ``resolve_budget``, ``preflight`` (a GGUF
header scan and the estimate), ledger admission and ``report``. Every unit fits the host budget but the simulated
OS reports less memory available than one unit needs, so each one joins the admission queue (``Pending``), nothing
is spawned and the numbers are the agent's own work. Targets: steady state < 2 s, < 1 ms per event.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from agent.engine.pipeline import Agent, AgentConfig
from agent.engine.plugin_manager import load_plugins
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.memory.pressure import Sample
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType
from agent.util import logs

GiB = 1 << 30


def waiting_agent(folder: Path) -> Agent:
    """An agent on a 64 GiB host with 20 MiB available: every unit fits its budget but waits for memory in the
    admission queue, so the pipeline runs whole and nothing is spawned. Models must lie in ``folder``."""
    config = AgentConfig(
        state_dir=folder / "state", memory_fraction=0.01, host_memory=64 * GiB, probe_interval=3600,
        model_roots=(folder,),
        pressure_warning=0.0002, pressure_critical=0.0001,  # 20 MiB available is no pressure on this host
    )  # fmt: skip
    return Agent(config, load_plugins(entry_points=False), memory=lambda: Sample(64 * GiB, 20 << 20))


async def bench(count: int, folder: Path) -> tuple[float, int]:
    model_path = write_tiny_gguf(folder / "m.gguf", TinyShape())
    events: list[Event] = []
    for i in range(count):
        model = ModelSpec(name=f"m{i}", namespace="bench", source=str(model_path), memory_budget="512Mi")
        service = ServiceSpec(name=f"s{i}", namespace="bench", model_ref=f"m{i}", context_size=1024)
        events += [Event(EventType.ADDED, model), Event(EventType.ADDED, service)]
    agent = waiting_agent(folder)

    async def stream() -> AsyncIterator[Event]:
        for event in events:
            yield event
        await anyio.sleep_forever()

    start = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(agent.run, stream())
        while sum(1 for r in agent.runtimes.values() if r.reason) < count:
            await anyio.sleep(0.001)
        elapsed = time.perf_counter() - start
        assert len(agent.admission.waiting) == count, "every unit should be waiting in the admission queue"
        tasks.cancel_scope.cancel()
    return elapsed, len(events)


def main() -> int:
    logs.configure("info")  # log lines are part of the agent's work: they go to stderr as in production
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory() as tmp:
        elapsed, n_events = anyio.run(bench, count, Path(tmp))
    per_event_ms = elapsed / n_events * 1000
    print(f"{count} units, {n_events} events: steady state in {elapsed:.2f} s, {per_event_ms:.3f} ms per event")
    ok = elapsed < 2 and per_event_ms < 1
    print("targets (< 2 s, < 1 ms per event):", "met" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
