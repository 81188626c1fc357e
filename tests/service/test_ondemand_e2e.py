"""Many models, one endpoint, end to end: `metal-agent run` with real llama.cpp servers (xllamacpp) behind /v1.

The host budget (0.004 x 16 GiB = 65.5 MiB) fits one tiny server (estimated about 54 MiB, about 33 MiB once
loaded) but not two: on-demand units take turns.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from agent_process import API_VERSION, AgentProcess
from prometheus_client.parser import text_string_to_metric_families

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

pytestmark = pytest.mark.llama


def on_demand(name: str, source: Path, budget: str = "512Mi", **spec: Any) -> str:
    service = {"modelRef": name, "onDemand": True, "contextSize": 2048, **spec}
    return (
        f"apiVersion: {API_VERSION}\nkind: Model\nmetadata: {{name: {name}}}\n"
        f"spec:\n  source: {source}\n  hardware: {{accelerator: cpu, memoryBudget: '{budget}'}}\n---\n"
        f"apiVersion: {API_VERSION}\nkind: InferenceService\nmetadata: {{name: {name}}}\nspec: {json.dumps(service)}\n"
    )


def chat(process: AgentProcess, model: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}
    request = urllib.request.Request(
        f"http://127.0.0.1:{process.port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def metric(process: AgentProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{process.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def phase(process: AgentProcess, name: str) -> str:
    return str((process.unit(name) or {}).get("phase"))


def test_two_on_demand_models_in_room_for_one_take_turns(agent: tuple[AgentProcess, Path, Path]) -> None:
    process, manifests, models = agent
    (manifests / "a.yaml").write_text(on_demand("a", models / "a.gguf"))
    (manifests / "b.yaml").write_text(on_demand("b", models / "b.gguf"))
    process.wait(lambda: phase(process, "a") == phase(process, "b") == "Idle")
    assert [u["reserved_bytes"] for u in process.status()["units"]] == [0, 0]
    together: list[list[int]] = []
    stop = threading.Event()

    def servers() -> list[int]:
        found = []
        for child in process.children():
            try:
                command = " ".join(child.cmdline())
            except psutil.Error:  # it went while we looked
                continue
            if "llama" in command and "logwriter" not in command:  # not the servers' log writers
                found.append(child.pid)
        return found

    def watch() -> None:  # every live llama.cpp server the agent has, as often as it can look
        while not stop.is_set():
            if len(running := servers()) > 1:
                together.append(running)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for model in ("a", "b", "a", "b", "a", "b"):
            status, answer = chat(process, model)
            assert status == 200, answer
            assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        stop.set()
        watcher.join()
    assert together == []
    assert metric(process, "metal_agent_evictions_total", reason="MakeRoom") == 5  # every switch but the first
    assert metric(process, "metal_agent_cold_starts_total", unit="default/a") == 3
    assert metric(process, "metal_agent_requests_total", unit="default/b", code="200") == 3
    listed = {
        m["id"]: m for m in json.load(urllib.request.urlopen(f"http://127.0.0.1:{process.port}/v1/models"))["data"]
    }
    assert {listed["a"]["phase"], listed["b"]["phase"]} == {"Idle", "Ready"}


def test_a_stream_arrives_in_chunks_and_an_idle_timeout_frees_the_memory(
    agent: tuple[AgentProcess, Path, Path],
) -> None:
    process, manifests, models = agent
    (manifests / "a.yaml").write_text(on_demand("a", models / "a.gguf", idleTimeout="5s"))
    process.wait(lambda: phase(process, "a") == "Idle")
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=60)
    # 256 tokens (about 0.2 s on the tiny model): long enough that a relay which buffered would show.
    body = {"model": "a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 256, "stream": True,
            "ignore_eos": True}  # fmt: skip
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
    reads = []
    while chunk := response.read1(65536):
        reads.append(chunk)
    connection.close()
    events = [line for line in b"".join(reads).decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 100
    assert len(reads) >= 10  # as the tokens came, not one buffered answer
    unit = process.unit("a")
    assert unit is not None and unit["phase"] == "Ready" and unit["reserved_bytes"] > 0
    pid = unit["pid"]
    process.wait(lambda: phase(process, "a") == "Idle", timeout=20)  # 5 s without a request
    unit = process.unit("a")
    assert unit is not None and unit["reserved_bytes"] == 0 and unit["pid"] is None
    assert process.status()["host"]["reserved_bytes"] == 0
    assert pid not in [c.pid for c in process.children()]
    assert metric(process, "metal_agent_idle_stops_total") == 1


def test_context_size_auto_picks_the_largest_context_estimate_reports(
    agent: tuple[AgentProcess, Path, Path],
) -> None:
    process, manifests, models = agent
    budget = "40Mi"  # below the host budget: the unit's own budget binds
    estimate = subprocess.run(
        [sys.executable, "-m", "agent.cli", "estimate", str(models / "a.gguf"), "--memory-budget", budget, "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    largest = json.loads(estimate.stdout)["max_ctx_size"]
    assert 256 <= largest < 4096
    (manifests / "a.yaml").write_text(on_demand("a", models / "a.gguf", budget, contextSize="auto", minContextSize=256))
    process.wait(lambda: phase(process, "a") == "Idle")
    status, _ = chat(process, "a")
    assert status == 200
    unit = process.unit("a")
    assert unit is not None and unit["context_size"] == largest
    # llama.cpp allocated the chosen context (its log rounds to 0.01 MiB)
    assert abs(unit["actual"]["kv"] - unit["estimate"]["kv_cache"]) <= 0.01 * 2**20
    listed = json.load(urllib.request.urlopen(f"http://127.0.0.1:{process.port}/v1/models"))["data"]
    assert listed[0]["context_size"] == largest


def test_a_server_left_by_a_killed_agent_is_adopted_then_idles_out(tmp_path: Path) -> None:
    manifests, models, state = tmp_path / "manifests", tmp_path / "models", tmp_path / "state"
    manifests.mkdir()
    write_tiny_gguf(models / "a.gguf", TinyShape(n_layer=2, n_embd=64))
    (manifests / "a.yaml").write_text(on_demand("a", models / "a.gguf", idleTimeout="8s"))
    first = AgentProcess(manifests, state)
    first.wait(lambda: phase(first, "a") == "Idle")
    assert chat(first, "a")[0] == 200
    pid = first.unit("a")["pid"]  # type: ignore[index]
    first.proc.kill()  # its server keeps running in its own session
    first.proc.wait()
    first.close()
    second = AgentProcess(manifests, state)
    try:
        second.wait(lambda: (second.unit("a") or {}).get("reason") == "Adopted")
        assert second.unit("a")["pid"] == pid  # type: ignore[index]
        assert chat(second, "a")[0] == 200  # served by the adopted server: no cold start
        assert metric(second, "metal_agent_cold_starts_total", unit="default/a") == 0
        second.wait(lambda: phase(second, "a") == "Idle", timeout=30)  # then its idle timer stops it
        second.wait(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    finally:
        second.close()
