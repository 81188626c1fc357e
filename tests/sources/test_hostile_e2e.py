"""`metal-agent run` against hostile files: a FIFO manifest, a manifest linked to /dev/zero, an alias bomb and a
FIFO model file. The agent keeps answering /healthz within a second, the healthy unit keeps its server, each bad
file is reported, and SIGTERM still stops the agent at once. The server is a stand-in llama-server script."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
import urllib.request
from pathlib import Path

from agent_process import AgentProcess, manifest
from test_hostile_files import BOMB

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

FAKE_LLAMA_SERVER = """#!{python}
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{{}}")
    def log_message(self, *a): pass
print("fake llama-server on", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def healthz_seconds(port: int) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
        assert response.status == 200
    return time.monotonic() - started


def test_hostile_files_never_stop_the_agent(tmp_path: Path) -> None:
    manifests, models = tmp_path / "manifests", tmp_path / "models"
    manifests.mkdir()
    write_tiny_gguf(models / "a.gguf", TinyShape(n_layer=2, n_embd=64))
    server = tmp_path / "llama-server"
    server.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable))
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    (manifests / "a.yaml").write_text(manifest("a", models / "a.gguf"))
    agent = AgentProcess(manifests, tmp_path / "state", "--llama-server", str(server), "--host-memory", "16Gi")
    try:
        agent.wait(lambda: (agent.unit("a") or {}).get("phase") == "Ready")
        pid = agent.unit("a")["pid"]  # type: ignore[index]
        os.mkfifo(manifests / "fifo.yaml")
        (manifests / "zero.yaml").symlink_to("/dev/zero")
        (manifests / "bomb.yaml").write_text(BOMB)
        os.mkfifo(models / "b.gguf")
        (manifests / "b.yaml").write_text(manifest("b", models / "b.gguf"))
        deadline = time.monotonic() + 3  # the agent reads all of them meanwhile
        while time.monotonic() < deadline:
            assert healthz_seconds(agent.port) < 1
        agent.wait(lambda: (agent.unit("b") or {}).get("phase") == "Failed", timeout=10)
        status = agent.status()
        errors = status["manifest_errors"]
        assert set(errors) == {str(manifests / n) for n in ("fifo.yaml", "zero.yaml", "bomb.yaml")}
        assert "FIFO" in errors[str(manifests / "fifo.yaml")] and "aliases" in errors[str(manifests / "bomb.yaml")]
        unit_b = agent.unit("b")
        assert unit_b is not None and unit_b["reason"] == "MemoryCheckFailed"
        assert "not a regular file" in unit_b["message"]
        unit_a = agent.unit("a")
        assert unit_a is not None and unit_a["phase"] == "Ready" and unit_a["pid"] == pid  # untouched
        assert len(str(status)) < 20_000  # no expanded bomb anywhere
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=15) == 0 and time.monotonic() - started < 10
    finally:
        agent.close()
    log = (tmp_path / "agent.log").read_bytes()
    assert len(log) < 200_000 and b"lol" not in log
