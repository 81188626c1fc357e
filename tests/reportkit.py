"""Helpers for the Kubernetes reporter tests: objects in the fake API, unit statuses, a running reporter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from kubeapi import KubeAPI
from kubernetes_asyncio.client import ApiClient

from agent.kube.calls import Retry
from agent.kube.report import KubeReporter, ReporterSettings
from agent.sources.manifest import parse_object
from agent.sources.units import ServingUnit

API_VERSION = "inference.llmkube.dev/v1alpha1"
FAST = Retry(attempts=3, base=0.01, cap=0.05, timeout=5)
GiB = 1 << 30
HOST_IP = "192.0.2.10"  # TEST-NET-1: routable as far as an API server can tell (it refuses loopback)


def model_obj(name: str = "llama", budget: str = "8Gi") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"source": "/models/llama.gguf", "hardware": {"accelerator": "metal", "memoryBudget": budget}},
    }


def service_obj(name: str = "chat", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"modelRef": "llama", "contextSize": 4096, **spec},
    }


def unit_of(kube_api: KubeAPI, name: str = "chat") -> ServingUnit:
    service = parse_object(kube_api.get("InferenceService", name), "api")
    model = parse_object(kube_api.get("Model", "llama"), "api")
    return ServingUnit(service=service, model=model)  # type: ignore[arg-type]


def status(phase: str, reason: str, message: str = "", port: int | None = None, name: str = "chat") -> dict[str, Any]:
    """What UnitRuntime.status() reports (the keys are checked against it below)."""
    running = phase in ("Starting", "Ready")
    return {
        "unit": f"default/{name}",
        "phase": phase,
        "reason": reason,
        "message": message or f"{phase} {reason}",
        "budget": {"bytes": 8 * GiB, "source": "model-budget"},
        "estimate": {
            "weights": 4 * GiB,
            "kv_cache": GiB,
            "compute": GiB // 2,
            "overhead": GiB // 4,
            "total": 5 * GiB + GiB // 2 + GiB // 4,
        },
        "actual": {"rss": 5 * GiB, "total": 5 * GiB + 1} if phase == "Ready" else None,
        "pid": 4242 if running else None,
        "port": port if running else None,
        "endpoint": f"http://127.0.0.1:{port}" if phase == "Ready" else None,
        "restarts": 0,
        "executor": "llamacpp" if running else None,
        "download": None,
        "warning": None,
        "measured": None,
    }


def settings(**changes: Any) -> ReporterSettings:
    return ReporterSettings(
        **{"host_name": "mac-1", "host_ip": HOST_IP, "retry": FAST, "retry_after": 0.05, "retry_cap": 0.5, **changes}
    )


@asynccontextmanager
async def running(
    kube_api: KubeAPI, on_refused: Callable[[str], None] | None = None, **changes: Any
) -> AsyncIterator[KubeReporter]:
    async with ApiClient(kube_api.configuration()) as api_client:
        reporter = KubeReporter(api_client, settings(**changes), on_refused)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(reporter.run)
            yield reporter
            tasks.cancel_scope.cancel()


async def until(condition: Callable[[], Any], timeout: float = 10, what: str = "condition") -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)  # the polling interval of the condition, not a wait for an outcome


async def settle(reporter: KubeReporter) -> None:
    with anyio.fail_after(10):
        await reporter.wait_idle()


def status_of(kube_api: KubeAPI, name: str = "chat") -> dict[str, Any]:
    obj = kube_api.get("InferenceService", name)
    assert obj is not None
    result: dict[str, Any] = obj.get("status") or {}
    return result


def status_patches(kube_api: KubeAPI) -> list[Any]:
    return [r for r in kube_api.requests_where(resource="inferenceservices", subresource="status")]


def events_in(kube_api: KubeAPI) -> list[dict[str, Any]]:
    return kube_api.list("Event", api_version="events.k8s.io/v1")


def applied(kube_api: KubeAPI, *objects: dict[str, Any]) -> None:
    for obj in (model_obj(), *objects):
        kube_api.apply(obj)
