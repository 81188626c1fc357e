"""1,000 Model + InferenceService pairs in a (fake) Kubernetes API: the watch source and the pipeline to steady state.

Run: ``python scripts/bench_kube.py [N] [--idle S]`` (needs the test extra: the fake API server of the tests,
``tests/kubeapi.py``, on kmock). The agent's real Kubernetes source (kubernetes-asyncio over HTTP: list, then
watch) feeds the real pipeline: ``resolve_budget``, ``preflight`` (GGUF header scan and estimate), ledger
admission and ``report``. As in ``bench_pipeline.py`` the host budget is so small that admission holds every unit
``Pending``: nothing is spawned. It reports:

- time from start to steady state (every unit has a verdict) and the HTTP requests it took;
- the requests made while idle for ``--idle`` seconds (a watch makes none; LLMKube's 5 s polling makes one
  list per 5 s);
- the time from a spec change on the server to the unit's new verdict (median and worst of 20).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_pipeline import waiting_agent
from kubeapi import KubeAPI

from agent.config.kube_settings import KubeSettings
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.kube.source import KubeSource
from agent.sources.standalone import Event, Synced
from agent.util import logs

GiB = 1 << 30
API = "inference.llmkube.dev/v1alpha1"
CHANGES = 20


def model(name: str, path: Path, budget: str = "512Mi") -> dict[str, object]:
    hardware = {"accelerator": "cpu", "memoryBudget": budget}
    return {"apiVersion": API, "kind": "Model", "metadata": {"name": name, "namespace": "bench"},
            "spec": {"source": str(path), "hardware": hardware}}  # fmt: skip


def populate(api: KubeAPI, count: int, model_path: Path) -> None:
    for i in range(count):
        api.apply(model(f"m{i}", model_path))
        api.apply({"apiVersion": API, "kind": "InferenceService", "metadata": {"name": f"s{i}", "namespace": "bench"},
                   "spec": {"modelRef": f"m{i}", "contextSize": 1024}})  # fmt: skip


async def bench(api: KubeAPI, count: int, folder: Path, idle: float) -> dict[str, float]:
    agent = waiting_agent(folder)  # units wait in the admission queue: nothing is spawned
    source = KubeSource(KubeSettings(namespace="bench", accelerators=("cpu",)), api.configuration(), "bench")
    send, receive = anyio.create_memory_object_stream[Event | Synced](float("inf"))
    results: dict[str, float] = {}
    before = len(api.requests)
    start = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(source.run, send)
        tasks.start_soon(agent.run, receive)
        while not agent.synced or sum(1 for r in agent.runtimes.values() if r.reason) < count:
            await anyio.sleep(0.001)
        results["steady_s"] = time.perf_counter() - start
        while api.open_watches < 2:
            await anyio.sleep(0.001)
        results["steady_requests"] = len(api.requests) - before
        quiet = len(api.requests)
        await anyio.sleep(idle)  # the measurement window: nothing is awaited here
        results["idle_requests"] = len(api.requests) - quiet
        latencies = []
        for i in range(CHANGES):  # alternate the budget of one Model: each change is a new verdict for its unit
            runtime = agent.runtimes[f"bench/s{i}"]
            old = runtime.message
            changed = time.perf_counter()
            api.apply(model(f"m{i}", folder / "m.gguf", budget="1Mi"))
            while runtime.message == old:
                await anyio.sleep(0.0005)
            latencies.append((time.perf_counter() - changed) * 1000)
        results["change_ms_median"] = statistics.median(latencies)
        results["change_ms_max"] = max(latencies)
        tasks.cancel_scope.cancel()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=1000)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle observation (default 10)")
    args = parser.parse_args()
    logs.configure("warning")  # 2,000 "unit status" lines would measure the terminal, not the agent
    with tempfile.TemporaryDirectory() as tmp, KubeAPI() as api:
        model_path = write_tiny_gguf(Path(tmp) / "m.gguf", TinyShape())
        populate(api, args.count, model_path)
        results = anyio.run(bench, api, args.count, Path(tmp), args.idle)
    print(f"{args.count} Model + InferenceService pairs ({2 * args.count} objects) in the API")
    print(f"steady state in {results['steady_s']:.2f} s with {results['steady_requests']:.0f} HTTP requests "
          "(a list and an open watch per kind)")  # fmt: skip
    print(f"idle for {args.idle:g} s: {results['idle_requests']:.0f} requests "
          f"(LLMKube's 5 s polling: {int(args.idle // 5)} full listings of {2 * args.count} objects)")  # fmt: skip
    print(f"a Model change on the server to its unit's new verdict ({CHANGES} changes): median "
          f"{results['change_ms_median']:.1f} ms, max {results['change_ms_max']:.1f} ms")  # fmt: skip
    return 0 if results["idle_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
