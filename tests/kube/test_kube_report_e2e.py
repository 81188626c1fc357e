"""`metal-agent run --kube` reporting back: a real agent process, real llama.cpp (xllamacpp), the fake API server.

Status by merge patch, a Service and an EndpointSlice at the server's port, Events, no status-write loop, and a
clean stop that takes the endpoints away; an on-demand unit started by a request through its Service.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_process import AgentProcess, llama_children
from kubeapi import KubeAPI

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.processes.ports import free_port

MERGE_PATCH = "application/merge-patch+json"  # what a real API server accepts on /status
pytestmark = pytest.mark.llama
API = "inference.llmkube.dev/v1alpha1"
SLICE = "discovery.k8s.io/v1"


def objects(name: str, source: Path) -> list[dict[str, Any]]:
    meta = {"name": name, "namespace": "default"}
    return [
        {
            "apiVersion": API,
            "kind": "Model",
            "metadata": meta,
            "spec": {"source": str(source), "hardware": {"accelerator": "cpu", "memoryBudget": "512Mi"}},
        },
        {
            "apiVersion": API,
            "kind": "InferenceService",
            "metadata": meta,
            "spec": {"modelRef": name, "contextSize": 2048},
        },
    ]


def start_agent(kube_api: KubeAPI, tmp_path: Path, *extra: str) -> AgentProcess:
    for name in ("a", "b"):
        write_tiny_gguf(tmp_path / "models" / f"{name}.gguf", TinyShape(n_layer=2, n_embd=64), seed=ord(name))
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    return AgentProcess(
        tmp_path,
        tmp_path / "state",
        "--kube",
        "--kubeconfig",
        str(kubeconfig),
        "--accelerators",
        "cpu",
        "--host-memory",
        "16Gi",
        "--memory-fraction",
        "0.01",
        "--agent-name",
        "e2e-host",
        *extra,
    )


@pytest.fixture
def agent(kube_api: KubeAPI, tmp_path: Path) -> Iterator[AgentProcess]:
    # TEST-NET-1: an API server refuses a loopback address in an EndpointSlice.
    process = start_agent(kube_api, tmp_path, "--advertise-address", "192.0.2.10")
    yield process
    process.close()


@pytest.fixture
def loopback_agent(kube_api: KubeAPI, tmp_path: Path) -> Iterator[AgentProcess]:
    process = start_agent(kube_api, tmp_path)  # no --advertise-address: the route to the fake API is loopback
    yield process
    process.close()


def phase(kube_api: KubeAPI, name: str) -> str | None:
    obj = kube_api.get("InferenceService", name)
    return ((obj or {}).get("status") or {}).get("phase")


def status_writes(kube_api: KubeAPI, name: str) -> list[Any]:
    return kube_api.requests_where(resource="inferenceservices", name=name, subresource="status", verb="patch")


def test_served_unit_is_reported_registered_and_unregistered_on_stop(
    kube_api: KubeAPI, agent: AgentProcess, tmp_path: Path
) -> None:
    for obj in objects("a", tmp_path / "models" / "a.gguf"):
        kube_api.apply(obj)
    agent.wait(lambda: phase(kube_api, "a") == "Ready", timeout=60)
    status = kube_api.get("InferenceService", "a")["status"]
    port = agent.unit("a")["port"]  # type: ignore[index]
    assert status["readyReplicas"] == 1 and status["agent"]["endpoint"] == f"http://192.0.2.10:{port}"
    assert status["endpoint"] == "http://a.default.svc:8080" and status["agent"]["host"] == "e2e-host"
    assert status["memory"]["actual"]["kv"] == status["memory"]["estimateBreakdown"]["kvCache"]
    agent.wait(lambda: kube_api.get("EndpointSlice", "a-metal-agent", api_version=SLICE) is not None)
    slice_ = kube_api.get("EndpointSlice", "a-metal-agent", api_version=SLICE)
    assert slice_["ports"][0]["port"] == port and slice_["endpoints"][0]["conditions"]["ready"] is True
    assert kube_api.get("Service", "a") is not None
    agent.wait(
        lambda: {"Admitted", "Ready"} <= {e["reason"] for e in kube_api.list("Event", api_version="events.k8s.io/v1")}
    )

    # The agent's own status writes come back through its watch as MODIFIED events and must not loop. Once a
    # second unit is Ready, the watch has delivered everything before it, a's status events included.
    writes = len(status_writes(kube_api, "a"))
    for obj in objects("b", tmp_path / "models" / "b.gguf"):
        kube_api.apply(obj)
    agent.wait(lambda: phase(kube_api, "b") == "Ready", timeout=60)
    assert len(status_writes(kube_api, "a")) == writes
    assert all(r.content_type == MERGE_PATCH and r.status == 200 for r in status_writes(kube_api, "a"))
    assert kube_api.get("InferenceService", "a")["metadata"]["generation"] == 1
    report = agent.status()["report"]
    assert report["host"] == "e2e-host" and report["address"] == "192.0.2.10" and report["endpoint_conflicts"] == []
    assert report["status_writes"] >= 3 and report["events"]["sent"] >= 4 and report["events"]["dropped"] == 0

    agent.close()  # SIGTERM: servers stop, endpoints go, the status says so
    for name in ("a", "b"):
        assert kube_api.get("Service", name) is None
        assert kube_api.get("EndpointSlice", f"{name}-metal-agent", api_version=SLICE) is None
        stopped = kube_api.get("InferenceService", name)["status"]
        assert (stopped["phase"], stopped["readyReplicas"]) == ("Pending", 0) and "endpoint" not in stopped


def test_a_loopback_route_serves_without_an_endpoint_and_a_held_delete_says_terminating(
    kube_api: KubeAPI, loopback_agent: AgentProcess, tmp_path: Path
) -> None:
    model, service = objects("a", tmp_path / "models" / "a.gguf")
    service["metadata"] = {**service["metadata"], "finalizers": ["example.com/keep"]}
    kube_api.apply(model)
    kube_api.apply(service)
    loopback_agent.wait(lambda: phase(kube_api, "a") == "Ready", timeout=60)
    conditions = {c["type"]: c for c in kube_api.get("InferenceService", "a")["status"]["conditions"]}
    assert (conditions["EndpointRegistered"]["status"], conditions["EndpointRegistered"]["reason"]) == (
        "False",
        "NoRoutableAddress",
    )
    assert "127.0.0.1" not in conditions["Ready"]["message"]
    loopback_agent.wait(
        lambda: any(e["reason"] == "NoRoutableAddress" for e in kube_api.list("Event", api_version="events.k8s.io/v1"))
    )
    assert loopback_agent.status()["report"]["endpoints"] == "no routable address"
    assert not kube_api.requests_where(resource="endpointslices", verb="create")

    kube_api.delete("InferenceService", "a")  # held by its finalizer: only deletionTimestamp is set
    loopback_agent.wait(lambda: phase(kube_api, "a") == "Terminating", timeout=30)
    terminating = kube_api.get("InferenceService", "a")["status"]
    assert terminating["readyReplicas"] == 0 and "endpoint" not in terminating
    assert {c["type"]: c["status"] for c in terminating["conditions"]}["Ready"] == "False"
    loopback_agent.wait(lambda: loopback_agent.unit("a") is None)
    kube_api.remove_finalizers("InferenceService", "a")
    assert kube_api.get("InferenceService", "a") is None


def test_an_on_demand_unit_starts_on_a_request_through_its_service_and_idles_out(
    kube_api: KubeAPI, tmp_path: Path
) -> None:
    proxy = free_port()
    agent = start_agent(kube_api, tmp_path, "--advertise-address", "192.0.2.10", "--proxy-port", str(proxy))
    try:
        model, service = objects("a", tmp_path / "models" / "a.gguf")
        service["spec"] |= {"onDemand": True, "idleTimeout": "3s"}
        kube_api.apply(model)
        kube_api.apply(service)

        def slice_points_at_the_proxy() -> bool:
            found = kube_api.get("EndpointSlice", "a-metal-agent", api_version=SLICE) or {}
            ports, endpoints = found.get("ports") or [{}], found.get("endpoints") or [{}]
            return ports[0].get("port") == proxy and (endpoints[0].get("conditions") or {}).get("ready") is True

        agent.wait(lambda: (agent.unit("a") or {}).get("phase") == "Idle" and slice_points_at_the_proxy(), 30)
        assert not llama_children(agent) and agent.status()["report"]["proxy_port"] == proxy
        # What a pod does through the Service: kube-proxy sends it to the slice's address, the Host names the
        # Service. (The slice's address is TEST-NET here, so the test goes to the port on loopback.)
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy}/v1/chat/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json", "Host": "a.default.svc.cluster.local:8080"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert (agent.unit("a") or {}).get("phase") == "Ready" and len(llama_children(agent)) == 1
        agent.wait(lambda: phase(kube_api, "a") == "Ready", timeout=30)
        assert slice_points_at_the_proxy()  # while it runs too: every request passes the idle timer
        # No request for 3 s: the server goes, the Service still leads to the proxy.
        agent.wait(lambda: (agent.unit("a") or {}).get("phase") == "Idle" and not llama_children(agent), 30)
        assert slice_points_at_the_proxy()
        agent.wait(lambda: kube_api.get("InferenceService", "a")["status"]["agent"]["onDemand"]["state"] == "Idle")
        with pytest.raises(urllib.error.HTTPError) as refused:  # the agent's state is not served to the cluster
            urllib.request.urlopen(f"http://127.0.0.1:{proxy}/status", timeout=5)
        assert refused.value.code == 404
    finally:
        agent.close()
