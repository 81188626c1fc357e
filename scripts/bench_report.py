"""The Kubernetes reporter with N InferenceServices: what reporting costs the API server, and what repeating costs.

Run: ``python scripts/bench_report.py [N]`` (needs the test extra: the fake API server of the tests,
``tests/kubeapi.py``, on kmock). The real reporter (kubernetes-asyncio over HTTP) reports every unit through the
same transitions the pipeline makes (Starting, then Ready), then reports every Ready status again. It prints:

- the time until every status, Service and EndpointSlice is written, and the requests it took per unit;
- the requests for the repeat pass (target: none, since identical statuses write nothing);
- the Events sent, and the requests the Events took.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kubeapi import KubeAPI
from kubernetes_asyncio.client import ApiClient

from agent.kube.report import KubeReporter, ReporterSettings
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.units import ServingUnit
from agent.util import logs

API = "inference.llmkube.dev/v1alpha1"
GiB = 1 << 30


def status(name: str, phase: str, port: int) -> dict[str, Any]:
    return {
        "unit": f"bench/{name}",
        "phase": phase,
        "reason": "Ready" if phase == "Ready" else "Admitted",
        "message": f"llamacpp on port {port}",
        "budget": {"bytes": 8 * GiB, "source": "model-budget"},
        "estimate": {
            "weights": 4 * GiB,
            "kv_cache": GiB,
            "compute": GiB // 4,
            "overhead": GiB // 4,
            "total": 5 * GiB + GiB // 2,
        },
        "actual": {"rss": 5 * GiB} if phase == "Ready" else None,
        "pid": 1000,
        "port": port,
        "endpoint": None,
        "restarts": 0,
        "executor": "llamacpp",
    }


def count_requests(api: KubeAPI, since: int) -> Counter[str]:
    return Counter(f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}" for r in api.requests[since:])


async def bench(api: KubeAPI, count: int) -> None:
    units = []
    for i in range(count):
        api.apply(
            {
                "apiVersion": API,
                "kind": "InferenceService",
                "metadata": {"name": f"s{i}", "namespace": "bench"},
                "spec": {"modelRef": "m"},
            }
        )
        service = ServiceSpec(name=f"s{i}", namespace="bench", model_ref="m", generation=1)
        units.append(ServingUnit(service=service, model=ModelSpec(name="m", namespace="bench", source="/m.gguf")))
    settings = ReporterSettings(host_name="bench", host_ip="192.0.2.10", concurrency=16)  # routable: no 422
    async with ApiClient(api.configuration()) as api_client, anyio.create_task_group() as tasks:
        reporter = KubeReporter(api_client, settings)
        tasks.start_soon(reporter.run)
        start, before = time.perf_counter(), len(api.requests)
        for phase in ("Starting", "Ready"):
            for i, unit in enumerate(units):
                reporter.report(unit, status(f"s{i}", phase, 20000 + i))
        await reporter.wait_idle()
        while not reporter.events.idle:
            await anyio.sleep(0.05)  # polling the queue length, for the measurement only
        elapsed = time.perf_counter() - start
        first = count_requests(api, before)
        ready = sum(1 for o in api.list("InferenceService", "bench") if o.get("status", {}).get("phase") == "Ready")
        slices = len(api.list("EndpointSlice", "bench", api_version="discovery.k8s.io/v1"))
        before = len(api.requests)
        for i, unit in enumerate(units):
            reporter.report(unit, status(f"s{i}", "Ready", 20000 + i))
        await reporter.wait_idle()
        repeat = count_requests(api, before)
        tasks.cancel_scope.cancel()
    by_kind = {k: n for k, n in sorted(first.items()) if "events" not in k}
    non_event = sum(by_kind.values())
    print(f"{count} units: Starting then Ready reported in {elapsed:.2f} s; {ready} Ready statuses, {slices} slices")
    print(f"requests without Events: {non_event} ({non_event / count:.1f} per unit): {by_kind}")
    print(
        f"Events sent: {reporter.events.sent}, aggregated: {reporter.events.aggregated}, "
        f"dropped: {reporter.events.dropped} (queue {settings.event_queue})"
    )
    print(f"repeat pass of identical statuses: {sum(repeat.values())} requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("count", nargs="?", type=int, default=1000)
    args = parser.parse_args()
    logs.configure()
    with KubeAPI() as api:
        anyio.run(bench, api, args.count)


if __name__ == "__main__":
    main()
