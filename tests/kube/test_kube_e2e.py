"""`metal-agent run --kube` end to end: a real agent process watching the fake API server through a kubeconfig,
serving real llama.cpp servers (xllamacpp)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from agent_process import AgentProcess, ready
from kubeapi import KubeAPI
from prometheus_client.parser import text_string_to_metric_families

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

pytestmark = pytest.mark.llama
API = "inference.llmkube.dev/v1alpha1"


def model(name: str, source: Path, budget: str = "512Mi") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Model", "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": str(source), "hardware": {"accelerator": "cpu", "memoryBudget": budget}}}  # fmt: skip


def service(name: str, ctx: int = 2048) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "InferenceService", "metadata": {"name": name, "namespace": "default"},
            "spec": {"modelRef": name, "contextSize": ctx}}  # fmt: skip


@dataclass
class Cluster:
    api: KubeAPI
    agent: AgentProcess
    models: Path

    def lists(self) -> int:
        return len([r for r in self.api.requests if r.verb == "list" and r.status == 200])

    def serve(self, name: str) -> int:
        self.api.apply(model(name, self.models / f"{name}.gguf"))
        self.api.apply(service(name))
        self.agent.wait(ready(self.agent, name))
        pid: int = self.agent.unit(name)["pid"]  # type: ignore[index]
        return pid

    def watching(self) -> bool:
        return self.api.open_watches == 2

    def llama_children(self) -> list[psutil.Process]:
        return [c for c in self.agent.children() if "xllamacpp_server" in " ".join(c.cmdline())]


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def readyz(agent: AgentProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/readyz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def cluster(kube_api: KubeAPI, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    models = tmp_path / "models"
    write_tiny_gguf(models / "a.gguf", TinyShape(n_layer=2, n_embd=64))
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    if getattr(request, "param", None) == "api-down-at-start":
        kube_api.fail_next(10_000, status=503)
    agent = AgentProcess(tmp_path, tmp_path / "state", "--kube", "--kubeconfig", str(kubeconfig),
                         "--accelerators", "cpu", "--host-memory", "16Gi", "--memory-fraction", "0.005")  # fmt: skip
    yield Cluster(kube_api, agent, models)
    agent.close()


def test_applied_objects_are_served_through_a_watch_not_polling(cluster: Cluster) -> None:
    cluster.agent.wait(cluster.watching)
    assert readyz(cluster.agent) == 200
    pid = cluster.serve("a")
    unit = cluster.agent.unit("a")
    assert unit is not None and unit["phase"] == "Ready" and psutil.pid_exists(pid)
    assert unit["budget"] == {"bytes": 512 << 20, "source": "model-budget"}
    watch = cluster.agent.status()["watch"]
    assert watch["synced"] and watch["kinds"]["models"]["connected"] and watch["objects"]["served"] == 2
    # everything after the first listing came through the open watches
    assert cluster.lists() == 2 and [r.verb for r in cluster.api.requests].count("watch") == 2


@pytest.mark.parametrize("cluster", ["api-down-at-start"], indirect=True)
def test_not_ready_until_the_first_listing_and_api_trouble_never_ends_the_agent(cluster: Cluster) -> None:
    cluster.agent.wait(lambda: len(cluster.api.requests_where(status=503)) >= 4)
    assert readyz(cluster.agent) == 503
    status = cluster.agent.status()["watch"]
    assert not status["synced"] and "503" in status["kinds"]["models"]["last_error"]
    cluster.api.clear_faults()
    cluster.agent.wait(lambda: readyz(cluster.agent) == 200)
    cluster.serve("a")


def test_lowered_memory_budget_stops_the_server(cluster: Cluster) -> None:
    pid = cluster.serve("a")
    cluster.api.apply(model("a", cluster.models / "a.gguf", budget="8Mi"))
    cluster.agent.wait(lambda: (cluster.agent.unit("a") or {}).get("reason") == "InsufficientMemory")
    unit = cluster.agent.unit("a")
    assert unit is not None and unit["phase"] == "Failed" and unit["pid"] is None
    cluster.agent.wait(lambda: gone(pid))
    assert not cluster.llama_children()


def test_gone_mid_stream_relists_without_a_second_spawn(cluster: Cluster) -> None:
    pid = cluster.serve("a")
    cluster.agent.wait(cluster.watching)
    cluster.api.gone_next_watch(resource="models")
    cluster.api.gone_next_watch(resource="inferenceservices")
    assert cluster.api.disconnect_watches() == 2
    cluster.agent.wait(lambda: cluster.lists() == 4 and cluster.watching())  # each kind listed again
    unit = cluster.agent.unit("a")
    assert unit is not None and unit["phase"] == "Ready" and unit["pid"] == pid
    assert [c.pid for c in cluster.llama_children()] == [pid]
    kinds = cluster.agent.status()["watch"]["kinds"]
    assert all("410" in kinds[plural]["last_error"] for plural in ("models", "inferenceservices"))


def test_deleted_while_disconnected_is_stopped_after_the_relist(cluster: Cluster) -> None:
    pid = cluster.serve("a")
    cluster.agent.wait(cluster.watching)
    cluster.api.fail_next(10_000, when=lambda r: r.verb == "watch")  # the agent cannot watch again for now
    cluster.api.disconnect_watches()
    cluster.agent.wait(lambda: cluster.api.open_watches == 0)
    cluster.api.delete("InferenceService", "a")
    cluster.api.delete("Model", "a")
    cluster.api.compact()  # the deletions are no longer in the server's history: only a re-list can show them
    assert psutil.pid_exists(pid) and not gone(pid)
    cluster.api.clear_faults()
    cluster.agent.wait(lambda: cluster.agent.unit("a") is None and gone(pid))
    cluster.agent.wait(lambda: cluster.lists() == 4)  # each kind re-listed (the services' re-list stopped it)
    assert not cluster.llama_children()


def test_server_errors_and_dropped_connections_reconnect_and_keep_serving(cluster: Cluster) -> None:
    pid = cluster.serve("a")
    for round_ in range(1, 4):
        cluster.agent.wait(cluster.watching)
        cluster.api.fail_next(3, status=500)
        cluster.api.disconnect_watches()
        failed = 3 * round_
        cluster.agent.wait(lambda n=failed: len(cluster.api.requests_where(status=500)) == n and cluster.watching())
    assert cluster.agent.proc.poll() is None
    kinds = cluster.agent.status()["watch"]["kinds"]
    assert kinds["models"]["reconnects"] + kinds["inferenceservices"]["reconnects"] >= 3
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.agent.port}/metrics", timeout=2) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    counted = {s.labels["resource"]: s.value for s in families["metal_agent_watch_reconnects"].samples
               if s.name.endswith("_total")}  # fmt: skip
    assert counted == {
        "Model": kinds["models"]["reconnects"],
        "InferenceService": kinds["inferenceservices"]["reconnects"],
    }
    assert (cluster.agent.unit("a") or {}).get("pid") == pid
    cluster.api.apply(service("a", ctx=1024))  # a change after all that still reaches the agent
    cluster.agent.wait(lambda: (u := cluster.agent.unit("a")) is not None and u["phase"] == "Ready" and u["pid"] != pid)
