"""The agent end to end: `metal-agent run` on a manifest directory, real llama.cpp servers (xllamacpp)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from agent_process import AgentProcess, llama_children, manifest, ready
from prometheus_client.parser import text_string_to_metric_families

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.processes.ports import free_port

pytestmark = pytest.mark.llama


def test_manifest_added_serves_chat_and_reports_memory(agent: tuple[AgentProcess, Path, Path]) -> None:
    process, manifests, models = agent
    (manifests / "a.yaml").write_text(manifest("a", models / "a.gguf"))
    process.wait(ready(process, "a"))
    unit = process.unit("a")
    assert unit is not None and unit["budget"] == {"bytes": 512 << 20, "source": "model-budget"}
    assert unit["estimate"]["total"] > 0 and unit["actual"]["kv"] == unit["estimate"]["kv_cache"]
    # Measured by its executor: RSS on Linux (authoritative for a CPU server), and llama.cpp's buffers per backend.
    measured = unit["measured"]
    assert measured["host"]["source"] == "rss" and measured["authoritative"] and measured["device_bytes"] is None
    assert sum(measured["llama_buffers"].values()) >= unit["actual"]["kv"] > 0
    request = urllib.request.Request(
        unit["endpoint"] + "/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    assert answer["choices"][0]["message"]["role"] == "assistant"
    base = f"http://127.0.0.1:{process.port}"
    for path, expected in (("/healthz", "ok"), ("/readyz", "ready")):
        with urllib.request.urlopen(base + path, timeout=5) as response:
            assert response.read().decode().strip() == expected
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.read().decode())
            for s in family.samples
        }
    ids = {("unit", "default/a"), ("executor", unit["executor"])}
    assert samples["metal_agent_unit_estimated_bytes", frozenset(ids)] == unit["estimate"]["total"]
    assert samples["metal_agent_unit_actual_bytes", frozenset({*ids, ("component", "kv")})] == unit["actual"]["kv"]
    assert samples["metal_agent_unit_phase", frozenset({("unit", "default/a"), ("phase", "Ready")})] == 1
    assert samples["metal_agent_admissions_total", frozenset()] == 1
    # Its stderr is not a terminal: JSON lines, and those of the unit's worker name the unit, executor and pid.
    lines = [json.loads(line) for line in (manifests.parent / "agent.log").read_text().splitlines()]
    ready_line = next(line for line in lines if line.get("phase") == "Ready")
    assert ready_line["unit"] == "default/a" and ready_line["level"] == "info"
    assert (ready_line["executor"], ready_line["pid"]) == (unit["executor"], unit["pid"])
    # After load the ledger holds the measured footprint (the high-water mark of later probes), not the estimate.
    measured = max(unit["actual"].get("total", 0), unit["actual"]["rss"])
    reserved = samples["metal_agent_reserved_bytes", frozenset()]
    assert measured <= reserved
    assert reserved <= unit["estimate"]["total"] or unit["warning"] is not None


def test_second_model_waits_for_memory_then_starts_when_the_first_is_deleted(
    agent: tuple[AgentProcess, Path, Path],
) -> None:
    process, manifests, models = agent
    # Host budget: 0.004 x 16 GiB = 65.5 MiB; each tiny server is estimated at about 54 MiB. Once loaded the
    # first holds its measured footprint (about 33 MiB here), still too much for a second estimate beside it.
    (manifests / "a.yaml").write_text(manifest("a", models / "a.gguf"))
    process.wait(ready(process, "a"))
    first_pid = process.unit("a")["pid"]  # type: ignore[index]
    (manifests / "b.yaml").write_text(manifest("b", models / "b.gguf"))
    process.wait(lambda: (process.unit("b") or {}).get("reason") == "InsufficientMemory")
    unit_b = process.unit("b")
    assert unit_b is not None and unit_b["phase"] == "Pending" and unit_b["pid"] is None
    assert "host budget" in unit_b["message"]
    assert len([c for c in process.children() if "xllamacpp_server" in " ".join(c.cmdline())]) == 1
    (manifests / "a.yaml").unlink()
    process.wait(ready(process, "b"))
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
    assert process.unit("a") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            lambda m: manifest("bad", m / "a.gguf").replace("memoryBudget: '512Mi'", "memoryFraction: 1.5"),
            "memoryFraction",
        ),
        (lambda m: manifest("bad", m / "a.gguf", budget="-1Gi"), "memoryBudget"),
    ],
)
def test_invalid_manifests_are_reported_and_start_nothing(
    agent: tuple[AgentProcess, Path, Path], content: Callable[[Path], str], reason: str
) -> None:
    process, manifests, models = agent
    (manifests / "bad.yaml").write_text(content(models))
    process.wait(lambda: bool(process.status()["manifest_errors"]))
    errors = process.status()["manifest_errors"]
    assert reason in errors[str(manifests / "bad.yaml")]
    assert process.unit("bad") is None and not process.children()
    (manifests / "a.yaml").write_text(manifest("a", models / "a.gguf"))  # the agent keeps working
    process.wait(ready(process, "a"))


def test_corrupt_model_fails_closed(agent: tuple[AgentProcess, Path, Path]) -> None:
    process, manifests, models = agent
    (models / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(64))
    (manifests / "c.yaml").write_text(manifest("c", models / "corrupt.gguf"))
    process.wait(lambda: (process.unit("c") or {}).get("reason") == "MemoryCheckFailed")
    assert process.unit("c")["phase"] == "Failed" and not process.children()  # type: ignore[index]


def test_killed_child_is_restarted_and_sigterm_leaves_no_child(agent: tuple[AgentProcess, Path, Path]) -> None:
    process, manifests, models = agent
    (manifests / "a.yaml").write_text(manifest("a", models / "a.gguf"))
    process.wait(ready(process, "a"))
    old_pid = process.unit("a")["pid"]  # type: ignore[index]
    os.kill(old_pid, signal.SIGKILL)
    process.wait(lambda: (u := process.unit("a")) is not None and u["restarts"] == 1 and u["phase"] == "Ready")
    new_pid = process.unit("a")["pid"]  # type: ignore[index]
    assert new_pid != old_pid
    children = process.children()
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(timeout=15) == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_agent_killed_and_restarted_adopts_or_reaps_its_children(tmp_path: Path) -> None:
    manifests, models, state = tmp_path / "manifests", tmp_path / "models", tmp_path / "state"
    manifests.mkdir()
    write_tiny_gguf(models / "a.gguf", TinyShape(n_layer=2, n_embd=64))
    write_tiny_gguf(models / "b.gguf", TinyShape(n_layer=2, n_embd=64), seed=1)
    (manifests / "a.yaml").write_text(manifest("a", models / "a.gguf"))
    (manifests / "b.yaml").write_text(manifest("b", models / "b.gguf"))
    first = AgentProcess(manifests, state)
    first.wait(lambda: all((first.unit(n) or {}).get("phase") == "Ready" for n in ("a", "b")))
    pids = {n: first.unit(n)["pid"] for n in ("a", "b")}  # type: ignore[index]
    first.proc.kill()  # no chance to clean up: its children keep running in their own sessions
    first.proc.wait()
    assert all(psutil.pid_exists(pid) for pid in pids.values())
    (manifests / "b.yaml").unlink()  # b is deleted while no agent runs
    second = AgentProcess(manifests, state)
    try:
        second.wait(lambda: (second.unit("a") or {}).get("reason") == "Adopted")
        assert second.unit("a")["pid"] == pids["a"]  # type: ignore[index]
        second.wait(lambda: not psutil.pid_exists(pids["b"]) or psutil.Process(pids["b"]).status() == "zombie")
        mine = [p.pid for p in llama_children() if str(models) in " ".join(p.cmdline())]
        assert mine == [pids["a"]]  # nothing started twice, the orphan reaped
    finally:
        second.close()
    assert not psutil.pid_exists(pids["a"]) or psutil.Process(pids["a"]).status() == "zombie"


def test_a_second_agent_on_the_same_state_directory_refuses_to_start(agent: tuple[AgentProcess, Path, Path]) -> None:
    process, manifests, _ = agent
    process.wait(lambda: process.status() is not None)
    state = manifests.parent / "state"
    second = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--manifests", str(manifests), "--state-dir", str(state),
         "--api-port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 2
    assert second.stderr.startswith("error: another metal-agent") and str(process.proc.pid) in second.stderr
