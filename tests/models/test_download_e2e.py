"""A real `metal-agent run` killed mid-download: the next one resumes the partial file and serves the model once."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import psutil
import pytest
from agent_process import API_VERSION, AgentProcess, llama_children

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from tests.model_server import ModelServer

pytestmark = pytest.mark.llama


def remote_manifest(name: str, url: str, sha256: str) -> str:
    return (
        f"apiVersion: {API_VERSION}\nkind: Model\nmetadata: {{name: {name}}}\n"
        f"spec:\n  source: {url}\n  sha256: {sha256}\n  hardware: {{accelerator: cpu, memoryBudget: 512Mi}}\n---\n"
        f"apiVersion: {API_VERSION}\nkind: InferenceService\nmetadata: {{name: {name}}}\n"
        f"spec: {{modelRef: {name}, contextSize: 2048}}\n"
    )


def test_agent_killed_mid_download_resumes_and_serves_once(server: ModelServer, tmp_path: Path) -> None:
    data = write_tiny_gguf(tmp_path / "src" / "tiny.gguf", TinyShape()).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    url = server.add("models/tiny.gguf", data)
    server.bytes_per_second = 64 << 10  # slow enough to kill the agent halfway
    manifests, state = tmp_path / "manifests", tmp_path / "state"
    manifests.mkdir()
    (manifests / "r.yaml").write_text(remote_manifest("r", url, digest))
    store = tmp_path / "store"

    first = AgentProcess(manifests, state)
    try:
        first.wait(lambda: ((first.unit("r") or {}).get("download") or {}).get("total_bytes") == len(data))
        unit = first.unit("r")
        assert unit is not None and unit["phase"] == "Downloading" and unit["estimate"]["total"] > 0
        partial: list[Path] = []

        def some_bytes_on_disk() -> bool:
            partial[:] = list(store.rglob("tiny.gguf.partial"))
            return bool(partial) and partial[0].stat().st_size > 0

        first.wait(some_bytes_on_disk)
    finally:
        first.proc.kill()  # no clean-up: the partial, its lock file and no server are left behind
        first.proc.wait()
        first.log.close()
    kept = partial[0].stat().st_size
    assert 0 < kept < len(data) and not [p for p in llama_children() if str(store) in " ".join(p.cmdline())]

    server.bytes_per_second = None
    requests_before = len(server.gets())
    second = AgentProcess(manifests, state)
    try:
        second.wait(lambda: (second.unit("r") or {}).get("phase") == "Ready", timeout=60)
        after_restart = server.gets()[requests_before:]
        resumed = [r for r in after_restart if (r.range or "").endswith("-")]
        assert len(resumed) == 1 and resumed[0].status == 206
        assert after_restart == resumed  # the header was saved beside the partial: not fetched again
        assert resumed[0].range == f"bytes={kept}-" and resumed[0].if_range == server.etag()
        stored = next(store.rglob("tiny.gguf"))
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest and not partial[0].exists()
        assert sorted(p.name for p in stored.parent.iterdir()) == ["tiny.gguf", "tiny.gguf.lock", "tiny.gguf.sha256"]
        servers = [p for p in llama_children() if str(stored) in " ".join(p.cmdline())]
        unit = second.unit("r")
        assert unit is not None and [p.pid for p in servers] == [unit["pid"]]  # started once
        request = urllib.request.Request(
            unit["endpoint"] + "/v1/chat/completions",
            data=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["choices"][0]["message"]["role"] == "assistant"
    finally:
        second.close()
    assert not psutil.pid_exists(unit["pid"]) or psutil.Process(unit["pid"]).status() == psutil.STATUS_ZOMBIE
